"""Batched token sampling: greedy, temperature, top-k, top-p, reproducible per-request seeds.

Random sampling is inverse-CDF sampling with one uniform number per token, computed from
the request seed and the token's index alone (``mix_seed``, a splitmix64 finaliser: no
generator state). Every other operation is row-wise, so a seeded request draws the same
tokens whatever else shares its batch, and whether or not it was preempted and recomputed.
Only the rows that use top-k or top-p look at a sorted candidate list (``topk`` of the row,
widened to a full sort only when the nucleus is larger than the window); the all-greedy
batch is one ``argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from veil.enclave.errors import EngineInternalError
from veil.enclave.sampling import SamplingParams

__all__ = ["Sampler", "mix_seed", "uniform"]

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
        probs = torch.softmax(logits / temps.unsqueeze(1), dim=-1)
        us = [uniform(seed, step) for seed, step in zip(seeds, steps, strict=True)]
        out = [0] * len(params)
        plain = [r for r, p in enumerate(params) if not (0 < p.top_k < vocab) and p.top_p >= 1.0]
        if plain:
            cdf = torch.cumsum(probs[plain], dim=-1)
            targets = torch.tensor([us[r] for r in plain], dtype=torch.float32) * cdf[:, -1]
            picked = torch.searchsorted(cdf, targets.unsqueeze(1), right=True).squeeze(1)
            for r, t in zip(plain, picked.clamp_(max=vocab - 1).tolist(), strict=True):
                out[r] = int(t)
        for r, p in enumerate(params):
            if 0 < p.top_k < vocab or p.top_p < 1.0:
                out[r] = _sample_filtered(probs[r], p, us[r])
        return out


_WINDOW = 1024  # candidates looked at first for top-p alone


def uniform(seed: int, step: int) -> float:
    """A number in [0, 1) fixed by the request seed and the token index."""
    return (mix_seed(seed, step) >> 11) * 2.0**-53


def _sample_filtered(probs: torch.Tensor, p: SamplingParams, u: float) -> int:
    """Sample one row under top-k, then top-p on the top-k renormalised distribution."""
    vocab = probs.shape[0]
    if 0 < p.top_k < vocab:
        vals, idx = torch.topk(probs, p.top_k)
        cdf = torch.cumsum(vals, dim=0)
    else:
        vals, idx = torch.topk(probs, min(_WINDOW, vocab))
        cdf = torch.cumsum(vals, dim=0)
        if vals.shape[0] < vocab and float(cdf[-1]) < p.top_p:
            vals, idx = torch.sort(probs, descending=True, stable=True)
            cdf = torch.cumsum(vals, dim=0)
    if p.top_p < 1.0:
        # Keep the tokens whose mass strictly ahead of them is below top_p: a prefix, >= 1.
        keep = max(1, int(((cdf - vals) < p.top_p * cdf[-1]).sum()))
        vals, idx, cdf = vals[:keep], idx[:keep], cdf[:keep]
    target = torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype)
    j = min(int(torch.searchsorted(cdf, target, right=True)), vals.shape[0] - 1)
    return int(idx[j])
