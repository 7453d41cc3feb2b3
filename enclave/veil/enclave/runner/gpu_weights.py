"""The CUDA runner's weights: the loader's unpacked specs repacked once for the Triton kernels.

Int4 specs become the w4a16 layout, int8 specs the int8 weight-only layout, 16-bit tensors (or a
rare mix of kinds) one dense weight; Q/K/V and gate/up are fused along the output dimension. A
tied LM head over a GGUF Q8_0 embedding uses the embedding's own group-32 int8 codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from veil.enclave.model.config import ModelConfig
from veil.enclave.model.weights import BlockEmbedding, LlamaSpecs, Spec
from veil.kernels.quant_cpu import Int4Spec, Int8Spec
from veil.kernels.triton_linear import (
    DenseCudaLinear,
    Int8WeightOnlyLinear,
    W4A16Linear,
    w4a16_from_scale_zero,
)

__all__ = ["GpuLayer", "GpuWeights", "Linear", "build_gpu_weights"]

Linear = W4A16Linear | Int8WeightOnlyLinear | DenseCudaLinear


@dataclass(slots=True)
class GpuLayer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    ffn_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass(slots=True)
class GpuWeights:
    embed: BlockEmbedding  # on the device; rows expanded on lookup
    layers: list[GpuLayer]
    norm: torch.Tensor
    output: Linear

    @property
    def nbytes(self) -> int:
        lin = [self.output, *(w for la in self.layers for w in (la.qkv, la.o, la.gate_up, la.down))]
        return self.embed.nbytes + sum(w.nbytes for w in lin)


def _dense(spec: Spec) -> torch.Tensor:
    return spec.float() if isinstance(spec, torch.Tensor) else spec.dequantize()


def _gpu_linear(specs: list[Spec], device: torch.device, dtype: torch.dtype) -> Linear:
    """Fuse ``specs`` along the output dimension and pack them for the GPU kernels."""
    if all(isinstance(s, Int4Spec) and s.group_size == 32 for s in specs):
        spec = Int4Spec.concat([s for s in specs if isinstance(s, Int4Spec)])
        return W4A16Linear(w4a16_from_scale_zero(spec.codes, spec.scale, spec.zero).to(device))
    if all(isinstance(s, Int8Spec) for s in specs):
        spec8 = Int8Spec.concat([s for s in specs if isinstance(s, Int8Spec)])
        lin = Int8WeightOnlyLinear.from_codes(spec8.codes, spec8.scale.float())
        return Int8WeightOnlyLinear(lin.weight.to(device))
    # 16-bit tensors, or a rare mix of kinds: one dense weight
    return DenseCudaLinear(torch.cat([_dense(s) for s in specs]).to(device, dtype))


def _lm_head(specs: LlamaSpecs, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Linear:
    e = specs.embed
    q8_embedding = e.codes.dtype == torch.int8 and e.zero is None and not e.offset and e.group == 32
    if config.tied_output and q8_embedding:
        # The GGUF Q8_0 table itself (group-32 scales), not a per-channel re-quantization of it.
        lin = Int8WeightOnlyLinear.from_codes(e.codes, e.scale.reshape(e.codes.shape[0], -1))
        return Int8WeightOnlyLinear(lin.weight.to(device))
    return _gpu_linear([specs.output], device, dtype)


def build_gpu_weights(
    specs: LlamaSpecs, config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> GpuWeights:
    """Repack the loader's specs for the Triton kernels and move them to ``device``."""
    layers = [
        GpuLayer(
            attn_norm=ls.attn_norm.to(device, dtype),
            qkv=_gpu_linear([ls.q, ls.k, ls.v], device, dtype),
            o=_gpu_linear([ls.o], device, dtype),
            ffn_norm=ls.ffn_norm.to(device, dtype),
            gate_up=_gpu_linear([ls.gate, ls.up], device, dtype),
            down=_gpu_linear([ls.down], device, dtype),
        )
        for ls in specs.layers
    ]
    e = specs.embed
    embed = BlockEmbedding(
        e.codes.to(device),
        e.scale.to(device),
        None if e.zero is None else e.zero.to(device),
        e.group,
        e.offset,
    )
    return GpuWeights(embed, layers, specs.norm.to(device, dtype), _lm_head(specs, config, device, dtype))
