# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped pointer/scalar parameters; annotations would change their specialization.)
"""Paged attention for prefill chunks, over the block-table KV cache of
:mod:`veil.kernels.triton_paged_attention` (the layout is described there).

Prefill (:func:`paged_attention_prefill`) — the choice and how it must be confirmed
-----------------------------------------------------------------------------------
Two implementations are here:

* ``"sdpa"`` (the default): gather each sequence's K/V from the paged cache into a dense tensor and
  call ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention-2 on Hopper when the
  chunk starts at position 0, so ``is_causal`` applies; the memory-efficient kernel with an explicit
  bottom-right causal mask when it continues a partly-cached prompt). Prefill is compute-bound and
  PyTorch's fused kernels are heavily tuned; the gather is one extra read + write of the KV, small
  next to the ``O(q_len · context)`` attention work.
* ``"triton"``: :func:`paged_attention_prefill_triton`, a FlashAttention-style Triton kernel that
  reads the paged cache directly (no gather, one launch for the whole ragged batch).

The default was chosen by that reasoning, **not by a measurement**: no GPU was available when this
was written. ``bench/kernels.py`` times both on a GPU; the default must be confirmed (or flipped) by
its numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from veil.kernels.errors import KernelInputError
from veil.kernels.triton_common import next_power_of_2
from veil.kernels.triton_paged_attention import check_paged_cache

__all__ = ["paged_attention_prefill", "paged_attention_prefill_sdpa", "paged_attention_prefill_triton"]

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_prefill_kernel(  # noqa: PLR0917
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, qstart_ptr, out_ptr, qk_scale,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_btb, stride_ot, stride_oh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    mb = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_begin = tl.load(qstart_ptr + b)
    q_len = tl.load(qstart_ptr + b + 1) - q_begin
    if mb * BLOCK_M >= q_len:
        return
    ctx = tl.load(lens_ptr + b)
    first_pos = ctx - q_len  # absolute position of the chunk's first query
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    i_mask = i < q_len
    pos = first_pos + i
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_begin + i)[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=i_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), dtype=tl.float32)
    kv_end = tl.minimum(first_pos + (mb + 1) * BLOCK_M, ctx)  # causal: the block's last query position + 1
    for t0 in range(0, kv_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_mask = t < kv_end
        blk = tl.load(bt_ptr + b * stride_btb + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        row = t % BLOCK_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_ptr + (blk * stride_kb + row * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        allowed = t_mask[None, :] & (t[None, :] <= pos[:, None])
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + (blk * stride_vb + row * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o = out_ptr + (q_begin + i)[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & d_mask[None, :])


def _check_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> tuple[int, int, int]:
    if q.dim() != 3:
        raise KernelInputError(f"q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    dims = check_paged_cache(q, k_cache, v_cache, block_tables, context_lens)
    if query_start_loc.dim() != 1 or query_start_loc.shape[0] != block_tables.shape[0] + 1:
        raise KernelInputError("query_start_loc must be [batch + 1] cumulative query offsets")
    return dims


def paged_attention_prefill_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal attention of packed prompt chunks ``q [T, H, D]`` over the paged cache, in one Triton launch.

    Sequence ``b`` owns query rows ``query_start_loc[b] : query_start_loc[b + 1]``; they are its last
    ``q_len`` positions, whose K/V must already be in the cache (``context_lens[b]`` positions in all).
    """
    block_size, kv_heads, head_dim = _check_prefill(
        q, k_cache, v_cache, block_tables, context_lens=context_lens, query_start_loc=query_start_loc
    )
    heads = q.shape[1]
    out = torch.empty_like(q)
    batch = block_tables.shape[0]
    if batch == 0 or q.shape[0] == 0 or max_query_len <= 0:
        return out.zero_()
    scale_ = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    grid = (batch, triton.cdiv(max_query_len, block_m), heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, scale_ * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP=heads // kv_heads, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Dense ``[length, kv_heads, head_dim]`` copy of one sequence's cached K or V."""
    block_size = cache.shape[1]
    blocks = table[: -(-length // block_size)].long()
    return cache[blocks].flatten(0, 1)[:length]


def paged_attention_prefill_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as :func:`paged_attention_prefill_triton`, via a gather and PyTorch SDPA per sequence.

    Reads ``context_lens`` and ``query_start_loc`` on the host (prefill runs eagerly, never in a graph).
    """
    _, kv_heads, _ = _check_prefill(
        q, k_cache, v_cache, block_tables, context_lens=context_lens, query_start_loc=query_start_loc
    )
    heads = q.shape[1]
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    for b, length in enumerate(lens):
        begin, end = int(starts[b]), int(starts[b + 1])
        q_len = end - begin
        if q_len == 0:
            continue
        if q_len > length:
            raise KernelInputError(f"sequence {b}: {q_len} queries but only {length} cached positions")
        k = _gather(k_cache, block_tables[b], length).transpose(0, 1)[None]  # [1, KVH, L, D]
        v = _gather(v_cache, block_tables[b], length).transpose(0, 1)[None]
        qb = q[begin:end].transpose(0, 1)[None]  # [1, H, T, D]
        if q_len == length:
            o = F.scaled_dot_product_attention(
                qb, k, v, is_causal=True, scale=scale, enable_gqa=heads != kv_heads
            )
        else:
            rows = torch.arange(q_len, device=q.device)[:, None] + (length - q_len)
            mask = torch.arange(length, device=q.device)[None, :] <= rows
            o = F.scaled_dot_product_attention(
                qb, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads
            )
        out[begin:end] = o[0].transpose(0, 1)
    return out


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float | None = None,
    impl: str = "sdpa",
) -> torch.Tensor:
    """Prefill attention over the paged cache; ``impl`` is ``"sdpa"`` (default, see module docstring) or
    ``"triton"``."""
    if impl == "sdpa":
        return paged_attention_prefill_sdpa(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens=context_lens,
            query_start_loc=query_start_loc,
            scale=scale,
        )
    if impl == "triton":
        return paged_attention_prefill_triton(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens=context_lens,
            query_start_loc=query_start_loc,
            max_query_len=max_query_len,
            scale=scale,
        )
    raise KernelInputError(f"unknown prefill implementation {impl!r} (expected 'sdpa' or 'triton')")
