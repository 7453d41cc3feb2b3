"""Batched token sampling: greedy, temperature, top-k, top-p, reproducible per-request seeds.

Random sampling uses the exponential race: with ``E_i ~ Exp(1)`` independent, ``argmax_i
p_i / E_i`` is distributed as ``p``. The noise for a row comes from a generator seeded by
``mix(seed, step)`` alone (``step`` = the index of the token being sampled), and every other
operation is row-wise, so a seeded request draws the same tokens whatever else shares its
batch, and whether or not it was preempted and recomputed. The all-greedy batch is one
``argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from veil.enclave.errors import EngineInternalError
from veil.enclave.sampling import SamplingParams

__all__ = ["Sampler", "mix_seed"]

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from a request seed and a token index (splitmix64 finalizer)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class Sampler:
    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
    ) -> list[int]:
        """One token id per row of ``logits`` (``[n, vocab]``).

        ``seeds[i]`` is row i's request seed (drawn by the engine when the request gave
        none) and ``steps[i]`` the number of tokens that request has generated so far.
        """
        n = logits.shape[0]
        if logits.dim() != 2 or not len(params) == len(seeds) == len(steps) == n:
            raise EngineInternalError("sampler inputs disagree in length")
        logits = logits.float()
        if bool(torch.isnan(logits).any()) or bool((logits.amax(dim=-1) == float("-inf")).any()):
            raise EngineInternalError("logits contain NaN or a row of -inf")
        out = logits.argmax(dim=-1).tolist()
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return [int(t) for t in out]
        picked = self._sample_random(
            logits[rows], [params[i] for i in rows], [seeds[i] for i in rows], [steps[i] for i in rows]
        )
        for i, t in zip(rows, picked, strict=True):
            out[i] = t
        return [int(t) for t in out]

    def _sample_random(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
    ) -> list[int]:
        vocab = logits.shape[1]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        x = logits / temps.unsqueeze(1)
        if any(p.top_k or p.top_p < 1.0 for p in params):
            x = _filter_top_k_top_p(x, params, vocab)
        probs = torch.softmax(x, dim=-1)
        noise = torch.empty_like(probs)
        gen = torch.Generator(device="cpu")
        for r, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
            gen.manual_seed(mix_seed(seed, step))
            noise[r].exponential_(generator=gen)
        noise.clamp_(min=torch.finfo(torch.float32).tiny)
        return [int(t) for t in (probs / noise).argmax(dim=-1).tolist()]


def _filter_top_k_top_p(x: torch.Tensor, params: Sequence[SamplingParams], vocab: int) -> torch.Tensor:
    """Set to -inf what top-k, then top-p (on the top-k renormalised distribution), exclude."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab).unsqueeze(0)
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params]).unsqueeze(1)
    sorted_x = sorted_x.masked_fill(ranks >= ks, float("-inf"))
    top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32).unsqueeze(1)
    sorted_p = torch.softmax(sorted_x, dim=-1)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly ahead of each token
    drop = (before >= top_ps) & (ranks > 0)  # always keep the most likely token
    sorted_x = sorted_x.masked_fill(drop & (top_ps < 1.0), float("-inf"))
    return torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x)
