"""Read a llama-architecture GGUF file: config, weight specs, tokenizer, chat template, digest.

Tensor types F32, F16, Q8_0, Q4_0 and Q4_1 are supported. Quantized blocks are decoded straight
from the memory-mapped file into :class:`~veil.kernels.quant_cpu.Int4Spec` (``Q4_1``: ``scale = d``,
``zero = m + 8 d``; ``Q4_0``: ``scale = d``, ``zero = 0``) so nothing is re-quantized. ``Q8_0`` keeps
its blocks exactly, for the embedding lookup and — as two int4 halves, see
:class:`~veil.kernels.quant_cpu.Q8BlockSpec` — for matmuls (``quant="int8"`` requantizes it to
per-channel int8 instead, a little faster and less exact). GGUF stores Q and K rows permuted
for llama.cpp's interleaved RoPE; they are permuted back to the Hugging Face layout (a row
permutation, so blocks are untouched).

The model digest is the SHA-256 of the mapped file bytes, the very bytes the weights are read from.
Building a tokenizer from GGUF metadata takes seconds, so the result is cached on disk, keyed by
the digest (``CACHE/tokenizers/<digest>/``; the enclave passes its state directory as CACHE, other
callers default to ``~/.cache/veil``). Beside the saved files the entry holds
``veil-tokenizer.json`` = ``{"format": "veil/tokenizer-cache/v1", "model_digest": HEX,
"files": {NAME: SHA-256 HEX}}``; an entry whose file set or any file's hash differs from its record
is removed and rebuilt from the GGUF, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.enclave.errors import ModelLoadError
from veil.enclave.model.config import ModelConfig
from veil.enclave.model.weights import BlockEmbedding, LayerSpecs, LlamaSpecs, Spec
from veil.kernels.quant_cpu import Int4Spec, Int8Spec, Q8BlockSpec, quantize_int4, quantize_int8

__all__ = ["GGUFModel", "default_cache_dir", "load_gguf_tokenizer", "read_gguf"]

_SUPPORTED_ARCH = {"llama"}
_QK = 32


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "veil"


@dataclass(slots=True)
class GGUFModel:
    config: ModelConfig
    specs: LlamaSpecs
    digest: bytes
    chat_template: str | None
    eos_token_ids: frozenset[int]


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _require(reader: Any, key: str) -> Any:
    v = _field(reader, key)
    if v is None:
        raise ModelLoadError(f"GGUF metadata key {key!r} is missing")
    return v


def _digest(reader: Any) -> bytes:
    h = hashlib.sha256()
    data = memoryview(reader.data).cast("B")
    step = 1 << 24
    for i in range(0, len(data), step):
        h.update(data[i : i + step])
    return h.digest()


def _blocks(raw: np.ndarray[Any, Any], n_rows: int, block_bytes: int) -> torch.Tensor:
    arr = np.array(raw, dtype=np.uint8, copy=True).reshape(n_rows, -1, block_bytes)
    return torch.from_numpy(arr)


def _f16(col: torch.Tensor) -> torch.Tensor:
    return col.contiguous().view(torch.float16).squeeze(-1).float()


def _q4_codes(qs: torch.Tensor) -> torch.Tensor:
    # 16 bytes per block: low nibbles are elements 0..15, high nibbles elements 16..31.
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _decode(kind: str, raw: np.ndarray[Any, Any], n: int, k: int) -> tuple[str, Any]:
    """→ ("int4", Int4Spec) | ("q8", (codes int8 [n, k], d [n, k/32])) | ("dense", fp32 tensor)."""
    if kind in ("F32", "F16"):
        return "dense", torch.from_numpy(np.array(raw, dtype=np.float32, copy=True)).reshape(n, k)
    if k % _QK:
        raise ModelLoadError(f"row length {k} is not a multiple of the {kind} block size")
    if kind == "Q4_1":
        b = _blocks(raw, n, 20)
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        codes = _q4_codes(b[..., 4:20]).reshape(n, k)
        return "int4", Int4Spec(codes, d, m + 8.0 * d, _QK)
    if kind == "Q4_0":
        b = _blocks(raw, n, 18)
        d = _f16(b[..., 0:2])
        codes = _q4_codes(b[..., 2:18]).reshape(n, k)
        return "int4", Int4Spec(codes, d, torch.zeros_like(d), _QK)
    if kind == "Q8_0":
        b = _blocks(raw, n, 34)
        d = _f16(b[..., 0:2])
        codes = b[..., 2:34].contiguous().view(torch.int8).reshape(n, k)
        return "q8", (codes, d)
    raise ModelLoadError(f"unsupported GGUF tensor type {kind}")


def _as_linear(decoded: tuple[str, Any], quant: str) -> Spec:
    tag, val = decoded
    if tag == "int4":
        return val  # type: ignore[no-any-return]
    if tag == "q8":
        codes, d = val
        spec = Q8BlockSpec(codes, d)
        if quant == "int4":
            return quantize_int4(spec.dequantize())
        if quant == "int8":
            return quantize_int8(spec.dequantize())
        return spec
    w = val
    if quant == "int4":
        return quantize_int4(w)
    if quant == "int8":
        return quantize_int8(w)
    return w  # type: ignore[no-any-return]


def _as_embedding(decoded: tuple[str, Any]) -> BlockEmbedding:
    tag, val = decoded
    if tag == "int4":
        return BlockEmbedding(val.codes, val.scale, val.zero, val.group_size, 8.0)
    if tag == "q8":
        codes, d = val
        return BlockEmbedding(codes, d, None, _QK, 0.0)
    return BlockEmbedding.dense(val)


def _unpermute(spec: Spec, n_heads: int) -> Spec:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs → rotate-half halves)."""
    n = (spec if isinstance(spec, torch.Tensor) else spec.codes).shape[0]
    perm = torch.arange(n).view(n_heads, n // n_heads // 2, 2).transpose(1, 2).reshape(-1)
    if isinstance(spec, torch.Tensor):
        return spec[perm].contiguous()
    if isinstance(spec, Int4Spec):
        return Int4Spec(spec.codes[perm], spec.scale[perm], spec.zero[perm], spec.group_size)
    if isinstance(spec, Q8BlockSpec):
        return Q8BlockSpec(spec.codes[perm], spec.scale[perm])
    return Int8Spec(spec.codes[perm], spec.scale[perm])


def read_gguf(path: str | Path, *, quant: str = "auto", lazy: bool = False) -> GGUFModel:
    """Parse ``path`` into a config and weight specs. ``quant`` applies to float/Q8_0 tensors.

    ``lazy``: the layers are a one-shot generator decoded on demand (for a single build).
    """
    import gguf

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file not found: {p}")
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
        raise ModelLoadError(f"not a readable GGUF file: {p.name} ({type(e).__name__})") from e
    arch = _field(reader, "general.architecture")
    if arch not in _SUPPORTED_ARCH:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}")
    config = _config(reader, arch)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> tuple[str, Any]:
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(f"GGUF tensor {name!r} is missing")
        shape = [int(x) for x in t.shape]
        k = shape[0]
        n = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        try:
            return _decode(t.tensor_type.name, t.data, n, k)
        except ValueError as e:
            raise ModelLoadError(f"GGUF tensor {name!r} is truncated or malformed") from e

    def vec(name: str) -> torch.Tensor:
        tag, val = get(name)
        if tag != "dense":
            raise ModelLoadError(f"GGUF tensor {name!r} must be F32/F16")
        return val.reshape(-1)  # type: ignore[no-any-return]

    def layer(i: int) -> LayerSpecs:
        b = f"blk.{i}."
        return LayerSpecs(
            attn_norm=vec(b + "attn_norm.weight"),
            q=_unpermute(_as_linear(get(b + "attn_q.weight"), quant), config.n_heads),
            k=_unpermute(_as_linear(get(b + "attn_k.weight"), quant), config.n_kv_heads),
            v=_as_linear(get(b + "attn_v.weight"), quant),
            o=_as_linear(get(b + "attn_output.weight"), quant),
            ffn_norm=vec(b + "ffn_norm.weight"),
            gate=_as_linear(get(b + "ffn_gate.weight"), quant),
            up=_as_linear(get(b + "ffn_up.weight"), quant),
            down=_as_linear(get(b + "ffn_down.weight"), quant),
        )

    # Lazily: the builder packs each layer before the next is decoded, which keeps the
    # unpacked codes (2x the packed size) of one layer alive at a time, not of the whole model.
    layers: Iterable[LayerSpecs] = (
        (layer(i) for i in range(config.n_layers)) if lazy else [layer(i) for i in range(config.n_layers)]
    )
    embed_raw = get("token_embd.weight")
    out_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    output = _as_linear(get(out_name) if out_name != "token_embd.weight" else embed_raw, quant)
    specs = LlamaSpecs(_as_embedding(embed_raw), layers, vec("output_norm.weight"), output)
    if "rope_freqs.weight" in tensors:
        factors = tuple(float(x) for x in vec("rope_freqs.weight"))
        config = _replace(config, rope_scaling_type="llama3", rope_freq_factors=factors)
    eos = {config.eos_token_id} if config.eos_token_id is not None else set()
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = _field(reader, key)
        if v is not None:
            eos.add(int(v))
    template = _field(reader, "tokenizer.chat_template")
    return GGUFModel(
        config=config,
        specs=specs,
        digest=_digest(reader),
        chat_template=str(template) if template is not None else None,
        eos_token_ids=frozenset(eos),
    )


def _replace(config: ModelConfig, **kw: Any) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, **kw)


def _config(reader: Any, arch: str) -> ModelConfig:
    a = arch + "."
    hidden = int(_require(reader, a + "embedding_length"))
    n_heads = int(_require(reader, a + "attention.head_count"))
    n_kv = int(_field(reader, a + "attention.head_count_kv", n_heads))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, a + "vocab_size")
    if vocab is None:
        if tokens is None:
            raise ModelLoadError("GGUF has neither a vocab size nor a token list")
        vocab = len(tokens.data)
    head_dim = int(_field(reader, a + "attention.key_length", hidden // n_heads))
    scaling = _field(reader, a + "rope.scaling.type")
    factor = float(_field(reader, a + "rope.scaling.factor", 1.0) or 1.0)
    if scaling in (None, "none") or factor == 1.0:
        scaling = None
    elif scaling != "linear":
        raise ModelLoadError(f"unsupported RoPE scaling {scaling!r}")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        n_layers=int(_require(reader, a + "block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        hidden=hidden,
        intermediate=int(_require(reader, a + "feed_forward_length")),
        vocab=int(vocab),
        head_dim=head_dim,
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(_require(reader, a + "context_length")),
        tied_output="output.weight" not in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_id=int(eos) if eos is not None else None,
        rope_scaling_type=scaling,
        rope_scaling_factor=factor,
    )


_TOKENIZER_RECORD = "veil-tokenizer.json"
_TOKENIZER_FORMAT = "veil/tokenizer-cache/v1"


def _tokenizer_record(entry: Path, digest: bytes) -> bytes:
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(entry.iterdir())
        if p.name != _TOKENIZER_RECORD
    }
    record = {"format": _TOKENIZER_FORMAT, "model_digest": digest.hex(), "files": files}
    return (json.dumps(record, sort_keys=True, indent=1) + "\n").encode()


def _tokenizer_entry_verifies(entry: Path, digest: bytes) -> bool:
    """Whether every file of the cache entry (and no other) has the hash its record names."""
    try:
        if any(not p.is_file() for p in entry.iterdir()):
            return False
        return (entry / _TOKENIZER_RECORD).read_bytes() == _tokenizer_record(entry, digest)
    except OSError:
        return False


def load_gguf_tokenizer(path: Path, digest: bytes, cache_dir: Path | None = None) -> Any:
    """The file's tokenizer (a transformers fast tokenizer), cached under ``cache_dir``, verified."""
    from transformers import AutoTokenizer

    tokenizers = (cache_dir or default_cache_dir()) / "tokenizers"
    cache = tokenizers / digest.hex()
    if cache.is_dir():
        if _tokenizer_entry_verifies(cache, digest):
            try:
                return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
            except (OSError, ValueError):
                pass  # unreadable although its hashes match: rebuild it below
        shutil.rmtree(cache, ignore_errors=True)  # tampered or damaged: never loaded
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # transformers raises many kinds on unsupported tokenizer metadata
        raise ModelLoadError(f"cannot build the tokenizer from {path.name} ({type(e).__name__})") from e
    tmp: Path | None = None
    try:
        tokenizers.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=tokenizers))
        tok.save_pretrained(str(tmp))
        (tmp / _TOKENIZER_RECORD).write_bytes(_tokenizer_record(tmp, digest))
        tmp.rename(cache)
    except OSError:  # caching is an optimisation; a read-only cache directory must not stop the load
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok
