# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped pointer/scalar parameters; annotations would change their specialization.)
"""Paged attention over the block-table KV cache: the cache layout and the Triton decode kernel.

Cache layout (shared with the engine's model runner)
----------------------------------------------------
``k_cache, v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``; a sequence's position ``t``
lives in physical block ``block_tables[b, t // block_size]`` at row ``t % block_size``.
``block_tables`` int32 ``[batch, max_blocks]`` (unused tail entries may hold anything: they are never
read past ``context_lens``), ``context_lens`` int32 ``[batch]``. The kernels take the cache's strides,
so any tensor whose *logical* indexing is ``[block, row, kv_head, dim]`` with a contiguous last dim
works (a ``[num_blocks, num_kv_heads, block_size, head_dim]`` cache can be passed as
``cache.permute(0, 2, 1, 3)``).

Decode (:func:`paged_attention_decode`)
---------------------------------------
One program per (sequence, KV head, KV split). The program loads the query rows of all ``H / KVH``
query heads that share its KV head (GQA packing, padded to 16 rows for ``tl.dot``), so each K/V row
is read from memory once for the whole group, not once per query head. It walks its slice of the
context ``BLOCK_N`` positions at a time, gathering the physical block of each position from the block
table (any ``block_size`` works, also one that does not divide ``BLOCK_N``), and keeps an online
softmax (running max and sum, fp32, base-2 exponentials).

Long contexts with few sequences give too few programs to keep the memory system busy, so the context
is cut into ``num_splits`` partitions that run as separate programs; each writes its normalized
partial output and log-sum-exp, and a small reduce kernel merges them (the flash-decoding scheme).
With enough (sequence, KV head) pairs the split count is 1 and the first kernel writes the output
directly. The partition length depends only on the shapes and ``max_context_len`` (never on the
values of ``context_lens``), so a decode step captured in a CUDA graph replays with any lengths.

Prefill lives in :mod:`veil.kernels.triton_paged_prefill` (same cache layout, checked by
:func:`check_paged_cache`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from veil.kernels.errors import KernelInputError
from veil.kernels.triton_common import check_device, next_power_of_2, pick_split, sm_count

__all__ = ["DecodeConfig", "check_paged_cache", "paged_attention_decode", "pick_decode_config"]

_LOG2E = 1.4426950408889634


class DecodeConfig:
    """Launch shape of the decode kernel: ``num_splits`` partitions of ``partition`` positions each."""

    __slots__ = ("block_n", "num_splits", "num_stages", "num_warps", "partition")

    def __init__(
        self, block_n: int, partition: int, num_splits: int, num_warps: int = 4, num_stages: int = 2
    ):
        self.block_n = block_n
        self.partition = partition
        self.num_splits = num_splits
        self.num_warps = num_warps
        self.num_stages = num_stages

    def __repr__(self) -> str:
        return (
            f"DecodeConfig(block_n={self.block_n}, partition={self.partition}, num_splits={self.num_splits}, "
            f"num_warps={self.num_warps}, num_stages={self.num_stages})"
        )


def pick_decode_config(
    batch: int,
    num_kv_heads: int,
    max_context_len: int,
    device: torch.device,
    *,
    num_splits: int | None = None,
    block_n: int = 64,
) -> DecodeConfig:
    """Choose the KV split from the shapes only (no device sync; safe inside CUDA-graph capture)."""
    steps = max(1, triton.cdiv(max_context_len, block_n))
    if num_splits is None:
        # Splits only pay when (sequence, KV head) pairs cannot fill the GPU; partitions ≥ 4 blocks.
        num_splits = min(
            pick_split(batch * num_kv_heads, steps, sm_count(device), waves=2), max(1, steps // 4)
        )
    num_splits = max(1, min(num_splits, steps))
    partition = triton.cdiv(steps, num_splits) * block_n
    return DecodeConfig(block_n, partition, triton.cdiv(max(1, max_context_len), partition))


# ---------------------------------------------------------------------------------------------- decode


@triton.jit
def _paged_decode_kernel(  # noqa: PLR0917
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_btb, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    BLOCK_SIZE: tl.constexpr, PARTITION: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start = s * PARTITION
    end = tl.minimum(start + PARTITION, ctx)
    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g
    h_mask = g < GROUP
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM_PAD), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_mask = t < end
        blk = tl.load(bt_ptr + b * stride_btb + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        row = t % BLOCK_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_ptr + (blk * stride_kb + row * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + (blk * stride_vb + row * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_mask = h_mask[:, None] & d_mask[None, :]
    if SPLIT:
        po = po_ptr + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps + d[None, :]
        tl.store(po, out, mask=o_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(plse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=h_mask)
    else:
        o = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _paged_decode_reduce_kernel(  # noqa: PLR0917
    po_ptr, plse_ptr, out_ptr, num_splits, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    s_mask = sp < num_splits
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    lse = tl.load(plse_ptr + b * stride_lb + h * stride_lh + sp, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    parts = tl.load(
        po_ptr + b * stride_pb + h * stride_ph + sp[:, None] * stride_ps + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def check_paged_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[int, int, int]:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise KernelInputError(
            f"k/v caches must both be [blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, block_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[-2]
    if q.shape[-1] != head_dim or heads % kv_heads:
        raise KernelInputError(
            f"q {tuple(q.shape)} does not fit the cache's {kv_heads} kv heads × {head_dim}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise KernelInputError("q and the caches need a contiguous last (head_dim) dimension")
    if block_tables.dim() != 2 or block_tables.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"block_tables must be int32 [batch, max_blocks], got {block_tables.dtype}")
    if context_lens.dim() != 1 or context_lens.shape[0] != block_tables.shape[0]:
        raise KernelInputError("context_lens must be [batch] matching block_tables")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise KernelInputError(f"q and cache dtypes differ: {q.dtype} vs {k_cache.dtype}")
    check_device(q, k_cache, v_cache, block_tables, context_lens)
    return block_size, kv_heads, head_dim


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    out: torch.Tensor | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged KV; ``q`` and the result ``[B, H, D]``.

    ``context_lens[b]`` counts the positions to attend to, the query's own (already written) included.
    ``max_context_len`` bounds the lengths (default: the block table's capacity); it only sizes the KV
    split, so pass a fixed value when capturing a CUDA graph. ``scale`` defaults to ``head_dim ** -0.5``.
    ``num_splits`` forces the KV split (default: chosen from the shapes); ``block_n`` is the number of
    positions per inner step (a power of two ≥ 16); ``out`` receives the result when given.
    ``num_warps`` / ``num_stages`` are the launch's (``bench/kernels.py --sweep`` times the choices).
    """
    if q.dim() != 3:
        raise KernelInputError(f"q must be [batch, heads, head_dim], got {tuple(q.shape)}")
    block_size, kv_heads, head_dim = check_paged_cache(q, k_cache, v_cache, block_tables, context_lens)
    batch, heads, _ = q.shape
    if block_tables.shape[0] != batch:
        raise KernelInputError(f"block_tables has {block_tables.shape[0]} rows for a batch of {batch}")
    bound = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
    cfg = pick_decode_config(batch, kv_heads, bound, q.device, num_splits=num_splits, block_n=block_n)
    cfg.num_warps, cfg.num_stages = num_warps, num_stages
    result = out if out is not None else torch.empty_like(q)
    if batch == 0:
        return result
    group = heads // kv_heads
    d_pad = max(16, next_power_of_2(head_dim))
    split = cfg.num_splits > 1
    if split:
        # Normalized partial outputs [B, H, S, D_pad] and their base-2 log-sum-exps [B, H, S], fp32.
        po = torch.empty((batch, heads, cfg.num_splits, d_pad), dtype=torch.float32, device=q.device)
        plse = torch.empty((batch, heads, cfg.num_splits), dtype=torch.float32, device=q.device)
    else:
        po = plse = result  # unused by the kernel when SPLIT is false
    scale_ = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _paged_decode_kernel[(batch, kv_heads, cfg.num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, result, po, plse, scale_ * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        result.stride(0), result.stride(1),
        po.stride(0) if split else 0, po.stride(1) if split else 0, po.stride(2) if split else 0,
        plse.stride(0) if split else 0, plse.stride(1) if split else 0,
        BLOCK_SIZE=block_size, PARTITION=cfg.partition, GROUP=group,
        GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
        BLOCK_N=cfg.block_n, SPLIT=split, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        _paged_decode_reduce_kernel[(batch, heads)](
            po, plse, result, cfg.num_splits, po.stride(0), po.stride(1), po.stride(2),
            plse.stride(0), plse.stride(1), result.stride(0), result.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, SPLITS_PAD=max(2, next_power_of_2(cfg.num_splits)),
        )  # fmt: skip
    return result


# --------------------------------------------------------------------------------------------- prefill
