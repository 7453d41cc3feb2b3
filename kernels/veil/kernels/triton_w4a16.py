# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped pointer/scalar parameters; annotations would change their specialization.)
"""w4a16 matmul: fp16/bf16 activations × int4 weights (group 32, scale + offset), fp32 accumulation.

``y[M, N] = x[M, K] @ W[N, K]ᵀ`` where ``W[n, k] = q[n, k] · d[n, k // 32] + m[n, k // 32]`` and
``q ∈ [0, 15]``: exactly GGUF Q4_1, so a GGUF file's weights are used without re-quantizing.

Layout (why it differs from GGUF's)
-----------------------------------
GGUF stores Q4_1 as 20-byte blocks along K, one per 32 weights of a row: ``d`` (fp16), ``m`` (fp16),
then 16 bytes whose low nibbles are weights 0..15 and high nibbles weights 16..31. That is a fine file
format and a poor GPU layout: the 20-byte stride breaks 16-byte vector loads, the scales sit between
the quants, and a program that owns a tile of output columns would gather from N different rows.

At load time :func:`repack_q4_1` rewrites each weight into three dense, N-contiguous arrays:

* ``qweight`` int32 ``[K // 8, N]``: word ``(r, n)`` holds ``q[n, 8r + j]`` in bits ``4j .. 4j+3``
  (j = 0..7, plain ascending order, no GGUF 0/16 interleave);
* ``scales`` fp16 ``[K // 32, N]`` (GGUF's ``d``, kept in fp16: converting to bf16 would round it);
* ``mins`` fp16 ``[K // 32, N]`` (GGUF's ``m``).

A program owning ``BLOCK_N`` output columns then reads ``[BLOCK_K / 8, BLOCK_N]`` words and the
matching scales/mins as rows of consecutive addresses (coalesced, vectorizable). Bytes per weight stay
0.5 + 4/32 = 0.625, the same as GGUF, so the kernels are bound by reading the bytes llama.cpp reads.
Because the eight nibbles of a word are eight consecutive k, nibble ``j`` of all words in a tile is a
``[BLOCK_K / 8, BLOCK_N]`` slab for ``k = 8r + j``; the GEMV unpacks slab by slab with a shift and a
mask and never reshapes registers (a reshape can cost a trip through shared memory). Each packed row
lies inside one group, so its scale and min are per row: the single-row path accumulates ``Σ x·q`` and
``Σ x`` per row and applies ``d`` and ``m`` once per row (one FMA per weight instead of two).

Two kernels, one dispatcher (:func:`w4a16_matmul`):

* **split-K GEMV** for decode (``M ≤ 16``): few output tiles, so K is cut into ``split_k`` slices that
  run as separate programs and write fp32 partials ``[split_k, M, N]``; a deterministic sum over the
  slices finishes (no atomics, so a rerun is bit-identical). ``M == 1`` uses the multiply-sum above
  instead of a padded 16-row ``tl.dot``; ``2 ≤ M ≤ 16`` issues one ``tl.dot`` per nibble slab.
* **tiled GEMM** for prefill (``M > 16``): the usual blocked matmul, dequantizing the weight tile in
  the K loop (unpacked and reshaped to ``[BLOCK_K, BLOCK_N]`` for one large ``tl.dot``: at prefill
  sizes the dot's operand staging dominates), with grouped program ordering so neighbouring programs
  share weight tiles in L2.

Block sizes are starting points picked from the memory-traffic shape; ``bench/kernels.py`` sweeps them
on a GPU and its figures (not guesses) must set the defaults. Nothing here has been timed yet.
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

__all__ = [
    "GEMV_MAX_M",
    "Q4_1_BLOCK_BYTES",
    "Q4_1_GROUP",
    "MatmulConfig",
    "W4A16Weight",
    "default_gemm_config",
    "default_gemv_config",
    "repack_q4_1",
    "repack_q4_1_bytes",
    "unpack_q4_1_bytes",
    "w4a16_gemm",
    "w4a16_gemv",
    "w4a16_matmul",
]

Q4_1_GROUP = 32
Q4_1_BLOCK_BYTES = 20  # fp16 d + fp16 m + 16 bytes of nibbles
GEMV_MAX_M = 16


@dataclass(frozen=True, slots=True)
class W4A16Weight:
    """A repacked Q4_1 weight of a ``Linear(in_features=K, out_features=N)`` layer (layout above)."""

    qweight: torch.Tensor  # int32 [K // 8, N]
    scales: torch.Tensor  # fp16 [K // 32, N]
    mins: torch.Tensor  # fp16 [K // 32, N]
    in_features: int
    out_features: int

    def to(self, device: torch.device | str) -> W4A16Weight:
        return W4A16Weight(
            self.qweight.to(device),
            self.scales.to(device),
            self.mins.to(device),
            self.in_features,
            self.out_features,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins))


@dataclass(frozen=True, slots=True)
class MatmulConfig:
    """Launch parameters; ``split_k`` only applies to the GEMV kernel (0 = choose from the shape)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


# ---------------------------------------------------------------------------------------------- repack


def _check_shape(out_features: int, in_features: int) -> None:
    if out_features <= 0 or in_features <= 0 or in_features % Q4_1_GROUP:
        raise KernelInputError(
            f"Q4_1 weight must be [N > 0, K > 0] with K a multiple of {Q4_1_GROUP}, "
            f"got [{out_features}, {in_features}]"
        )


def unpack_q4_1_bytes(
    raw: torch.Tensor, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split raw GGUF Q4_1 bytes of an ``[N, K]`` tensor into ``q`` uint8 ``[N, K]`` and ``d``, ``m``."""
    _check_shape(out_features, in_features)
    groups = in_features // Q4_1_GROUP
    want = out_features * groups * Q4_1_BLOCK_BYTES
    if raw.dtype != torch.uint8 or raw.numel() != want:
        raise KernelInputError(
            f"Q4_1 bytes for [{out_features}, {in_features}] must be {want} uint8, "
            f"got {raw.numel()} {raw.dtype}"
        )
    blocks = raw.reshape(out_features, groups, Q4_1_BLOCK_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(out_features, groups)
    m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(out_features, groups)
    qs = blocks[..., 4:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(out_features, in_features)
    return q, d, m


def repack_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> W4A16Weight:
    """Repack Q4_1 given as ``q`` (0..15, ``[N, K]``), ``d``, ``m`` (``[N, K/32]``) into the kernel layout."""
    if q.dim() != 2:
        raise KernelInputError(f"q must be 2-D [N, K], got shape {tuple(q.shape)}")
    n, k = q.shape
    _check_shape(n, k)
    if d.shape != (n, k // Q4_1_GROUP) or m.shape != (n, k // Q4_1_GROUP):
        raise KernelInputError(
            f"d and m must be [{n}, {k // Q4_1_GROUP}], got {tuple(d.shape)} and {tuple(m.shape)}"
        )
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise KernelInputError(f"q must be an integer tensor, got {q.dtype}")
    qi = q.to(torch.int64)
    if int(qi.min()) < 0 or int(qi.max()) > 15:
        raise KernelInputError("q holds values outside 0..15")
    cols = qi.t().reshape(k // 8, 8, n)
    shifts = (torch.arange(8, dtype=torch.int64, device=q.device) * 4).view(1, 8, 1)
    words = (cols << shifts).sum(dim=1)  # [K/8, N], 0 .. 2**32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    return W4A16Weight(
        qweight=words,
        scales=d.to(torch.float16).t().contiguous(),
        mins=m.to(torch.float16).t().contiguous(),
        in_features=k,
        out_features=n,
    )


def repack_q4_1_bytes(raw: torch.Tensor, out_features: int, in_features: int) -> W4A16Weight:
    """Repack the raw bytes of a GGUF Q4_1 tensor of logical shape ``[N, K]`` (as stored in the file)."""
    return repack_q4_1(*unpack_q4_1_bytes(raw, out_features, in_features))


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dequant_tile(  # noqa: PLR0917
    qw_ptr,
    s_ptr,
    m_ptr,
    k0,
    offs_n,
    n_mask,
    K,
    stride_qk,
    stride_sg,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Load and dequantize the ``[BLOCK_K, BLOCK_N]`` weight tile starting at row ``k0`` (fp32)."""
    offs_r = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(
        qw_ptr + offs_r[:, None] * stride_qk + offs_n[None, :],
        mask=(offs_r[:, None] < K // 8) & n_mask[None, :],
        other=0,
    )
    shifts = tl.arange(0, 8) * 4
    q = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K/8, 8, BLOCK_N]
    offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    g_mask = (offs_g[:, None] < K // 32) & n_mask[None, :]
    s = tl.load(s_ptr + offs_g[:, None] * stride_sg + offs_n[None, :], mask=g_mask, other=0.0)
    mn = tl.load(m_ptr + offs_g[:, None] * stride_sg + offs_n[None, :], mask=g_mask, other=0.0)
    w = tl.reshape(q.to(tl.float32), (BLOCK_K // 32, 32, BLOCK_N))
    w = w * s.to(tl.float32)[:, None, :] + mn.to(tl.float32)[:, None, :]
    return tl.reshape(w, (BLOCK_K, BLOCK_N))


@triton.jit
def _w4a16_splitk_kernel(  # noqa: PLR0917
    x_ptr,
    qw_ptr,
    s_ptr,
    m_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_sg,
    stride_os,
    stride_om,
    K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_rows = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)  # one row: reduced once, after the loop
    k_begin = pid_s * K_PER_SPLIT
    rows = tl.arange(0, BLOCK_K // 8)
    for i in range(0, K_PER_SPLIT // BLOCK_K):
        # Packed row r holds k = 8r .. 8r + 7 and belongs to group r // 4. Nibble j of every row is one
        # [BLOCK_K / 8, BLOCK_N] slab (k = 8r + j): the words are unpacked slab by slab, never reshaped.
        r = (k_begin + i * BLOCK_K) // 8 + rows
        r_mask = r < K // 8
        w_mask = r_mask[:, None] & n_mask[None, :]
        words = tl.load(qw_ptr + r[:, None] * stride_qk + offs_n[None, :], mask=w_mask, other=0)
        s = tl.load(s_ptr + (r // 4)[:, None] * stride_sg + offs_n[None, :], mask=w_mask, other=0.0).to(
            tl.float32
        )
        mn = tl.load(m_ptr + (r // 4)[:, None] * stride_sg + offs_n[None, :], mask=w_mask, other=0.0).to(
            tl.float32
        )
        if BLOCK_M == 1:
            # Σ_k x·(q·d + m) = d·Σ x·q + m·Σ x per packed row: one FMA per weight, scales applied per row.
            xq = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_ptr + (r * 8 + j) * stride_xk, mask=r_mask, other=0.0).to(tl.float32)
                xq += xj[:, None] * ((words >> (4 * j)) & 0xF).to(tl.float32)
                xs += xj
            acc_rows += xq * s + mn * xs[:, None]
        else:
            for j in tl.static_range(8):
                xj = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + (r * 8 + j)[None, :] * stride_xk,
                    mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0,
                )
                wj = ((words >> (4 * j)) & 0xF).to(tl.float32) * s + mn
                acc = tl.dot(xj, wj.to(xj.dtype), acc, input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc += tl.sum(acc_rows, axis=0)[None, :]
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w4a16_gemm_kernel(  # noqa: PLR0917
    x_ptr,
    qw_ptr,
    s_ptr,
    m_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_sg,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
        w = _dequant_tile(qw_ptr, s_ptr, m_ptr, k0, offs_n, n_mask, K, stride_qk, stride_sg, BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# -------------------------------------------------------------------------------------------- launchers

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(x: torch.Tensor, w: W4A16Weight) -> torch.Tensor:
    if x.dtype not in _ACT_DTYPES:
        raise KernelInputError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    if x.shape[-1] != w.in_features:
        raise KernelInputError(f"x has {x.shape[-1]} features, the weight expects {w.in_features}")
    check_device(x, w.qweight, w.scales, w.mins)
    return x.reshape(-1, w.in_features)


def _dot_precision(x: torch.Tensor) -> str:
    # fp32 activations (tests, odd callers) get exact fp32 products rather than TF32.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def default_gemv_config(m: int, n: int, k: int, device: torch.device) -> MatmulConfig:
    """Split-K GEMV launch for ``m ≤ 16`` rows (a starting point: confirm with ``bench/kernels.py``)."""
    block_m = 1 if m == 1 else max(16, next_power_of_2(m))
    block_n = 64
    block_k = (256 if k >= 256 else 32 * next_power_of_2(k // 32)) if m == 1 else 128
    if device.type == "cpu":  # the Triton interpreter: fewest programs (see interpreter_block_n)
        return MatmulConfig(block_m, interpreter_block_n(n), block_k, split_k=1)
    tiles = triton.cdiv(n, block_n)
    split = pick_split(tiles, triton.cdiv(k, block_k), sm_count(device))
    return MatmulConfig(block_m, block_n, block_k, split_k=split, num_warps=4, num_stages=3)


def default_gemm_config(m: int, n: int, k: int, device: torch.device | None = None) -> MatmulConfig:
    """Tiled GEMM launch for prefill (a starting point: confirm with ``bench/kernels.py``)."""
    block_m = 64 if m <= 64 else 128
    if device is not None and device.type == "cpu":  # the Triton interpreter (see interpreter_block_n)
        return MatmulConfig(block_m, interpreter_block_n(n), 64)
    return MatmulConfig(block_m, 128, 64, num_warps=8 if block_m == 128 else 4, num_stages=3)


def w4a16_gemv(x: torch.Tensor, w: W4A16Weight, config: MatmulConfig | None = None) -> torch.Tensor:
    """Decode-shaped ``x @ Wᵀ`` for at most 16 rows, split over K; returns ``x.dtype``, shape ``[..., N]``."""
    x2 = _check_inputs(x, w)
    m, k = x2.shape
    n = w.out_features
    if m > GEMV_MAX_M:
        raise KernelInputError(f"w4a16_gemv takes at most {GEMV_MAX_M} rows, got {m}")
    cfg = config or default_gemv_config(m, n, k, x2.device)
    if cfg.block_k % Q4_1_GROUP or cfg.block_k < (Q4_1_GROUP if m == 1 else 128):
        raise KernelInputError(
            f"block_k must be a multiple of {Q4_1_GROUP} (and ≥ 128 for more than one row: each of the 8 "
            f"nibble slabs feeds tl.dot with block_k / 8 ≥ 16), got {cfg.block_k}"
        )
    steps = triton.cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k or 1, steps))
    k_per_split = triton.cdiv(steps, split) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    block_m = cfg.block_m if m > 1 else 1
    if block_m > 1:
        block_m = max(block_m, 16, next_power_of_2(m))
    if split == 1:
        out = torch.empty((1, m, n), dtype=x2.dtype, device=x2.device)
    else:
        out = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(n, cfg.block_n), split)
    _w4a16_splitk_kernel[grid](
        x2,
        w.qweight,
        w.scales,
        w.mins,
        out,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        w.qweight.stride(0),
        w.scales.stride(0),
        out.stride(0),
        out.stride(1),
        K_PER_SPLIT=k_per_split,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        DOT_PRECISION=_dot_precision(x2),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    y = out[0] if split == 1 else out.sum(dim=0).to(x2.dtype)
    return y.reshape(*x.shape[:-1], n)


def w4a16_gemm(x: torch.Tensor, w: W4A16Weight, config: MatmulConfig | None = None) -> torch.Tensor:
    """Prefill-shaped ``x @ Wᵀ`` (any number of rows); returns ``x.dtype``, shape ``[..., N]``."""
    x2 = _check_inputs(x, w)
    m, k = x2.shape
    n = w.out_features
    cfg = config or default_gemm_config(m, n, k, x2.device)
    if cfg.block_k % Q4_1_GROUP or cfg.block_k < Q4_1_GROUP or cfg.block_m < 16:
        raise KernelInputError(f"GEMM needs block_k a multiple of 32 and block_m ≥ 16, got {cfg}")
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _w4a16_gemm_kernel[grid](
        x2,
        w.qweight,
        w.scales,
        w.mins,
        out,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        w.qweight.stride(0),
        w.scales.stride(0),
        out.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        DOT_PRECISION=_dot_precision(x2),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out.reshape(*x.shape[:-1], n)


def w4a16_matmul(x: torch.Tensor, w: W4A16Weight) -> torch.Tensor:
    """``x @ Wᵀ`` for a repacked Q4_1 weight: split-K GEMV up to 16 rows, tiled GEMM above."""
    rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    if 0 < rows <= GEMV_MAX_M:
        return w4a16_gemv(x, w)
    if rows == 0:
        return torch.empty((*x.shape[:-1], w.out_features), dtype=x.dtype, device=x.device)
    return w4a16_gemm(x, w)
