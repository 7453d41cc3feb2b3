"""Model weights: format-neutral specs from the loaders, and the fused, packed form the model runs.

A loader (GGUF or safetensors) produces a :class:`LlamaSpecs` — one *spec* per tensor, in the
Hugging Face row layout, still unfused: :class:`~veil.kernels.quant_cpu.Int4Spec`,
:class:`~veil.kernels.quant_cpu.Int8Spec`, or a plain fp32 tensor. :func:`build_weights` then
fuses Q/K/V and gate/up along the output dimension and packs each for its kernel, or — for the
fp32 reference path — expands each into the dense fp32 weight the kernel effectively uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from veil.kernels.quant_cpu import (
    COMPUTE_DTYPE,
    DenseLinear,
    Int4Spec,
    Int8Spec,
    Q8BlockSpec,
    QuantizedLinear,
    effective_weight,
    pack_linear,
)

__all__ = [
    "BlockEmbedding",
    "LayerSpecs",
    "LayerWeights",
    "LlamaSpecs",
    "LlamaWeights",
    "Spec",
    "build_weights",
]

Spec = Int4Spec | Int8Spec | Q8BlockSpec | torch.Tensor


@dataclass(slots=True)
class LayerSpecs:
    attn_norm: torch.Tensor
    q: Spec
    k: Spec
    v: Spec
    o: Spec
    ffn_norm: torch.Tensor
    gate: Spec
    up: Spec
    down: Spec


@dataclass(slots=True)
class LlamaSpecs:
    embed: BlockEmbedding
    layers: Iterable[LayerSpecs]  # a list, or a one-shot generator from a lazy read
    norm: torch.Tensor
    output: Spec  # the (possibly tied) LM head


class BlockEmbedding:
    """Token embedding kept in its block-quantized form; rows are expanded on lookup.

    ``row = (codes - offset) * scale + zero`` per group of ``group`` features, fp32. GGUF Q8_0 is
    ``offset = 0, zero = 0``; Q4_x is ``offset = 8``; a dense table is one group per row with
    ``scale = 1``.
    """

    __slots__ = ("codes", "group", "offset", "scale", "zero")

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        group: int,
        offset: float,
    ) -> None:
        self.codes, self.scale, self.zero, self.group, self.offset = codes, scale, zero, group, offset

    @staticmethod
    def dense(weight: torch.Tensor) -> BlockEmbedding:
        w = weight.float().contiguous()
        return BlockEmbedding(w, torch.ones(w.shape[0], 1), None, w.shape[1], 0.0)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        k = self.shape[1]
        c = self.codes[ids].float()
        if self.offset:
            c -= self.offset
        c = c.view(-1, k // self.group, self.group) * self.scale[ids].unsqueeze(-1)
        if self.zero is not None:
            c += self.zero[ids].unsqueeze(-1)
        return c.view(-1, k)

    def dequantize(self) -> torch.Tensor:
        return self.lookup(torch.arange(self.shape[0]))

    @property
    def nbytes(self) -> int:
        n = self.codes.numel() * self.codes.element_size() + self.scale.numel() * 4
        return n + (self.zero.numel() * 4 if self.zero is not None else 0)


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: QuantizedLinear
    o: QuantizedLinear
    ffn_norm: torch.Tensor
    gate_up: QuantizedLinear
    down: QuantizedLinear


@dataclass(slots=True)
class LlamaWeights:
    embed: BlockEmbedding
    layers: list[LayerWeights]
    norm: torch.Tensor
    output: QuantizedLinear
    reference: bool  # True: dense fp32 effective weights for the reference path

    @property
    def nbytes(self) -> int:
        lin = [
            self.output,
            *(w for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)),
        ]
        return self.embed.nbytes + sum(w.nbytes for w in lin)


class _ConcatLinear:
    """Outputs of several differently-quantized linears side by side (rare: mixed-type fusions)."""

    __slots__ = ("in_features", "out_features", "parts")

    def __init__(self, parts: list[QuantizedLinear]) -> None:
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def _effective(spec: Spec) -> torch.Tensor:
    if isinstance(spec, torch.Tensor):
        return spec.to(COMPUTE_DTYPE).float()
    return effective_weight(spec)


def _pack(spec: Spec) -> QuantizedLinear:
    if isinstance(spec, torch.Tensor):
        return DenseLinear(spec.to(COMPUTE_DTYPE))
    return pack_linear(spec)


def _fuse(specs: list[Spec], reference: bool) -> QuantizedLinear:
    if reference:
        return DenseLinear(torch.cat([_effective(s) for s in specs]))
    if all(isinstance(s, Int4Spec) for s in specs) and len({s.group_size for s in specs}) == 1:  # type: ignore[union-attr]
        return pack_linear(Int4Spec.concat([s for s in specs if isinstance(s, Int4Spec)]))
    if all(isinstance(s, Int8Spec) for s in specs):
        return pack_linear(Int8Spec.concat([s for s in specs if isinstance(s, Int8Spec)]))
    if all(isinstance(s, Q8BlockSpec) for s in specs):
        return pack_linear(Q8BlockSpec.concat([s for s in specs if isinstance(s, Q8BlockSpec)]))
    if all(isinstance(s, torch.Tensor) for s in specs):
        return DenseLinear(torch.cat([s for s in specs if isinstance(s, torch.Tensor)]).to(COMPUTE_DTYPE))
    return _ConcatLinear([_pack(s) for s in specs])


def build_weights(specs: LlamaSpecs, *, reference: bool = False) -> LlamaWeights:
    """Fuse and pack ``specs`` for the kernels, or expand them to fp32 for the reference path."""
    layers = [
        LayerWeights(
            attn_norm=ls.attn_norm.float().contiguous(),
            qkv=_fuse([ls.q, ls.k, ls.v], reference),
            o=_fuse([ls.o], reference),
            ffn_norm=ls.ffn_norm.float().contiguous(),
            gate_up=_fuse([ls.gate, ls.up], reference),
            down=_fuse([ls.down], reference),
        )
        for ls in specs.layers
    ]
    return LlamaWeights(
        embed=specs.embed,
        layers=layers,
        norm=specs.norm.float().contiguous(),
        output=_fuse([specs.output], reference),
        reference=reference,
    )
