# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped pointer/scalar parameters; annotations would change their specialization.)
"""Fused small ops of the decoder layer: RMSNorm + residual add, and RoPE + KV-cache write.

Why fuse: at decode batch sizes every op is memory- and launch-bound. Unfused, a layer's
``residual = x + residual; h = rmsnorm(residual) * w`` is three to five PyTorch kernels, each reading
and writing the hidden row; RoPE on q and k plus two ``index_put_`` writes into the paged cache is
another five or more. Fused, each is one launch that reads its inputs once. (Whether these matter in
the engine's decode profile has to be measured on a GPU; they were written before one was available.)

:func:`rmsnorm_residual` — one program per token row, the whole hidden row in registers (hidden ≤ 16k).
It rounds exactly where HF ``LlamaRMSNorm`` does (the sum ``x + residual`` and the normalized row are
rounded to the activation dtype, the weight multiply happens after), so results match the model's
eager PyTorch path bit for bit in fp32 and to one ulp in fp16/bf16.

:func:`rope_kv_write` — one program per token: rotates all query heads and key heads of the token
(``neox=True``: HF ``rotate_half`` pairs ``(i, i + D/2)``; ``False``: GGUF / GPT-J adjacent pairs
``(2i, 2i + 1)``), writes the rotated q and k out, and stores rotated k and v into the paged cache
(``[num_blocks, block_size, kv_heads, head_dim]``, see ``triton_paged_attention``) at
``slot_mapping[t] = block * block_size + row``; a negative slot (a padding token of a CUDA-graph batch)
writes nothing to the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from veil.kernels.errors import KernelInputError
from veil.kernels.triton_common import check_device, next_power_of_2

__all__ = ["rmsnorm_residual", "rope_kv_write"]


@triton.jit
def _rmsnorm_residual_kernel(  # noqa: PLR0917
    x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, n_cols, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(rout_ptr.dtype.element_ty)
        tl.store(rout_ptr + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_residual(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (``r = x`` if ``residual`` is None); returns ``(rmsnorm(r) · weight, r)``.

    ``x`` and ``residual`` are ``[..., hidden]`` with a contiguous last dimension; both outputs have
    ``x``'s dtype and shape."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise KernelInputError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise KernelInputError(
            f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)}"
        )
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise KernelInputError("x and residual need a contiguous last dimension")
    check_device(x, weight, *(() if residual is None else (residual,)))
    x2 = x.reshape(-1, hidden)
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    out = torch.empty_like(x2)
    rout = torch.empty_like(x2) if residual is not None else x2
    rows = x2.shape[0]
    if rows:
        block = next_power_of_2(hidden)
        _rmsnorm_residual_kernel[(rows,)](
            x2, r2, weight, out, rout, hidden, eps,
            x2.stride(0), r2.stride(0), out.stride(0), rout.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return out.reshape(x.shape), (rout.reshape(x.shape) if residual is not None else x)


@triton.jit
def _rotate_heads(  # noqa: PLR0917
    src_ptr, dst_ptr, t, n_heads, stride_st, stride_sh, stride_dt, stride_dh, c, s, i1, i2, i_mask,
    HEADS_PAD: tl.constexpr,
):  # fmt: skip
    h = tl.arange(0, HEADS_PAD)
    mask = (h < n_heads)[:, None] & i_mask[None, :]
    base = src_ptr + t * stride_st + h[:, None] * stride_sh
    x1 = tl.load(base + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c[None, :] - x2 * s[None, :]).to(dst_ptr.dtype.element_ty)
    o2 = (x2 * c[None, :] + x1 * s[None, :]).to(dst_ptr.dtype.element_ty)
    out = dst_ptr + t * stride_dt + h[:, None] * stride_dh
    tl.store(out + i1[None, :], o1, mask=mask)
    tl.store(out + i2[None, :], o2, mask=mask)
    return o1, o2, h, mask


@triton.jit
def _rope_kv_write_kernel(  # noqa: PLR0917
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr,
    n_heads, n_kv_heads, head_dim,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_kcb, stride_kcr, stride_kch, stride_vcb, stride_vcr, stride_vch,
    CACHE_BLOCK: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, NEOX: tl.constexpr,
    HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    i_mask = i < HALF
    c = tl.load(cos_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)
    if NEOX:
        i1 = i
        i2 = i + HALF
    else:
        i1 = 2 * i
        i2 = 2 * i + 1
    _rotate_heads(
        q_ptr, qo_ptr, t, n_heads, stride_qt, stride_qh, stride_qot, stride_qoh, c, s, i1, i2, i_mask,
        HEADS_PAD,
    )  # fmt: skip
    k1, k2, h, kmask = _rotate_heads(
        k_ptr, ko_ptr, t, n_kv_heads, stride_kt, stride_kh, stride_kot, stride_koh, c, s, i1, i2, i_mask,
        KV_HEADS_PAD,
    )  # fmt: skip
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // CACHE_BLOCK
    row = slot % CACHE_BLOCK
    keep = (
        tl.zeros((KV_HEADS_PAD, 1), dtype=tl.int64) + slot
    ) >= 0  # a tensor: scalar masks break the interpreter
    kc = kc_ptr + blk * stride_kcb + row * stride_kcr + h[:, None] * stride_kch
    tl.store(kc + i1[None, :], k1.to(kc_ptr.dtype.element_ty), mask=kmask & keep)
    tl.store(kc + i2[None, :], k2.to(kc_ptr.dtype.element_ty), mask=kmask & keep)
    d = tl.arange(0, 2 * HALF_PAD)
    vmask = (h < n_kv_heads)[:, None] & (d < head_dim)[None, :] & keep
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=vmask, other=0.0)
    vc = vc_ptr + blk * stride_vcb + row * stride_vcr + h[:, None] * stride_vch + d[None, :]
    tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=vmask)


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to ``q [T, H, D]`` and ``k [T, KVH, D]`` at ``positions [T]`` and write the rotated k and
    ``v [T, KVH, D]`` into the paged caches at ``slot_mapping [T]`` (negative = skip).

    ``cos``/``sin`` are ``[max_positions, D / 2]`` tables (``reference_gpu.rope_cos_sin``). q, k, v may be
    strided views of a fused QKV projection as long as the last dimension is contiguous. Returns new
    rotated ``(q, k)``; the caches are written in place."""
    if (
        q.dim() != 3
        or k.dim() != 3
        or v.shape != k.shape
        or q.shape[0] != k.shape[0]
        or q.shape[2] != k.shape[2]
    ):
        raise KernelInputError(
            f"need q [T, H, D], k and v [T, KVH, D]; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if head_dim % 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim // 2:
        raise KernelInputError(f"cos/sin must be [positions, {head_dim // 2}], got {tuple(cos.shape)}")
    if k_cache.dim() != 4 or k_cache.shape[2:] != (kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise KernelInputError(f"caches must be [blocks, block_size, {kv_heads}, {head_dim}]")
    if positions.shape != (tokens,) or slot_mapping.shape != (tokens,):
        raise KernelInputError("positions and slot_mapping must be [tokens]")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache, v_cache)):
        raise KernelInputError("q, k, v, cos, sin and the caches need a contiguous last dimension")
    if cos.stride(0) != sin.stride(0):
        raise KernelInputError("cos and sin must share a layout")
    check_device(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    q_out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if tokens:
        half = head_dim // 2
        _rope_kv_write_kernel[(tokens,)](
            q, k, v, positions, cos, sin, slot_mapping, q_out, k_out, k_cache, v_cache,
            heads, kv_heads, head_dim,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            CACHE_BLOCK=k_cache.shape[1], HALF=half, HALF_PAD=next_power_of_2(half), NEOX=neox,
            HEADS_PAD=next_power_of_2(heads), KV_HEADS_PAD=next_power_of_2(kv_heads),
            num_warps=4,
        )  # fmt: skip
    return q_out, k_out
