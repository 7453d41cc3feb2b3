"""GPU linear layers: the int4 (q - 8)·scale + zero convention converts exactly to Q4_1's q·d + m."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from veil.kernels.errors import KernelInputError
from veil.kernels.quant_cpu import quantize_int4, quantize_int8
from veil.kernels.reference import dequantize_int4
from veil.kernels.reference_gpu import dequantize_w4a16_packed
from veil.kernels.triton_linear import (
    DenseCudaLinear,
    Int8WeightOnlyLinear,
    W4A16Linear,
    w4a16_from_scale_zero,
)


def test_scale_zero_convention_round_trips_gguf_q4_1() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 64), generator=g, dtype=torch.uint8)
    d = (torch.rand(24, 2, generator=g) * 0.05).half().float()
    m = (-torch.rand(24, 2, generator=g)).half().float()
    zero = m + 8.0 * d  # what the GGUF loader stores for Q4_1
    w = w4a16_from_scale_zero(codes, d, zero)
    expected = dequantize_int4(codes, d.t(), zero.t(), 32)
    assert torch.equal(dequantize_w4a16_packed(w.qweight, w.scales, w.mins), expected)
    with pytest.raises(KernelInputError):
        w4a16_from_scale_zero(codes, d, zero, group_size=64)


def test_linears_match_the_dense_weight(kernel_device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 64, generator=g) * 0.1
    x = torch.randn(3, 64, generator=g).to(kernel_device)
    spec4 = quantize_int4(weight)
    spec8 = quantize_int8(weight)
    lin4 = W4A16Linear(w4a16_from_scale_zero(spec4.codes, spec4.scale, spec4.zero).to(kernel_device))
    lin8 = Int8WeightOnlyLinear.from_codes(spec8.codes, spec8.scale)
    lin8 = Int8WeightOnlyLinear(lin8.weight.to(kernel_device))
    dense = DenseCudaLinear(weight.to(kernel_device))
    for lin, w in ((lin4, spec4.dequantize()), (lin8, spec8.dequantize()), (dense, weight)):
        assert (lin.in_features, lin.out_features) == (64, 40) and lin.nbytes > 0
        # int8 scales are stored in fp16, so allow their rounding
        torch.testing.assert_close(lin(x), x @ w.to(kernel_device).t(), atol=2e-3, rtol=2e-3)
