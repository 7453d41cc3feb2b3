"""int8 weight-only Triton matmul against its PyTorch reference (per-channel and group-32 / GGUF Q8_0)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from veil.kernels.errors import KernelInputError
from veil.kernels.reference_gpu import dequantize_int8_packed, int8_matmul_ref
from veil.kernels.triton_int8 import (
    Int8Weight,
    int8_gemm,
    int8_gemv,
    int8_matmul,
    quantize_int8,
    repack_int8,
    repack_q8_0_bytes,
)
from veil.kernels.triton_w4a16 import MatmulConfig

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def _layer(n: int, k: int, group: int | None, device: torch.device, seed: int = 0) -> Int8Weight:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    return quantize_int8(weight, group).to(device)


def test_quantize_error_is_within_half_a_step() -> None:
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    for group in (None, 32):
        w = quantize_int8(weight, group)
        step = w.scales.float().t().repeat_interleave(128 if group is None else group, dim=1)
        err = (dequantize_int8_packed(w.qweight, w.scales) - weight).abs()
        assert bool((err <= step * 0.5 + 1e-3 * step).all())
        assert w.group_size == (128 if group is None else 32)


def test_q8_0_bytes_from_the_real_gguf_embedding(gguf_reader: Any) -> None:
    gguf = pytest.importorskip("gguf")
    reader = gguf_reader
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    k = int(tensor.shape[0])
    rows = tensor.data[:64]  # the first 64 token rows are enough to check the decoding
    w = repack_q8_0_bytes(torch.from_numpy(rows.copy()).reshape(-1), 64, k)
    expected = torch.from_numpy(gguf.quants.dequantize(rows, tensor.tensor_type)).float()
    torch.testing.assert_close(dequantize_int8_packed(w.qweight, w.scales), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_matches_reference(
    m: int, dtype: torch.dtype, group: int | None, kernel_device: torch.device
) -> None:
    w = _layer(40, 160, group, kernel_device, seed=m)  # tail tile in N, K ends mid-block, 3 splits
    x = torch.randn(m, 160, generator=torch.Generator().manual_seed(m)).to(kernel_device, dtype)
    out = int8_gemv(x, w, MatmulConfig(16, 32, 64, split_k=3))
    assert out.shape == (m, 40) and out.dtype == dtype
    _assert_close(out, int8_matmul_ref(x, w.qweight, w.scales))


@pytest.mark.parametrize("group", [None, 32])
def test_gemm_matches_reference(group: int | None, kernel_device: torch.device) -> None:
    w = _layer(72, 96, group, kernel_device, seed=4)
    x = torch.randn(33, 96, generator=torch.Generator().manual_seed(4)).to(kernel_device, torch.float16)
    _assert_close(int8_gemm(x, w, MatmulConfig(16, 32, 32)), int8_matmul_ref(x, w.qweight, w.scales))


def test_dispatcher_and_default_configs(kernel_device: torch.device) -> None:
    w = _layer(48, 64, 32, kernel_device, seed=6)
    for rows in (1, 3, 20):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(kernel_device)
        _assert_close(int8_matmul(x, w), int8_matmul_ref(x, w.qweight, w.scales))


def test_inputs_are_checked(kernel_device: torch.device) -> None:
    with pytest.raises(KernelInputError):
        repack_int8(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3))  # 3 groups do not divide 64
    with pytest.raises(KernelInputError):
        repack_int8(torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 4))  # group 24 is not a power of two
    with pytest.raises(KernelInputError):
        quantize_int8(torch.zeros(4, 64), 48)
    with pytest.raises(KernelInputError):
        repack_q8_0_bytes(torch.zeros(33, dtype=torch.uint8), 1, 32)
    w = _layer(16, 64, 32, kernel_device)
    with pytest.raises(KernelInputError):
        int8_gemv(torch.zeros(1, 64, device=kernel_device), w, MatmulConfig(1, 16, 16))  # block_k < group


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (49152, 576)])
def test_gpu_shapes(
    m: int, shape: tuple[int, int], group: int | None, dtype: torch.dtype, cuda_device: torch.device
) -> None:
    n, k = shape
    w = _layer(n, k, group, cuda_device, seed=n)
    x = torch.randn(m, k, device=cuda_device, dtype=dtype)
    ref = int8_matmul_ref(x, w.qweight, w.scales)
    scale = ref.float().abs().max().item()
    atol = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(int8_matmul(x, w).float() / scale, ref.float() / scale, atol=atol, rtol=0)
