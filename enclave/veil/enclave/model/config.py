"""Shape and hyper-parameters of a Llama-family decoder, whichever file format it came from."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelConfig"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the forward pass and the KV-cache sizing need to know about a model."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    intermediate: int
    vocab: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    max_context: int
    tied_output: bool
    bos_token_id: int | None
    eos_token_id: int | None
    rope_scaling_type: str | None = None  # None | "linear" | "llama3" (llama3 = per-frequency factors)
    rope_scaling_factor: float = 1.0
    rope_freq_factors: tuple[float, ...] | None = None  # divides each inverse frequency (llama3)
    architecture: str = "llama"

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies across all layers (fp32 keys, bf16 values)."""
        return self.n_layers * self.n_kv_heads * self.head_dim * (4 + 2)
