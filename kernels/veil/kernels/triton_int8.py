# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped pointer/scalar parameters; annotations would change their specialization.)
"""int8 weight-only matmul: fp16/bf16 activations × int8 weights with a scale per group, fp32 accumulation.

``y[M, N] = x[M, K] @ W[N, K]ᵀ`` with ``W[n, k] = q[n, k] · s[n, k // G]`` (symmetric, no offset).
``G`` is the group size along K: 32 for GGUF Q8_0 (:func:`repack_q8_0_bytes`), or ``K`` itself for
per-output-channel scales (:func:`quantize_int8`, used when a 16-bit checkpoint is quantized at load).

Layout (why): ``qweight`` int8 ``[K, N]`` and ``scales`` fp16 ``[K // G, N]``, both N-contiguous, for
the reason given in ``triton_w4a16``: a program owning ``BLOCK_N`` output columns reads each K row of
its tile as one run of consecutive bytes. With per-channel scales the scale is applied once to the fp32
accumulator after the K loop instead of to every weight.

The same two shapes as w4a16: a split-K GEMV for decode (``M ≤ 16``, deterministic fp32 partial sums)
and a tiled GEMM for prefill, chosen by :func:`int8_matmul`. Launch sizes are untimed starting points
(``bench/kernels.py`` sweeps them on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from veil.kernels.errors import KernelInputError
from veil.kernels.triton_common import (
    check_device,
    interpreter_block_n,
    next_power_of_2,
    pick_split,
    sm_count,
)
from veil.kernels.triton_w4a16 import GEMV_MAX_M, MatmulConfig

__all__ = [
    "Q8_0_BLOCK_BYTES",
    "Int8Weight",
    "int8_gemm",
    "int8_gemv",
    "int8_matmul",
    "quantize_int8",
    "repack_int8",
    "repack_q8_0_bytes",
]

Q8_0_BLOCK_BYTES = 34  # fp16 d + 32 int8


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """An int8 weight of a ``Linear(K, N)``: ``qweight`` int8 ``[K, N]``, ``scales`` fp16 ``[K // G, N]``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int
    in_features: int
    out_features: int

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(
            self.qweight.to(device),
            self.scales.to(device),
            self.group_size,
            self.in_features,
            self.out_features,
        )

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()


def repack_int8(q: torch.Tensor, scales: torch.Tensor) -> Int8Weight:
    """From ``q`` int8 ``[N, K]`` and ``scales`` ``[N, K // G]`` (G = K // scales.shape[1])."""
    if q.dim() != 2 or scales.dim() != 2 or q.dtype != torch.int8:
        raise KernelInputError(f"need int8 q [N, K] and scales [N, K/G], got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1]:
        raise KernelInputError(f"scales {tuple(scales.shape)} do not divide weight [{n}, {k}] into groups")
    group = k // scales.shape[1]
    if group != k and (group < 16 or group & (group - 1)):
        raise KernelInputError(f"group size must be a power of two ≥ 16 or the whole row, got {group}")
    return Int8Weight(
        qweight=q.t().contiguous(),
        scales=scales.to(torch.float16).t().contiguous(),
        group_size=group,
        in_features=k,
        out_features=n,
    )


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> Int8Weight:
    """Symmetric absmax int8 quantization of a float ``[N, K]`` weight (per-channel if no group size)."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise KernelInputError(f"need a float [N, K] weight, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    group = k if group_size is None else group_size
    if group <= 0 or k % group:
        raise KernelInputError(f"group size {group} does not divide K = {k}")
    w = weight.float().reshape(n, k // group, group)
    scale = (w.abs().amax(dim=-1) / 127.0).clamp(min=torch.finfo(torch.float16).tiny)
    scale = scale.to(torch.float16)
    q = torch.round(w / scale.float()[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return repack_int8(q, scale)


def repack_q8_0_bytes(raw: torch.Tensor, out_features: int, in_features: int) -> Int8Weight:
    """Repack the raw bytes of a GGUF Q8_0 tensor ``[N, K]`` (per 32 weights: fp16 ``d`` + 32 int8)."""
    if in_features % 32 or out_features <= 0:
        raise KernelInputError(f"Q8_0 needs K a multiple of 32, got [{out_features}, {in_features}]")
    want = out_features * (in_features // 32) * Q8_0_BLOCK_BYTES
    if raw.dtype != torch.uint8 or raw.numel() != want:
        raise KernelInputError(f"Q8_0 bytes must be {want} uint8, got {raw.numel()} {raw.dtype}")
    blocks = raw.reshape(out_features, in_features // 32, Q8_0_BLOCK_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(out_features, -1)
    q = blocks[..., 2:].contiguous().view(torch.int8).reshape(out_features, in_features)
    return repack_int8(q, d)


@triton.jit
def _load_int8_tile(  # noqa: PLR0917
    qw_ptr,
    s_ptr,
    k0,
    offs_n,
    n_mask,
    K,
    stride_qk,
    stride_sg,
    GROUP: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    q = tl.load(
        qw_ptr + offs_k[:, None] * stride_qk + offs_n[None, :],
        mask=(offs_k[:, None] < K) & n_mask[None, :],
        other=0,
    ).to(tl.float32)
    if not PER_CHANNEL:
        # Scale of each k row (k // GROUP): repeated loads of a group's scales come from L1, and no
        # register reshape is needed.
        s = tl.load(
            s_ptr + (offs_k // GROUP)[:, None] * stride_sg + offs_n[None, :],
            mask=(offs_k[:, None] < K) & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        q = q * s
    return q


@triton.jit
def _int8_splitk_kernel(  # noqa: PLR0917
    x_ptr, qw_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_qk, stride_sg, stride_os, stride_om,
    K_PER_SPLIT: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_rows = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # one row: reduced once, after the loop
    k_begin = pid_s * K_PER_SPLIT
    for i in range(0, K_PER_SPLIT // BLOCK_K):
        k0 = k_begin + i * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _load_int8_tile(
            qw_ptr, s_ptr, k0, offs_n, n_mask, K, stride_qk, stride_sg, GROUP, PER_CHANNEL, BLOCK_K, BLOCK_N
        )
        if BLOCK_M == 1:
            x1 = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
            acc_rows += x1[:, None] * w
        else:
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & (offs_k[None, :] < K),
                other=0.0,
            )
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc += tl.sum(acc_rows, axis=0)[None, :]
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_gemm_kernel(  # noqa: PLR0917
    x_ptr, qw_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_qk, stride_sg, stride_om,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        w = _load_int8_tile(
            qw_ptr, s_ptr, k0, offs_n, n_mask, K, stride_qk, stride_sg, GROUP, PER_CHANNEL, BLOCK_K, BLOCK_N
        )
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _prepare(x: torch.Tensor, w: Int8Weight, block_k: int) -> tuple[torch.Tensor, bool]:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise KernelInputError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    if x.shape[-1] != w.in_features:
        raise KernelInputError(f"x has {x.shape[-1]} features, the weight expects {w.in_features}")
    check_device(x, w.qweight, w.scales)
    per_channel = w.group_size == w.in_features
    if not per_channel and (block_k % w.group_size or block_k < w.group_size):
        raise KernelInputError(f"block_k {block_k} must be a multiple of the group size {w.group_size}")
    return x.reshape(-1, w.in_features), per_channel


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def int8_gemv(x: torch.Tensor, w: Int8Weight, config: MatmulConfig | None = None) -> torch.Tensor:
    """Decode-shaped ``x @ Wᵀ`` for at most 16 rows, split over K; returns ``x.dtype``."""
    m = x.numel() // max(1, x.shape[-1])
    n, k = w.out_features, w.in_features
    if m > GEMV_MAX_M:
        raise KernelInputError(f"int8_gemv takes at most {GEMV_MAX_M} rows, got {m}")
    if config is None:
        # one row keeps a [block_k, block_n] fp32 accumulator in registers: a shorter K block there
        floor = 64 if m == 1 else 128
        block_k = max(floor, w.group_size) if w.group_size != k else floor
        tiles = triton.cdiv(n, 64)
        if x.device.type == "cpu":  # the Triton interpreter: fewest programs (see interpreter_block_n)
            wide_k = max(256, w.group_size) if w.group_size != k else 256
            config = MatmulConfig(16, interpreter_block_n(n), wide_k, split_k=1)
        else:
            config = MatmulConfig(
                16, 64, block_k, split_k=pick_split(tiles, triton.cdiv(k, block_k), sm_count(x.device))
            )
    x2, per_channel = _prepare(x, w, config.block_k)
    steps = triton.cdiv(k, config.block_k)
    split = max(1, min(config.split_k or 1, steps))
    k_per_split = triton.cdiv(steps, split) * config.block_k
    split = triton.cdiv(k, k_per_split)
    block_m = 1 if m == 1 else max(16, config.block_m, next_power_of_2(m))
    out_dtype = x2.dtype if split == 1 else torch.float32
    out = torch.empty((split, m, n), dtype=out_dtype, device=x2.device)
    _int8_splitk_kernel[(triton.cdiv(n, config.block_n), split)](
        x2, w.qweight, w.scales, out, m, n, k, x2.stride(0), x2.stride(1), w.qweight.stride(0),
        w.scales.stride(0), out.stride(0), out.stride(1),
        K_PER_SPLIT=k_per_split, GROUP=w.group_size if not per_channel else 1, PER_CHANNEL=per_channel,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, DOT_PRECISION=_precision(x2),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    y = out[0] if split == 1 else out.sum(dim=0).to(x2.dtype)
    return y.reshape(*x.shape[:-1], n)


def int8_gemm(x: torch.Tensor, w: Int8Weight, config: MatmulConfig | None = None) -> torch.Tensor:
    """Prefill-shaped ``x @ Wᵀ`` (any number of rows); returns ``x.dtype``."""
    m = x.numel() // max(1, x.shape[-1])
    n, k = w.out_features, w.in_features
    if config is None:
        block_m = 64 if m <= 64 else 128
        block_n = interpreter_block_n(n) if x.device.type == "cpu" else 128  # see interpreter_block_n
        config = MatmulConfig(block_m, block_n, max(64, w.group_size) if w.group_size != k else 64,
                              num_warps=8 if block_m == 128 else 4)  # fmt: skip
    if config.block_m < 16:
        raise KernelInputError(f"GEMM needs block_m ≥ 16, got {config.block_m}")
    x2, per_channel = _prepare(x, w, config.block_k)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _int8_gemm_kernel[grid](
        x2, w.qweight, w.scales, out, m, n, k, x2.stride(0), x2.stride(1), w.qweight.stride(0),
        w.scales.stride(0), out.stride(0),
        GROUP=w.group_size if not per_channel else 1, PER_CHANNEL=per_channel, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, DOT_PRECISION=_precision(x2),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def int8_matmul(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """``x @ Wᵀ`` for an int8 weight: split-K GEMV up to 16 rows, tiled GEMM above."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows == 0:
        return torch.empty((*x.shape[:-1], w.out_features), dtype=x.dtype, device=x.device)
    return int8_gemv(x, w) if rows <= GEMV_MAX_M else int8_gemm(x, w)
