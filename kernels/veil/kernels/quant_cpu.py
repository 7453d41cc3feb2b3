"""Weight-only quantized linear layers for the CPU, over PyTorch's packed int4 / int8 ops.

Why this layout
---------------
Decoding one token of a small Llama reads every weight once, so the step is bound by memory
bandwidth and by per-op overhead, not by FLOPs. Weights therefore stay quantized in memory and
are expanded inside the matmul kernel:

* **int4, group 32** — ``torch.ops.aten._weight_int4pack_mm_for_cpu``. PyTorch dequantizes
  ``(q - 8) * scale + zero`` per group of 32 input features. GGUF ``Q4_1`` stores ``q * d + m``, so
  ``scale = d`` and ``zero = m + 8 d`` reproduce it; ``Q4_0`` stores ``(q - 8) * d``, so
  ``zero = 0``. The weight is packed once at load by ``_convert_weight_to_int4pack_for_cpu``
  (two codes per byte, the op's own tiling).
* **int8, per output channel** — ``torch.ops.aten._weight_int8pack_mm``.
* **dense** — an ordinary ``linear`` (bf16 or fp32 weight), for small or unquantized tensors.

PyTorch's fast CPU paths for both ops take **bf16 activations**, and the scale/zero tensor must
have the activation's dtype; the fp32 and fp16 variants fall back to a scalar loop that is 50×
slower. So activations enter these layers as bf16 and scales are rounded to bf16 (relative error
≤ 2⁻⁹). The model keeps norms, the residual stream and the logits in fp32; the tests bound the
effect against an fp32 reference. Each class has an fp32 twin in :mod:`veil.kernels.reference`.

Where Veil's own kernels (:mod:`veil.kernels.cpu_ext`, AVX-512 BF16) are available,
:func:`pack_linear` uses :class:`PackedLinear` instead for every block-quantized weight: the
file's codes and fp16 (or fp32) scales, computed exactly — no bf16 scales — at about twice the
speed, with fp32 outputs. The PyTorch classes remain the fallback on other CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from veil.kernels import cpu_ext
from veil.kernels.reference import dequantize_int4, dequantize_int8

__all__ = [
    "COMPUTE_DTYPE",
    "DenseLinear",
    "Int4Linear",
    "Int4Spec",
    "Int8Linear",
    "Int8Spec",
    "PackedLinear",
    "Q8BlockSpec",
    "Q8PairLinear",
    "QuantizedLinear",
    "effective_weight",
    "pack_linear",
    "quantize_int4",
    "quantize_int8",
]

COMPUTE_DTYPE = torch.bfloat16
"""Activation dtype the fast CPU kernels take."""


class QuantizedLinear(Protocol):
    """``y = x @ W.T`` for ``x`` [M, in_features] in :data:`COMPUTE_DTYPE`."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(slots=True)
class Int4Spec:
    """Unpacked int4 weight: codes [N, K] in 0..15; scale, zero [N, K // group] fp32."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int = 32

    @staticmethod
    def concat(specs: list[Int4Spec]) -> Int4Spec:
        """Stack along the output dimension (fuses Q/K/V or gate/up into one matmul)."""
        return Int4Spec(
            torch.cat([s.codes for s in specs]),
            torch.cat([s.scale for s in specs]),
            torch.cat([s.zero for s in specs]),
            specs[0].group_size,
        )

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.codes, self.scale.t(), self.zero.t(), self.group_size)

    def kernel_scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scale, zero [N, K // group] in the kernel's dtype, with the zero error-compensated.

        Rounding ``scale`` to bf16 shifts every weight of a group by ``(q − 8)·δscale``; choosing
        ``zero' = bf16(zero + mean(q − 8)·δscale)`` cancels the mean of that shift over the group
        (least squares for a fixed scale), roughly halving the weight error bf16 scales cause.
        """
        s = self.scale.to(COMPUTE_DTYPE)
        n, k = self.codes.shape
        sums = self.codes.view(n, k // self.group_size, self.group_size).sum(-1, dtype=torch.int32)
        mean_q = sums.float() / self.group_size - 8.0
        z = (self.zero + mean_q * (self.scale - s.float())).to(COMPUTE_DTYPE)
        return s, z

    def as_kernel_sees(self) -> Int4Spec:
        """The same spec with scale and zero as the kernel holds them."""
        s, z = self.kernel_scale_zero()
        return Int4Spec(self.codes, s.float(), z.float(), self.group_size)


@dataclass(slots=True)
class Int8Spec:
    """int8 weight: codes [N, K]; per-output-channel scale [N] fp32."""

    codes: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def concat(specs: list[Int8Spec]) -> Int8Spec:
        return Int8Spec(torch.cat([s.codes for s in specs]), torch.cat([s.scale for s in specs]))

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.codes, self.scale)

    def as_kernel_sees(self) -> Int8Spec:
        return Int8Spec(self.codes, self.scale.to(COMPUTE_DTYPE).float())


@dataclass(slots=True)
class Q8BlockSpec:
    """GGUF Q8_0 kept exact: int8 codes [N, K], one scale per block of 32 [N, K // 32] fp32.

    ``_weight_int8pack_mm`` has one scale per output channel, so block scales do not fit it. They
    do fit the int4 kernel twice over: with ``q = 16·hi + lo`` (``hi`` ∈ [−8, 7], ``lo`` ∈ [0, 15]),
    ``q·d = (hi + 8 − 8)·16d + 0  +  (lo − 8)·d + 8d``, i.e. two int4 groups per block. Laying both
    halves side by side along K and feeding ``[x, x]`` gives ``x·Wᵀ`` in one int4 matmul reading
    1.25 bytes per weight (int8 would read 1) with no requantization error.
    """

    codes: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def concat(specs: list[Q8BlockSpec]) -> Q8BlockSpec:
        return Q8BlockSpec(torch.cat([s.codes for s in specs]), torch.cat([s.scale for s in specs]))

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        return (self.codes.float().view(n, k // 32, 32) * self.scale.unsqueeze(-1)).view(n, k)

    def as_int4_pair(self) -> Int4Spec:
        c = self.codes  # int8; >> is an arithmetic shift (floor division by 16), & 15 the remainder
        codes = torch.cat([(c >> 4) + 8, c & 15], dim=1).view(torch.uint8)
        d = self.scale
        return Int4Spec(codes, torch.cat([16.0 * d, d], 1), torch.cat([torch.zeros_like(d), 8.0 * d], 1), 32)

    def kernel_weight(self) -> torch.Tensor:
        """The effective fp32 weight [N, K] the pair kernel computes with."""
        pair = self.as_int4_pair().as_kernel_sees().dequantize()
        k = self.codes.shape[1]
        return pair[:, :k] + pair[:, k:]


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> Int4Spec:
    """Asymmetric min/max int4 quantization per group of ``group_size`` input features."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo = w.amin(dim=2)
    hi = w.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return Int4Spec(codes.reshape(n, k), scale, lo + 8.0 * scale, group_size)


def quantize_int8(weight: torch.Tensor) -> Int8Spec:
    """Symmetric per-output-channel int8 quantization."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Spec(codes, scale)


class Int4Linear:
    """Group-wise int4 weight packed for ``_weight_int4pack_mm_for_cpu``."""

    __slots__ = ("group_size", "in_features", "out_features", "packed", "scale_zero")

    def __init__(self, spec: Int4Spec) -> None:
        n, k = spec.codes.shape
        if k % spec.group_size or spec.scale.shape != (n, k // spec.group_size):
            raise ValueError(f"int4 weight {n}x{k} does not fit group {spec.group_size}")  # internal
        self.out_features, self.in_features, self.group_size = n, k, spec.group_size
        # Packed in row chunks (the layout is row-separable; chunks of 1024 are multiples of the
        # op's 64-row tile) so the int32 staging copy stays small.
        self.packed = torch.cat(
            [
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    spec.codes[i : i + 1024].to(torch.int32), 1
                )
                for i in range(0, n, 1024)
            ]
        )
        # [K // group, N, 2]: (scale, zero) per group and output channel.
        s, z = spec.kernel_scale_zero()
        self.scale_zero = torch.stack([s.t(), z.t()], dim=2).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scale_zero
        )
        return out

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2


class Q8PairLinear:
    """Exact Q8_0 weight computed as one int4 matmul over ``[x, x]`` (see :class:`Q8BlockSpec`)."""

    __slots__ = ("in_features", "inner", "out_features")

    def __init__(self, spec: Q8BlockSpec) -> None:
        self.inner = Int4Linear(spec.as_int4_pair())
        self.out_features, self.in_features = spec.codes.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.cat([x, x], dim=1))

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


class Int8Linear:
    """Per-channel int8 weight for ``_weight_int8pack_mm``."""

    __slots__ = ("codes", "in_features", "out_features", "scale")

    def __init__(self, spec: Int8Spec) -> None:
        self.out_features, self.in_features = spec.codes.shape
        self.codes = spec.codes.contiguous()
        self.scale = spec.scale.to(COMPUTE_DTYPE).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scale)
        return out

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 2


class DenseLinear:
    """An unquantized weight [N, K]; the compute dtype follows the weight's dtype."""

    __slots__ = ("in_features", "out_features", "weight")

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class PackedLinear:
    """A block-quantized weight for Veil's AVX-512 BF16 kernel: ``x`` bf16 → fp32, exact.

    Q4 records hold ``w = d·q + m`` (GGUF Q4_1; Q4_0 is ``m = −8d``), Q8 records ``w = d·q``
    (GGUF Q8_0; per-channel int8 repeats the channel scale in every group). Scales are stored as
    fp16 when every one survives the round trip (always, for GGUF's own fp16 scales), else fp32.
    """

    __slots__ = ("f16", "in_features", "kind", "out_features", "packed")

    def __init__(
        self, packed: torch.Tensor, kind: int, f16: bool, out_features: int, in_features: int
    ) -> None:
        self.packed, self.kind, self.f16 = packed, kind, f16
        self.out_features, self.in_features = out_features, in_features

    @staticmethod
    def from_int4(spec: Int4Spec) -> PackedLinear:
        n, k = spec.codes.shape
        if spec.group_size != 32 or k % 32:
            raise ValueError(f"int4 weight {n}x{k} group {spec.group_size}: the kernel takes groups of 32")
        d = spec.scale.float()
        m = (spec.zero.double() - 8.0 * spec.scale.double()).float()  # (q − 8)·s + z = s·q + (z − 8s)
        f16 = cpu_ext.fp16_exact(d, m)
        return PackedLinear(cpu_ext.pack_q4(spec.codes, d, m, f16), cpu_ext.KIND_Q4, f16, n, k)

    @staticmethod
    def from_q8(codes: torch.Tensor, scale: torch.Tensor) -> PackedLinear:
        """``codes`` int8 [N, K], ``scale`` [N, K // 32]."""
        n, k = codes.shape
        f16 = cpu_ext.fp16_exact(scale)
        return PackedLinear(cpu_ext.pack_q8(codes, scale.float(), f16), cpu_ext.KIND_Q8, f16, n, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_ext.qmm(_bf16_rows(x), self.packed, self.kind, self.f16, self.out_features)

    def add_(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """``out += x @ Wᵀ`` in place, ``out`` fp32 [M, out_features] (a fused residual add)."""
        cpu_ext.qmm_add_(out, _bf16_rows(x), self.packed, self.kind, self.f16)

    @property
    def nbytes(self) -> int:
        return self.packed.numel()


def _bf16_rows(x: torch.Tensor) -> torch.Tensor:
    x = x if x.dtype == COMPUTE_DTYPE else x.to(COMPUTE_DTYPE)
    return x if x.stride(-1) == 1 else x.contiguous()


def pack_linear(spec: Int4Spec | Int8Spec | Q8BlockSpec) -> QuantizedLinear:
    """The fastest exact kernel for ``spec`` on this CPU."""
    if cpu_ext.available():
        if isinstance(spec, Int4Spec) and spec.group_size == 32:
            return PackedLinear.from_int4(spec)
        if isinstance(spec, Q8BlockSpec):
            return PackedLinear.from_q8(spec.codes, spec.scale)
        if isinstance(spec, Int8Spec) and spec.codes.shape[1] % 32 == 0:
            k = spec.codes.shape[1]
            return PackedLinear.from_q8(spec.codes, spec.scale.float()[:, None].expand(-1, k // 32))
    if isinstance(spec, Int4Spec):
        return Int4Linear(spec)
    if isinstance(spec, Int8Spec):
        return Int8Linear(spec)
    return Q8PairLinear(spec)


def effective_weight(spec: Int4Spec | Int8Spec | Q8BlockSpec) -> torch.Tensor:
    """The dense fp32 weight [N, K] that :func:`pack_linear`'s kernel computes with."""
    if cpu_ext.available():
        return spec.dequantize()
    if isinstance(spec, Q8BlockSpec):
        return spec.kernel_weight()
    return spec.as_kernel_sees().dequantize()
