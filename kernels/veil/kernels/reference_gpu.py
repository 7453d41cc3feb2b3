"""Plain-PyTorch twins of the Triton kernels (``triton_w4a16``, ``triton_int8``, ``triton_paged_attention``,
``triton_paged_prefill``, ``triton_fused``): slow, obvious, and the ground truth their parity tests
compare against.

They take exactly the arguments of their kernel and compute in fp32 with one rounding to the output
dtype at the end, except where the model defines an intermediate rounding (RMSNorm rounds the
normalized row to the activation dtype before the weight multiply, as HF's ``LlamaRMSNorm`` does).
Nothing here depends on Triton, so the file imports on any machine.
"""

from __future__ import annotations

import torch

__all__ = [
    "dequantize_int8_packed",
    "dequantize_q4_1",
    "dequantize_w4a16_packed",
    "int8_matmul_ref",
    "paged_attention_decode_ref",
    "paged_attention_prefill_ref",
    "rmsnorm_residual_ref",
    "rope_cos_sin",
    "rope_kv_write_ref",
    "w4a16_matmul_ref",
]


# ----------------------------------------------------------------------------------------------- matmul


def dequantize_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``W[n, k] = q[n, k] · d[n, k/32] + m[n, k/32]`` in fp32, ``[N, K]``."""
    d32 = d.float().repeat_interleave(32, dim=1)
    m32 = m.float().repeat_interleave(32, dim=1)
    return q.float() * d32 + m32


def dequantize_w4a16_packed(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Dequantize the repacked layout (int32 ``[K/8, N]`` + ``[K/32, N]`` scales/mins) to fp32 ``[N, K]``."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int64) * 4
    q = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
    q = q.reshape(-1, qweight.shape[1]).t()  # [N, K]
    return dequantize_q4_1(q, scales.t(), mins.t())


def w4a16_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> torch.Tensor:
    """``x @ Wᵀ`` in fp32 from the repacked layout, rounded to ``x.dtype``."""
    w = dequantize_w4a16_packed(qweight, scales, mins)
    return (x.float() @ w.t()).to(x.dtype)


def dequantize_int8_packed(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 ``[K, N]`` with scales ``[K/G, N]`` (G = group size, K for per-channel) to fp32 ``[N, K]``."""
    group = qweight.shape[0] // scales.shape[0]
    return (qweight.float() * scales.float().repeat_interleave(group, dim=0)).t()


def int8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ Wᵀ`` in fp32 for an int8 weight-only layer, rounded to ``x.dtype``."""
    return (x.float() @ dequantize_int8_packed(qweight, scales).t()).to(x.dtype)


# -------------------------------------------------------------------------------------------- attention


def _gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> torch.Tensor:  # -> [length, KVH, D]
    block_size = cache.shape[1]
    positions = torch.arange(length, device=cache.device)
    blocks = block_table[positions // block_size].long()
    return cache[blocks, positions % block_size]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int
) -> torch.Tensor:
    """q ``[T, H, D]``, k/v ``[L, KVH, D]``; query i sees keys ``≤ causal_offset + i``. fp32 out."""
    t, h, _ = q.shape
    group = h // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.float(), kf) * scale
    allowed = torch.arange(k.shape[0], device=q.device)[None, :] <= (
        causal_offset + torch.arange(t, device=q.device)[:, None]
    )
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("htl,lhd->thd", probs, vf)


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence (``q [B, H, D]``) over its paged KV (``[NB, BS, KVH, D]``)."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        length = int(context_lens[b])
        if length == 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], length)
        v = _gather_kv(v_cache, block_tables[b], length)
        out[b] = _attend(q[b : b + 1], k, v, scale, length - 1)[0].to(q.dtype)
    return out


def paged_attention_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Packed queries ``q [T, H, D]``; sequence b owns rows ``query_start_loc[b] : query_start_loc[b+1]``,
    which are its last positions, so query i of b sits at ``context_lens[b] - q_len_b + i`` (causal)."""
    out = torch.zeros_like(q)
    for b in range(block_tables.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        length = int(context_lens[b])
        if end == start:
            continue
        k = _gather_kv(k_cache, block_tables[b], length)
        v = _gather_kv(v_cache, block_tables[b], length)
        out[start:end] = _attend(q[start:end], k, v, scale, length - (end - start)).to(q.dtype)
    return out


# ------------------------------------------------------------------------------------------- fused ops


def rmsnorm_residual_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (rounded to x.dtype; ``r = x`` when residual is None), ``out = rmsnorm(r) · w``.

    Matches HF ``LlamaRMSNorm``: the normalized row is rounded to the activation dtype, then multiplied
    by the weight."""
    r = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    rf = r.float()
    normed = (rf * torch.rsqrt(rf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype), r


def rope_cos_sin(
    max_positions: int, rotary_dim: int, theta: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` tables ``[max_positions, rotary_dim / 2]`` for Llama RoPE (no scaling)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)
    )
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x ``[T, heads, D]`` fp32, cos/sin ``[T, D/2]``."""
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:  # HF rotate_half: pairs (i, i + D/2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # GPT-J / GGUF order: pairs (2i, 2i + 1)
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)


def rope_kv_write_ref(
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
    """Rotate q ``[T, H, D]`` and k ``[T, KVH, D]`` at ``positions``; write rotated k and v to the caches
    at ``slot_mapping`` (``block * block_size + offset``; negative = padding, skipped).

    Returns the rotated (q, k)."""
    pos = positions.long()
    qr = _rotate(q.float(), cos[pos], sin[pos], neox).to(q.dtype)
    kr = _rotate(k.float(), cos[pos], sin[pos], neox).to(k.dtype)
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    k_cache[blocks, offsets] = kr[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)
    return qr, kr
