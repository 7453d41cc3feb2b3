"""Read a Hugging Face Llama checkpoint folder (config.json + *.safetensors + tokenizer files).

Linear weights are quantized at load — int4 group 32 (``auto``/``int4``), per-channel int8
(``int8``) or kept as bf16 (``bf16``); the token embedding becomes block int8 (group 32, exact
enough for a lookup table and a quarter of fp32's size). Each file is read into memory once; the
weights are parsed from those bytes and the digest is computed over the same bytes:

    digest = SHA-256( for each file in sorted order: lp(name) ‖ lp(SHA-256(file bytes)) )

over ``config.json`` and every ``*.safetensors`` file, ``lp`` a 4-byte big-endian length prefix.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from veil.enclave.errors import ModelLoadError
from veil.enclave.model.config import ModelConfig
from veil.enclave.model.weights import BlockEmbedding, LayerSpecs, LlamaSpecs, Spec
from veil.kernels.quant_cpu import quantize_int4, quantize_int8

__all__ = ["SafetensorsModel", "read_safetensors"]

_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM"}


@dataclass(slots=True)
class SafetensorsModel:
    config: ModelConfig
    specs: LlamaSpecs
    digest: bytes
    tokenizer: Any
    chat_template: str | None
    eos_token_ids: frozenset[int]


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def _llama3_factors(rope: dict[str, Any], theta: float, head_dim: int) -> tuple[float, ...]:
    """Per-frequency divisors of Llama 3's RoPE scaling (same formula as transformers)."""
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    orig = float(rope["original_max_position_embeddings"])
    out = []
    for i in range(head_dim // 2):
        inv = 1.0 / theta ** (2 * i / head_dim)
        wavelen = 2 * math.pi / inv
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(inv / ((1 - smooth) * inv / factor + smooth * inv))
    return tuple(out)


def _config(cfg: dict[str, Any]) -> ModelConfig:
    archs = set(cfg.get("architectures") or [])
    if cfg.get("model_type") not in ("llama", "mistral") and not archs & _ARCHS:
        raise ModelLoadError(f"unsupported checkpoint architecture {cfg.get('model_type')!r}")
    try:
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type"))
        scaling: str | None = None
        factor = 1.0
        factors: tuple[float, ...] | None = None
        if kind == "linear":
            scaling, factor = "linear", float(rope["factor"])
        elif kind == "llama3":
            scaling, factor = "llama3", float(rope["factor"])
            factors = _llama3_factors(rope, theta, head_dim)
        elif kind not in (None, "default"):
            raise ModelLoadError(f"unsupported RoPE scaling {kind!r}")
        eos = cfg.get("eos_token_id")
        eos_first: Any = eos[0] if isinstance(eos, list) and eos else eos
        return ModelConfig(
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            head_dim=head_dim,
            rope_theta=theta,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_context=int(cfg.get("max_position_embeddings", 2048)),
            tied_output=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=int(eos_first) if eos_first is not None else None,
            rope_scaling_type=scaling,
            rope_scaling_factor=factor,
            rope_freq_factors=factors,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json is missing or has a bad field ({e})") from e


def _embedding(w: torch.Tensor, group: int = 32) -> BlockEmbedding:
    v, k = w.shape
    if k % group:
        return BlockEmbedding.dense(w)
    blocks = w.float().view(v, k // group, group)
    d = (blocks.abs().amax(dim=2) / 127.0).clamp_min(1e-12)
    codes = torch.round(blocks / d.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8).view(v, k)
    return BlockEmbedding(codes, d, None, group, 0.0)


def read_safetensors(folder: Path, *, quant: str = "auto") -> SafetensorsModel:
    """Parse ``folder``; quantize linear weights per ``quant``."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    cfg_path = folder / "config.json"
    files = sorted(folder.glob("*.safetensors"))
    if not cfg_path.is_file() or not files:
        raise ModelLoadError(f"{folder.name}: expected config.json and *.safetensors files")
    digest = hashlib.sha256()
    cfg_bytes = cfg_path.read_bytes()
    digest.update(_lp(b"config.json") + _lp(hashlib.sha256(cfg_bytes).digest()))
    try:
        cfg = json.loads(cfg_bytes)
    except ValueError as e:
        raise ModelLoadError("config.json is not valid JSON") from e
    config = _config(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        raw = f.read_bytes()
        digest.update(_lp(f.name.encode()) + _lp(hashlib.sha256(raw).digest()))
        try:
            tensors.update(load_bytes(raw))
        except SafetensorError as e:
            raise ModelLoadError(f"{f.name} is not a readable safetensors file") from e
        del raw

    def get(name: str) -> torch.Tensor:
        t = tensors.pop(name, None)
        if t is None:
            raise ModelLoadError(f"checkpoint tensor {name!r} is missing")
        return t.float()

    def lin(name: str) -> Spec:
        w = get(name)
        if quant == "int8":
            return quantize_int8(w)
        if quant == "bf16":
            return w
        return quantize_int4(w)

    layers = []
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerSpecs(
                attn_norm=get(p + "input_layernorm.weight"),
                q=lin(p + "self_attn.q_proj.weight"),
                k=lin(p + "self_attn.k_proj.weight"),
                v=lin(p + "self_attn.v_proj.weight"),
                o=lin(p + "self_attn.o_proj.weight"),
                ffn_norm=get(p + "post_attention_layernorm.weight"),
                gate=lin(p + "mlp.gate_proj.weight"),
                up=lin(p + "mlp.up_proj.weight"),
                down=lin(p + "mlp.down_proj.weight"),
            )
        )
    embed_w = get("model.embed_tokens.weight")
    if "lm_head.weight" in tensors:
        output = lin("lm_head.weight")
    else:
        tensors["lm_head.weight"] = embed_w
        output = lin("lm_head.weight")
        config = _tied(config)
    specs = LlamaSpecs(_embedding(embed_w), layers, get("model.norm.weight"), output)
    tokenizer, template = _tokenizer(folder)
    eos = {config.eos_token_id} if config.eos_token_id is not None else set()
    for src in (cfg, _json(folder / "generation_config.json")):
        found = src.get("eos_token_id")
        eos.update(
            int(x) for x in (found if isinstance(found, list) else [found] if found is not None else [])
        )
    return SafetensorsModel(config, specs, digest.digest(), tokenizer, template, frozenset(eos))


def _tied(config: ModelConfig) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, tied_output=True)


def _json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _tokenizer(folder: Path) -> tuple[Any, str | None]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a missing/broken tokenizer
        raise ModelLoadError(f"{folder.name}: no usable tokenizer files ({type(e).__name__})") from e
    template = getattr(tok, "chat_template", None)
    return tok, template if isinstance(template, str) else None
