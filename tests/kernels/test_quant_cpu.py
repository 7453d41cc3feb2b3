"""Quantized CPU linears: GGUF block mappings vs gguf's own dequantization, kernels vs references."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from veil.enclave.model.gguf_loader import _decode
from veil.kernels.quant_cpu import (
    COMPUTE_DTYPE,
    Int4Linear,
    Int4Spec,
    Int8Linear,
    quantize_int4,
    quantize_int8,
)
from veil.kernels.reference import int4_linear_reference, int8_linear_reference

EPS32 = 2.0**-24  # unit roundoff of fp32


@pytest.fixture(scope="module")
def reader(gguf_reader: Any) -> Any:
    return gguf_reader  # parsed once per session (tests/kernels/conftest.py)


def _tensor(reader: Any, name: str) -> Any:
    return next(t for t in reader.tensors if t.name == name)


def _rows_cols(t: Any) -> tuple[int, int]:
    k = int(t.shape[0])
    return int(np.prod([int(x) for x in t.shape[1:]])), k


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight"])
def test_q4_1_maps_onto_int4_group32(reader: Any, name: str) -> None:
    """Q4_1 ``q·d + m`` == int4 ``(q − 8)·scale + zero`` with ``scale = d``, ``zero = m + 8d``.

    In exact arithmetic both are the same number, and ``(q − 8)·d`` and ``q·d`` are exact in fp32
    (a 4-bit integer times an fp16). Our side rounds twice (``zero = m + 8d`` at load, then the
    final add) and gguf's once, each rounding ≤ u·|result| with u = 2⁻²⁴, so
    |ours − gguf| ≤ u·(|m + 8d| + 2·|w|) — asserted element-wise.
    """
    t = _tensor(reader, name)
    n, k = _rows_cols(t)
    assert t.tensor_type == GGMLQuantizationType.Q4_1
    tag, spec = _decode("Q4_1", t.data, n, k)
    assert tag == "int4" and isinstance(spec, Int4Spec)
    theirs = torch.from_numpy(dequantize(np.asarray(t.data), GGMLQuantizationType.Q4_1).astype(np.float32))
    theirs = theirs.reshape(n, k)
    # fp32: within the stated rounding bound
    ours = spec.dequantize()
    zero = spec.zero.repeat_interleave(32, 1)
    bound = EPS32 * (zero.abs() + 2.0 * theirs.abs())
    assert bool(((ours - theirs).abs() <= bound).all())


def test_q4_0_maps_onto_int4_with_zero_offset() -> None:
    """Q4_0 ``(q − 8)·d`` == int4 with ``scale = d``, ``zero = 0``: exact (one exact product)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType.Q4_0)
    tag, spec = _decode("Q4_0", raw, 64, 96)
    assert tag == "int4"
    theirs = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_0).astype(np.float32))
    assert torch.equal(spec.dequantize(), theirs)


def test_q8_0_blocks_exact(reader: Any) -> None:
    """Q8_0 rows decode to exactly ``q·d`` (an int8 times an fp16 is exact in fp32)."""
    from veil.enclave.model.gguf_loader import _as_embedding

    t = _tensor(reader, "token_embd.weight")
    n, k = _rows_cols(t)
    emb = _as_embedding(_decode("Q8_0", t.data, n, k))
    rows = torch.tensor([0, 1, 2, 100, 4095, 49151])
    theirs = dequantize(np.asarray(t.data)[rows.numpy()], GGMLQuantizationType.Q8_0).astype(np.float32)
    assert torch.equal(emb.lookup(rows), torch.from_numpy(theirs).reshape(len(rows), k))


def _random_int4(n: int, k: int, seed: int) -> Int4Spec:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // 32, generator=g) * 0.02 + 0.001
    zero = torch.randn(n, k // 32, generator=g) * 0.05
    return Int4Spec(codes, scale, zero, 32)


def _parity_bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Kernel vs fp32 reference: the output is rounded to bf16 (≤ 2⁻⁹·|y| relative) and the fp32
    accumulation order differs (≤ K·u·Σ|x||w|, generous)."""
    k = x.shape[1]
    return 2.0**-8 * ref.abs() + k * EPS32 * (x.float().abs() @ w.abs().t()) + 1e-30


@pytest.mark.parametrize(("m", "n", "k"), [(1, 960, 576), (7, 576, 1536), (33, 3072, 576), (1, 64, 64)])
def test_int4_kernel_matches_reference(m: int, n: int, k: int) -> None:
    spec = _random_int4(n, k, seed=m + n)
    lin = Int4Linear(spec)
    x = torch.randn(m, k).to(COMPUTE_DTYPE)
    got = lin(x).float()
    seen = spec.as_kernel_sees()
    ref = int4_linear_reference(x.float(), seen.codes, seen.scale.t(), seen.zero.t(), 32)
    bound = _parity_bound(x, seen.dequantize(), ref)
    assert got.shape == (m, n)
    assert bool(((got - ref).abs() <= bound).all()), float((got - ref).abs().max())


@pytest.mark.parametrize(("m", "n", "k"), [(1, 49152 // 16, 576), (5, 192, 576), (17, 576, 1536)])
def test_int8_kernel_matches_reference(m: int, n: int, k: int) -> None:
    w = torch.randn(n, k) * 0.05
    spec = quantize_int8(w)
    lin = Int8Linear(spec)
    x = torch.randn(m, k).to(COMPUTE_DTYPE)
    got = lin(x).float()
    seen = spec.as_kernel_sees()
    ref = int8_linear_reference(x.float(), seen.codes, seen.scale)
    bound = _parity_bound(x, seen.dequantize(), ref)
    assert bool(((got - ref).abs() <= bound).all()), float((got - ref).abs().max())


def test_quantizers_round_trip_within_half_a_step() -> None:
    w = torch.randn(128, 256)
    s4 = quantize_int4(w)
    step4 = s4.scale.repeat_interleave(32, 1)
    assert bool(((s4.dequantize() - w).abs() <= step4 / 2 + 1e-6).all())
    s8 = quantize_int8(w)
    assert bool(((s8.dequantize() - w).abs() <= s8.scale[:, None] / 2 + 1e-6).all())


def test_bf16_scales_loss_is_small(reader: Any) -> None:
    """Rounding Q4_1 scale/zero to bf16 (the kernel's dtype) moves each weight by far less than the
    Q4_1 quantization step itself: measured here on a real layer, bounded by a quarter step."""
    t = _tensor(reader, "blk.3.ffn_gate.weight")
    n, k = _rows_cols(t)
    _, spec = _decode("Q4_1", t.data, n, k)
    exact = spec.dequantize()
    seen = spec.as_kernel_sees().dequantize()
    step = spec.scale.repeat_interleave(32, 1)
    assert float(((seen - exact).abs() / step).max()) < 0.25
