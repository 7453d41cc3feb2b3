"""Plain-PyTorch references for the quantized CPU kernels in :mod:`veil.kernels.quant_cpu`.

Each function here spells out, with ordinary tensor ops in fp32, what the fast kernel computes:

* int4, group-wise: ``w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]`` with ``g = k // group``
  (the convention of ``torch.ops.aten._weight_int4pack_mm_for_cpu``).
* int8, per output channel: ``w[n, k] = q[n, k] * scale[n]`` (``_weight_int8pack_mm``).

They are used by the parity tests and by the model's fp32 reference path.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_int4", "dequantize_int8", "int4_linear_reference", "int8_linear_reference"]


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Unpacked int4 codes ``q`` [N, K] (0..15), ``scale``/``zero`` [K // group, N] → fp32 weight [N, K]."""
    k = q.shape[1]
    s = scale.float().t().repeat_interleave(group_size, dim=1)[:, :k]
    z = zero.float().t().repeat_interleave(group_size, dim=1)[:, :k]
    return (q.float() - 8.0) * s + z


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes ``q`` [N, K] and per-channel ``scale`` [N] → fp32 weight [N, K]."""
    return q.float() * scale.float()[:, None]


def int4_linear_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x @ W.T`` in fp32 with ``W`` dequantized by :func:`dequantize_int4`."""
    return x.float() @ dequantize_int4(q, scale, zero, group_size).t()


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in fp32 with ``W`` dequantized by :func:`dequantize_int8`."""
    return x.float() @ dequantize_int8(q, scale).t()
