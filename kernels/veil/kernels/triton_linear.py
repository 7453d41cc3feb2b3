"""GPU linear layers over the Triton matmuls, shaped like ``veil.kernels.quant_cpu``'s CPU layers.

Each class has ``in_features``, ``out_features``, ``nbytes`` and ``__call__(x) -> x @ Wᵀ`` (the
``QuantizedLinear`` protocol of the CPU path), so the CUDA runner can hold either kind. Builders take
the unpacked forms the loaders produce:

* :func:`w4a16_from_scale_zero` — int4 codes with the ``(q - 8) · scale + zero`` convention of
  PyTorch's int4pack ops (what ``quant_cpu.Int4Spec`` stores: GGUF Q4_1 has ``scale = d``,
  ``zero = m + 8d``; Q4_0 has ``zero = 0``), converted back to Q4_1's ``q · d + m`` with
  ``m = zero - 8 · scale``. For GGUF-sourced specs that subtraction is exact: ``zero`` was formed in
  fp32 from two fp16 numbers.
* :class:`Int8WeightOnlyLinear` from int8 codes and per-channel or per-group scales.
* :class:`DenseCudaLinear` for 16-bit weights (``torch.nn.functional.linear``).
"""

from __future__ import annotations

import torch

from veil.kernels.errors import KernelInputError
from veil.kernels.triton_int8 import Int8Weight, int8_matmul, repack_int8
from veil.kernels.triton_w4a16 import W4A16Weight, repack_q4_1, w4a16_matmul

__all__ = ["DenseCudaLinear", "Int8WeightOnlyLinear", "W4A16Linear", "w4a16_from_scale_zero"]


def w4a16_from_scale_zero(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = 32
) -> W4A16Weight:
    """Repack int4 ``codes [N, K]`` with ``scale, zero [N, K / 32]`` in the ``(q - 8)·scale + zero`` form."""
    if group_size != 32:
        raise KernelInputError(f"the w4a16 kernels take group size 32 (GGUF Q4_x), got {group_size}")
    d = scale.float()
    return repack_q4_1(codes, d, zero.float() - 8.0 * d)


class W4A16Linear:
    """``x @ Wᵀ`` with a repacked Q4_1 weight (split-K GEMV up to 16 rows, GEMM above)."""

    __slots__ = ("in_features", "out_features", "weight")

    def __init__(self, weight: W4A16Weight) -> None:
        self.weight = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_matmul(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class Int8WeightOnlyLinear:
    """``x @ Wᵀ`` with int8 weights and fp16 scales per output channel or per group of 32+."""

    __slots__ = ("in_features", "out_features", "weight")

    def __init__(self, weight: Int8Weight) -> None:
        self.weight = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features

    @staticmethod
    def from_codes(codes: torch.Tensor, scale: torch.Tensor) -> Int8WeightOnlyLinear:
        """``codes`` int8 ``[N, K]``; ``scale`` ``[N]`` (per channel) or ``[N, K / G]`` (per group)."""
        return Int8WeightOnlyLinear(repack_int8(codes, scale[:, None] if scale.dim() == 1 else scale))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class DenseCudaLinear:
    """A 16-bit weight ``[N, K]``; computes in the weight's dtype."""

    __slots__ = ("in_features", "out_features", "weight")

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise KernelInputError(f"weight must be [N, K], got {tuple(weight.shape)}")
        self.weight = weight.contiguous()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
