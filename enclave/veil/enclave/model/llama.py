"""Llama forward pass over a paged KV cache, for a batch of sequences of different lengths.

One call runs every scheduled token of every sequence at once: the token rows of all sequences
are stacked into one ``[T, hidden]`` matrix, so each quantized matmul (QKV fused, O, gate+up fused,
down, LM head) runs once per layer for the whole batch. Only attention is per group: all
single-token decode steps share one paged-attention call that reads each sequence's blocks in
place; each prefill chunk runs its own causal attention.

Two implementations of the same step: on CPUs with AVX-512 BF16 (and Veil's kernels built, see
:mod:`veil.kernels.cpu_ext`) the forward is nine fused calls per layer — RMSNorm→bf16, QKV,
RoPE + cache write, paged decode attention, O + residual, RMSNorm→bf16, gate+up, SiLU·up→bf16,
down + residual; elsewhere it is the same math in PyTorch ops (PyTorch's int4/int8 kernels, a
batched matmul over gathered blocks).

The KV cache holds ``[n_kv_heads, num_blocks, block_size, head_dim]`` per layer (see
:class:`KVCache`); a sequence's positions live in the blocks its block table names, in order.

Numerics: the residual stream, RMSNorm, RoPE, attention and the returned logits are fp32; the
inputs of the quantized matmuls are bf16 (what the fast kernels take). Veil's kernels return fp32
(exact products of the file's codes and scales, fp32 sums); PyTorch's return bf16.
:func:`reference_forward` is the plain fp32 twin (contiguous, one sequence, dense weights) the
tests compare against.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from veil.enclave.model.config import ModelConfig
from veil.enclave.model.weights import LlamaWeights
from veil.kernels.quant_cpu import COMPUTE_DTYPE, PackedLinear, QuantizedLinear

V_DTYPE = COMPUTE_DTYPE
"""Values are cached in bf16 (rounded once from the QKV matmul's output; exact when that is bf16)."""

__all__ = [
    "V_DTYPE",
    "BatchPlan",
    "KVCache",
    "LlamaModel",
    "PrefillChunk",
    "reference_forward",
    "rope_tables",
]


def rope_tables(config: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim] (rotate-half layout) with the file's theta and scaling."""
    half = config.head_dim // 2
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float64) * 2.0 / config.head_dim))
    if config.rope_freq_factors is not None:
        inv = inv / torch.tensor(config.rope_freq_factors[:half], dtype=torch.float64)
    pos = torch.arange(max_positions, dtype=torch.float64)
    if config.rope_scaling_type == "linear":
        pos = pos / config.rope_scaling_factor
    ang = torch.outer(pos, inv)
    ang = torch.cat([ang, ang], dim=1)
    return ang.cos().float().contiguous(), ang.sin().float().contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [T, H, D] fp32 with cos/sin [T, 1, D] (rotate-half)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half) on ``x`` [T, H, D] (bf16 or fp32) → fp32, in three kernels.

    ``rotate_half(x) * sin`` is ``flip(halves of x) * sin_signed`` with ``sin_signed`` the sine
    whose first half is negated; bf16 inputs widen to fp32 exactly inside the multiplications.
    """
    t, h, d = x.shape
    swapped = x.view(t, h, 2, d // 2).flip(2).view(t, h, d)
    return torch.addcmul(x * cos, swapped, sin_signed)


class KVCache:
    """Keys and values of every layer: ``[layers, n_kv, num_blocks, block_size, head_dim]``.

    Heads lead so that gathering a sequence's blocks, ``k[layer][:, table]``, yields
    ``[n_kv, nb, block_size, head_dim]`` — already the ``[heads, positions, dim]`` operand a batched
    matmul takes, with no further copy. Keys are fp32 (RoPE makes them fp32 values). Values are bf16
    (:data:`V_DTYPE`), rounded once (2⁻⁹ relative; exact on the PyTorch path, whose QKV matmul
    already returns bf16), and attention widens them back to fp32. Decode attention at a batch is
    bound by reading the cache from memory, so this cuts its traffic by a quarter.
    """

    __slots__ = ("_buffers", "block_size", "k", "k_flat", "num_blocks", "v", "v_flat")

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int) -> None:
        shape = (config.n_layers, config.n_kv_heads, num_blocks, block_size, config.head_dim)
        n = math.prod(shape)
        # Anonymous mappings read as zeros and take memory only when a page is first written,
        # so a large budget costs resident memory only for the blocks actually used.
        self._buffers = (mmap.mmap(-1, n * 4), mmap.mmap(-1, n * 2))
        self.k = torch.frombuffer(self._buffers[0], dtype=torch.float32).view(shape)
        self.v = torch.frombuffer(self._buffers[1], dtype=V_DTYPE).view(shape)
        self.num_blocks, self.block_size = num_blocks, block_size
        # per layer [n_kv, num_blocks * block_size, head_dim]: the slot-indexed views writes use
        self.k_flat = [k.view(config.n_kv_heads, -1, config.head_dim) for k in self.k]
        self.v_flat = [v.view(config.n_kv_heads, -1, config.head_dim) for v in self.v]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero every slot of ``blocks`` in every layer (a block passing to another tenant)."""
        if blocks:
            index = torch.tensor(blocks, dtype=torch.long)
            self.k.index_fill_(2, index, 0.0)
            self.v.index_fill_(2, index, 0.0)


@dataclass(slots=True)
class PrefillChunk:
    """A multi-token step of one sequence: rows ``[row, row + n)`` of the batch."""

    row: int
    n: int
    blocks: torch.Tensor  # [nb] block ids covering [0, start + n)
    ctx: int  # start + n
    first_block: int | None  # the table's first block when its blocks are consecutive (a view, no gather)
    mask: torch.Tensor  # [n, nb * block_size] bool, True = attend


@dataclass(slots=True)
class BatchPlan:
    """Everything about one batch that does not depend on the layer, computed once per step."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] int64
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D], first half negated (see :func:`_rope`)
    slots: torch.Tensor  # [T] flat cache slot (block * block_size + offset) for each new token
    decode_rows: torch.Tensor | None  # [B] rows that are single-token steps (None: none)
    decode_all: bool  # every row is a decode step, in order
    decode_blocks: torch.Tensor | None  # [B, nb] padded block tables
    decode_mask: torch.Tensor | None  # [B, 1, 1, nb * block_size] fp32, 0 or -inf
    decode_ctx: torch.Tensor | None  # [B] int64 context lengths (the query is the last position)
    decode_span: tuple[int, int] | None  # (first block, nb): one decode row whose blocks are consecutive
    prefills: list[PrefillChunk]
    logit_rows: torch.Tensor  # [n_out] rows whose logits are returned

    @staticmethod
    def build(
        steps: list[tuple[list[int], int, list[int], bool]],
        block_size: int,
        cos_table: torch.Tensor,
        sin_table: torch.Tensor,
    ) -> BatchPlan:
        """``steps``: (token_ids, start_pos, block_table, want_logits) per sequence."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        dec_rows: list[int] = []
        dec_tables: list[list[int]] = []
        dec_ctx: list[int] = []
        prefills: list[PrefillChunk] = []
        logit_rows: list[int] = []
        for tokens, start, table, want in steps:
            row, n = len(ids), len(tokens)
            ids.extend(tokens)
            for p in range(start, start + n):
                pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            nb = (start + n + block_size - 1) // block_size
            if n == 1:
                dec_rows.append(row)
                dec_tables.append(table[:nb])
                dec_ctx.append(start + 1)
            else:
                kv = torch.arange(nb * block_size)
                q = torch.arange(start, start + n)
                mask = kv[None, :] <= q[:, None]
                first = table[0] if _consecutive(table[:nb]) else None
                prefills.append(PrefillChunk(row, n, torch.tensor(table[:nb]), start + n, first, mask))
            if want:
                logit_rows.append(row + n - 1)
        pos_t = torch.tensor(pos)
        sin_signed = sin_table[pos_t]  # a fresh tensor: fold rotate-half's sign in once per step
        sin_signed[:, : sin_signed.shape[1] // 2].neg_()
        decode_blocks = decode_mask = decode_rows = decode_ctx = None
        decode_span = None
        if len(dec_tables) == 1 and _consecutive(dec_tables[0]):
            decode_span = (dec_tables[0][0], len(dec_tables[0]))
        if dec_rows:
            width = max(len(t) for t in dec_tables)
            decode_blocks = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables])
            kv = torch.arange(width * block_size)
            keep = kv[None, :] < torch.tensor(dec_ctx)[:, None]
            decode_mask = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))[:, None, None, :]
            decode_rows = torch.tensor(dec_rows)
            decode_ctx = torch.tensor(dec_ctx)
        return BatchPlan(
            token_ids=torch.tensor(ids),
            positions=pos_t,
            cos=cos_table[pos_t].unsqueeze(1),
            sin=sin_signed.unsqueeze(1),
            slots=torch.tensor(slots),
            decode_rows=decode_rows,
            decode_all=not prefills,
            decode_blocks=decode_blocks,
            decode_mask=decode_mask,
            decode_ctx=decode_ctx,
            decode_span=decode_span,
            prefills=prefills,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        )


def _consecutive(table: list[int]) -> bool:
    """Whether ``table`` names consecutive blocks (the common case for one sequence, as the block
    manager hands out a FIFO free list): its cache rows are then a strided view, not a gather."""
    return (
        bool(table)
        and table[-1] - table[0] == len(table) - 1
        and table == list(range(table[0], table[0] + len(table)))
    )


class LlamaModel:
    """The quantized forward pass. Holds weights and RoPE tables; the KV cache is passed in."""

    def __init__(self, config: ModelConfig, weights: LlamaWeights) -> None:
        self.config = config
        self.weights = weights
        self.cos, self.sin = rope_tables(config, config.max_context)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        # Veil's fused CPU kernels, when every matmul runs on them and the shapes suit their vectors.
        linears = [
            weights.output,
            *(getattr(layer, n) for layer in weights.layers for n in ("qkv", "o", "gate_up", "down")),
        ]
        self.fused = (
            all(isinstance(lin, PackedLinear) for lin in linears)
            and config.head_dim % 32 == 0
            and config.head_dim <= 256
            and config.hidden % 16 == 0
            and config.intermediate % 16 == 0
        )

    def forward(self, plan: BatchPlan, cache: KVCache) -> torch.Tensor:
        """fp32 logits [len(plan.logit_rows), vocab]."""
        if self.fused:
            return self._forward_fused(plan, cache)
        cfg, w = self.config, self.weights
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        k_end = (nh + nkv) * hd
        inter = cfg.intermediate
        x = w.embed.lookup(plan.token_ids)  # [T, H] fp32
        t = x.shape[0]
        for li, layer in enumerate(w.layers):
            h = F.rms_norm(x, (cfg.hidden,), layer.attn_norm, cfg.rms_eps).to(COMPUTE_DTYPE)
            qkv = layer.qkv(h)
            qk = _rope(qkv[:, :k_end].float().view(t, nh + nkv, hd), plan.cos, plan.sin)
            cache.k_flat[li].index_copy_(1, plan.slots, qk[:, nh:].transpose(0, 1))
            v = qkv[:, k_end:].view(t, nkv, hd).transpose(0, 1)
            cache.v_flat[li].index_copy_(1, plan.slots, v.to(V_DTYPE))
            attn = self._attention(plan, qk[:, :nh], cache, li)
            _add_linear(x, layer.o, attn)
            h = F.rms_norm(x, (cfg.hidden,), layer.ffn_norm, cfg.rms_eps).to(COMPUTE_DTYPE)
            gu = layer.gate_up(h)
            _add_linear(x, layer.down, F.silu(gu[:, :inter]) * gu[:, inter:])
        x = x[plan.logit_rows]
        x = F.rms_norm(x, (cfg.hidden,), w.norm, cfg.rms_eps).to(COMPUTE_DTYPE)
        return w.output(x).float()

    def _forward_fused(self, plan: BatchPlan, cache: KVCache) -> torch.Tensor:
        """The same forward on Veil's fused CPU kernels: nine calls per layer (see ``cpu/fused.cpp``)."""
        cfg, w, ops = self.config, self.weights, torch.ops.veil_cpu
        x = w.embed.lookup(plan.token_ids)  # [T, H] fp32
        for li, layer in enumerate(w.layers):
            qkv = layer.qkv(ops.rms_norm_bf16(x, layer.attn_norm, cfg.rms_eps))
            q = ops.rope_store(
                qkv, self.cos, self.sin, plan.positions, plan.slots,
                cache.k_flat[li], cache.v_flat[li], cfg.n_heads, cfg.n_kv_heads,
            )  # fmt: skip
            _add_linear(x, layer.o, self._attention(plan, q, cache, li))
            gu = layer.gate_up(ops.rms_norm_bf16(x, layer.ffn_norm, cfg.rms_eps))
            _add_linear(x, layer.down, ops.silu_mul_bf16(gu))
        x = ops.rms_norm_bf16(x[plan.logit_rows], w.norm, cfg.rms_eps)
        return w.output(x).float()

    def _attention(self, plan: BatchPlan, q: torch.Tensor, cache: KVCache, li: int) -> torch.Tensor:
        """q [T, nh, hd] fp32 → [T, nh * hd] in the compute dtype."""
        t, nh, hd = q.shape
        kc, vc = cache.k[li], cache.v[li]
        nkv = kc.shape[0]
        if plan.decode_all:
            if self.fused:
                return self._decode_fused(plan, q, cache, li, bf16_out=True)
            return self._decode_attention(plan, q, kc, vc).reshape(t, nh * hd).to(COMPUTE_DTYPE)
        out = torch.empty(t, nh, hd, dtype=q.dtype)
        if plan.decode_rows is not None:
            qd = q[plan.decode_rows]
            if self.fused:
                out[plan.decode_rows] = self._decode_fused(plan, qd, cache, li, bf16_out=False).view(qd.shape)
            else:
                out[plan.decode_rows] = self._decode_attention(plan, qd, kc, vc)
        for c in plan.prefills:
            if c.first_block is not None:
                nb = c.blocks.shape[0]
                kk = kc[:, c.first_block : c.first_block + nb].reshape(1, nkv, -1, hd)
                vv = vc[:, c.first_block : c.first_block + nb].reshape(1, nkv, -1, hd).float()
            else:
                kk = kc.index_select(1, c.blocks).view(1, nkv, -1, hd)
                vv = vc.index_select(1, c.blocks).view(1, nkv, -1, hd).float()
            qq = q[c.row : c.row + c.n].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=c.mask, scale=self.scale, enable_gqa=True
            )
            out[c.row : c.row + c.n] = o[0].transpose(0, 1)
        return out.view(t, nh * hd).to(COMPUTE_DTYPE)

    def _decode_fused(
        self, plan: BatchPlan, q: torch.Tensor, cache: KVCache, li: int, bf16_out: bool
    ) -> torch.Tensor:
        """Decode rows on the paged-attention kernel: reads each sequence's blocks in place."""
        if plan.decode_blocks is None or plan.decode_ctx is None:  # internal invariant
            raise RuntimeError("decode attention without decode rows")
        out: torch.Tensor = torch.ops.veil_cpu.decode_attention(
            q, cache.k_flat[li], cache.v_flat[li], plan.decode_blocks, plan.decode_ctx,
            cache.block_size, self.scale, bf16_out,
        )  # fmt: skip
        return out

    def _decode_attention(
        self, plan: BatchPlan, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor
    ) -> torch.Tensor:
        """One query per sequence: batched matmuls over gathered blocks (GQA by reshaping q)."""
        b, nh, hd = q.shape
        nkv = kc.shape[0]
        blocks, mask = plan.decode_blocks, plan.decode_mask
        if blocks is None or mask is None:  # internal invariant: only called with decode rows
            raise RuntimeError("decode attention without decode rows")
        rep = nh // nkv
        if plan.decode_span is not None and b == 1:
            # One sequence on consecutive blocks: read the cache in place (same values, no copy).
            first, nb = plan.decode_span
            kk = kc[:, first : first + nb].view(nkv, -1, hd)
            vv = vc[:, first : first + nb].reshape(nkv, -1, hd).float()
            qq = q.view(nkv, rep, hd)
        else:
            flat = blocks.view(-1)
            # Gathered blocks come out as [nkv, B, L, hd], contiguous: batch dim nkv·B for bmm with
            # no copy. q is the small operand, so it is the one reordered to match.
            kk = kc.index_select(1, flat).view(nkv * b, -1, hd)
            vv = vc.index_select(1, flat).view(nkv * b, -1, hd).float()
            qq = q.view(b, nkv, rep, hd).transpose(0, 1).reshape(nkv * b, rep, hd)
        # 3-d bmm directly (what matmul lowers to, without its reshapes); same kernels either way
        s = torch.bmm(qq, kk.transpose(1, 2)).mul_(self.scale)
        s.view(nkv, b, rep, -1).add_(mask.view(1, b, 1, -1))
        o = torch.bmm(s.softmax(-1), vv)  # [nkv·B, rep, hd]
        return o.view(nkv, b, rep, hd).transpose(0, 1).reshape(b, nh, hd)


def _add_linear(out: torch.Tensor, linear: QuantizedLinear, x: torch.Tensor) -> None:
    """``out += linear(x)``, fused into the matmul where the kernel can accumulate in place."""
    if isinstance(linear, PackedLinear):
        linear.add_(out, x)
    else:
        out += linear(x)


def reference_forward(
    config: ModelConfig, weights: LlamaWeights, token_ids: list[int], *, last_only: bool = False
) -> torch.Tensor:
    """fp32 logits [len(token_ids), vocab] of one sequence: dense weights, plain ops, no cache.

    ``last_only``: return just the last position's logits, [1, vocab].
    """
    nh, nkv, hd = config.n_heads, config.n_kv_heads, config.head_dim
    n = len(token_ids)
    cos, sin = rope_tables(config, n)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    ids = torch.tensor(token_ids)
    x = weights.embed.lookup(ids)

    def rms(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + config.rms_eps) * g

    def lin(layer_w: object, v: torch.Tensor) -> torch.Tensor:
        return layer_w(v.float())  # type: ignore[operator, no-any-return]

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in weights.layers:
        h = rms(x, layer.attn_norm)
        qkv = lin(layer.qkv, h)
        q = _rotate(qkv[:, : nh * hd].view(n, nh, hd), cos, sin)
        k = _rotate(qkv[:, nh * hd : (nh + nkv) * hd].view(n, nkv, hd), cos, sin)
        v = qkv[:, (nh + nkv) * hd :].view(n, nkv, hd)
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        s = s.masked_fill(~causal, float("-inf")).softmax(-1)
        a = torch.einsum("hqk,khd->qhd", s, v).reshape(n, nh * hd)
        x = x + lin(layer.o, a)
        h = rms(x, layer.ffn_norm)
        gu = lin(layer.gate_up, h)
        i = config.intermediate
        x = x + lin(layer.down, F.silu(gu[:, :i]) * gu[:, i:])
    if last_only:
        x = x[-1:]
    return lin(weights.output, rms(x, weights.norm))
