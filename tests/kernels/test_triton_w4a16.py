"""w4a16 (GGUF Q4_1) Triton matmul against its PyTorch reference: repack, GEMV split-K, GEMM, dispatcher."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from veil.kernels.errors import KernelInputError
from veil.kernels.reference_gpu import dequantize_q4_1, dequantize_w4a16_packed, w4a16_matmul_ref
from veil.kernels.triton_w4a16 import (
    MatmulConfig,
    W4A16Weight,
    repack_q4_1,
    repack_q4_1_bytes,
    unpack_q4_1_bytes,
    w4a16_gemm,
    w4a16_gemv,
    w4a16_matmul,
)

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}


def _random_q4_1(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 0.05 + 0.005).half()
    m = (-torch.rand(n, k // 32, generator=g) * 0.4).half()
    return q, d, m


def _to_gguf_bytes(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Encode (q, d, m) as GGUF Q4_1 blocks: d, m (fp16 LE), then qs[j] = q[j] | q[j + 16] << 4."""
    n, k = q.shape
    blocks = q.reshape(n, k // 32, 32)
    qs = blocks[..., :16] | (blocks[..., 16:] << 4)
    head = torch.stack((d, m), dim=-1).contiguous().view(torch.uint8).reshape(n, k // 32, 4)
    return torch.cat((head, qs), dim=-1).reshape(-1).contiguous()


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------- repack


def test_repack_roundtrip_matches_q4_1_definition() -> None:
    q, d, m = _random_q4_1(24, 96)
    w = repack_q4_1(q, d, m)
    assert w.qweight.dtype == torch.int32 and w.qweight.shape == (12, 24)
    assert w.scales.shape == w.mins.shape == (3, 24)
    assert torch.equal(dequantize_w4a16_packed(w.qweight, w.scales, w.mins), dequantize_q4_1(q, d, m))
    # Nibble order: word (r, n) holds q[n, 8r + j] at bits 4j (the top nibble sets the sign bit).
    word = int(w.qweight[1, 5]) & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == q[5, 8:16].tolist()


def test_unpack_gguf_bytes_inverts_the_block_encoding() -> None:
    q, d, m = _random_q4_1(8, 64, seed=3)
    raw = _to_gguf_bytes(q, d, m)
    assert raw.numel() == 8 * 2 * 20
    q2, d2, m2 = unpack_q4_1_bytes(raw, 8, 64)
    assert torch.equal(q2, q) and torch.equal(d2, d) and torch.equal(m2, m)
    w = repack_q4_1_bytes(raw, 8, 64)
    assert torch.equal(dequantize_w4a16_packed(w.qweight, w.scales, w.mins), dequantize_q4_1(q, d, m))


def test_repack_of_real_gguf_tensor_matches_gguf_dequantize(gguf_reader: Any) -> None:
    gguf = pytest.importorskip("gguf")
    reader = gguf_reader
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    k, n = (int(x) for x in tensor.shape)  # GGUF lists ne0 (K, the contiguous dim) first
    raw = torch.from_numpy(tensor.data.copy()).reshape(-1)
    w = repack_q4_1_bytes(raw, n, k)
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).float()
    assert expected.shape == (n, k)
    torch.testing.assert_close(
        dequantize_w4a16_packed(w.qweight, w.scales, w.mins), expected, atol=1e-6, rtol=0
    )


def test_real_gguf_layer_gemv(gguf_reader: Any, kernel_device: torch.device) -> None:
    gguf = pytest.importorskip("gguf")
    reader = gguf_reader
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    k, n = (int(x) for x in tensor.shape)
    w = repack_q4_1_bytes(torch.from_numpy(tensor.data.copy()).reshape(-1), n, k).to(kernel_device)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    expected = x.float() @ torch.from_numpy(
        gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    ).float().t().to(x)
    _assert_close(w4a16_matmul(x, w), expected)


@pytest.mark.parametrize(
    ("shape", "why"),
    [((8, 48), "K not a multiple of 32"), ((0, 64), "no rows"), ((8, 0), "no columns")],
)
def test_repack_rejects_bad_shapes(shape: tuple[int, int], why: str) -> None:
    n, k = shape
    with pytest.raises(KernelInputError):
        repack_q4_1(torch.zeros(n, k, dtype=torch.uint8), torch.zeros(n, k // 32), torch.zeros(n, k // 32))


def test_repack_rejects_out_of_range_and_wrong_byte_counts() -> None:
    q, d, m = _random_q4_1(4, 32)
    with pytest.raises(KernelInputError):
        repack_q4_1(q.to(torch.int16) + 1, d, m)  # 16 appears
    with pytest.raises(KernelInputError):
        repack_q4_1(q, d[:, :0], m)
    with pytest.raises(KernelInputError):
        unpack_q4_1_bytes(torch.zeros(79, dtype=torch.uint8), 4, 32)


# -------------------------------------------------------------------------------------------- kernels


def _layer(n: int, k: int, device: torch.device, seed: int = 0) -> W4A16Weight:
    return repack_q4_1(*_random_q4_1(n, k, seed)).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_matches_reference(
    m: int, split_k: int, dtype: torch.dtype, kernel_device: torch.device
) -> None:
    # N = 40 leaves a tail tile of 8 columns. K = 320 is 10 groups; with 64-wide K blocks (one row) it is
    # 5 steps split 2/2/1, with 128-wide blocks (several rows: tl.dot per nibble slab) 3 steps whose last
    # ends mid-block.
    block_k = 64 if m == 1 else 128
    w = _layer(40, 320, kernel_device, seed=m)
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)).to(kernel_device, dtype)
    out = w4a16_gemv(x, w, MatmulConfig(16, 32, block_k, split_k=split_k))
    assert out.shape == (m, 40) and out.dtype == dtype
    _assert_close(out, w4a16_matmul_ref(x, w.qweight, w.scales, w.mins))


@pytest.mark.parametrize("block_k", [32, 128])
def test_gemv_group_boundaries(block_k: int, kernel_device: torch.device) -> None:
    # One group per K block (32) and four groups per block (128, K = 96 is less than one block).
    n, k = 24, 96
    q, d, m = _random_q4_1(n, k, seed=7)
    d[:, 1] = 0.5  # make a group boundary visible: group 1's scale is far from its neighbours
    m[:, 2] = 3.0
    w = repack_q4_1(q, d, m).to(kernel_device)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    out = w4a16_gemv(x, w, MatmulConfig(1, 16, block_k, split_k=2))
    _assert_close(out, w4a16_matmul_ref(x, w.qweight, w.scales, w.mins))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [17, 40])
def test_gemm_matches_reference(m: int, dtype: torch.dtype, kernel_device: torch.device) -> None:
    w = _layer(72, 96, kernel_device, seed=m)
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).to(kernel_device, dtype)
    out = w4a16_gemm(x, w, MatmulConfig(16, 32, 64, group_m=2))
    _assert_close(out, w4a16_matmul_ref(x, w.qweight, w.scales, w.mins))


def test_dispatcher_handles_leading_dims_and_default_configs(kernel_device: torch.device) -> None:
    w = _layer(40, 64, kernel_device, seed=5)
    for shape in [(1, 64), (2, 3, 64), (20, 64)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(kernel_device)
        out = w4a16_matmul(x, w)
        assert out.shape == (*shape[:-1], 40)
        ref = w4a16_matmul_ref(x.reshape(-1, 64), w.qweight, w.scales, w.mins).reshape(out.shape)
        _assert_close(out, ref)
    assert w4a16_matmul(torch.zeros(0, 64, device=kernel_device), w).shape == (0, 40)


def test_gemv_is_deterministic_with_split_k(kernel_device: torch.device) -> None:
    w = _layer(32, 512, kernel_device, seed=9)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(9)).to(kernel_device)
    cfg = MatmulConfig(16, 32, 128, split_k=4)
    a = w4a16_gemv(x, w, cfg)
    # Partials are summed in a fixed order (no atomics), so a rerun is bit-identical.
    assert torch.equal(a, w4a16_gemv(x, w, cfg))
    _assert_close(a, w4a16_matmul_ref(x, w.qweight, w.scales, w.mins))


def test_inputs_are_checked(kernel_device: torch.device) -> None:
    w = _layer(16, 64, kernel_device)
    with pytest.raises(KernelInputError):
        w4a16_matmul(torch.zeros(2, 32, device=kernel_device), w)
    with pytest.raises(KernelInputError):
        w4a16_matmul(torch.zeros(2, 64, dtype=torch.int32, device=kernel_device), w)
    with pytest.raises(KernelInputError):
        w4a16_gemv(torch.zeros(17, 64, device=kernel_device), w)
    with pytest.raises(KernelInputError):
        w4a16_gemv(torch.zeros(1, 64, device=kernel_device), w, MatmulConfig(1, 16, 48))
    with pytest.raises(KernelInputError):  # several rows need 16-deep nibble slabs for tl.dot
        w4a16_gemv(torch.zeros(2, 64, device=kernel_device), w, MatmulConfig(16, 16, 64))


# ------------------------------------------------------------------------------------------------ GPU


@functools.cache
def _gpu_layer(n: int, k: int) -> W4A16Weight:
    """Repacked once per shape (repacking a 14336 × 4096 layer on the host takes a while)."""
    return _layer(n, k, torch.device("cuda"), seed=n + k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 16, 200])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (14336, 4096), (4096, 14336), (4000, 4128)])
def test_gpu_llama_shapes(m: int, n: int, k: int, dtype: torch.dtype, cuda_device: torch.device) -> None:
    w = _gpu_layer(n, k)
    x = torch.randn(m, k, device=cuda_device, dtype=dtype)
    ref = w4a16_matmul_ref(x, w.qweight, w.scales, w.mins)
    out = w4a16_matmul(x, w)
    # Outputs reach |y| ~ 100 over K = 14336; compare relative to the output scale.
    scale = ref.float().abs().max().item()
    atol = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out.float() / scale, ref.float() / scale, atol=atol, rtol=0)
