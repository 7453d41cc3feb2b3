"""Batched token sampling: greedy, temperature, top-k, top-p, reproducible per-request seeds.

Random sampling is inverse-CDF sampling with one uniform number per token, computed from
the request seed and the token's index alone (``mix_seed``, a splitmix64 finaliser: no
generator state). Every other operation is row-wise, so a seeded request draws the same
tokens whatever else shares its batch, and whether or not it was preempted and recomputed.
Rows that use top-k or top-p look at a sorted candidate list: ``topk`` with k = top_k, or a
window of the 1024 most likely tokens for top-p alone (widened to a full sort, row by row,
only when the nucleus is larger than the window). Rows are grouped by that k, which depends
on the row's own parameters only, and each group is one batched ``topk``/``cumsum``/
``searchsorted``. The all-greedy batch is one ``max`` on the logits' device; rows that
sample move to the CPU, where these row-wise ops do not depend on the batch shape.

Structured output: ``allowed`` gives a packed token bitmask per row (or None), xgrammar's
layout, which :func:`apply_token_bitmask` turns into -inf before anything else looks at the
logits. It is row-wise too, so a constrained row never changes an unconstrained neighbour's
token. A row whose mask allows nothing fails like a row of -inf logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.errors import EngineInternalError

__all__ = ["Sampler", "apply_token_bitmask", "mix_seed", "uniform"]

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
        *,
        allowed: Sequence[torch.Tensor | None] | None = None,
    ) -> list[int]:
        """One token id per row of ``logits`` (``[n, vocab]``).

        ``seeds[i]`` is row i's request seed (drawn by the engine when the request gave
        none) and ``steps[i]`` the number of tokens that request has generated so far.
        ``allowed[i]``, when given and not None, is row i's packed token bitmask
        (:func:`apply_token_bitmask`): only the tokens it allows can be picked.
        """
        n = logits.shape[0]
        if logits.dim() != 2 or not len(params) == len(seeds) == len(steps) == n:
            raise EngineInternalError("sampler inputs disagree in length")
        if allowed is not None and len(allowed) != n:
            raise EngineInternalError("sampler inputs disagree in length")
        logits = logits.float()
        if allowed is not None:
            logits = apply_token_bitmask(logits, allowed)
        best, argmax = logits.max(dim=-1)  # max propagates NaN: one pass checks and picks
        if not bool(torch.isfinite(best).all()):
            raise EngineInternalError("logits contain NaN, +inf or a row of -inf")
        out: list[int] = argmax.tolist()
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return out
        sub = logits if len(rows) == n else logits[rows]
        sub = sub.cpu()  # see the module docstring
        temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32).unsqueeze(1)
        probs = torch.softmax(sub / temps, dim=-1)
        us = torch.tensor([uniform(seeds[i], steps[i]) for i in rows], dtype=torch.float64)
        vocab = logits.shape[1]
        groups: dict[int, list[int]] = {}
        for r, i in enumerate(rows):
            groups.setdefault(_candidates(params[i], vocab), []).append(r)
        for k, members in groups.items():
            sel = [rows[r] for r in members]
            if k == 0:
                picked = _sample_full(probs[members], us[members])
            else:
                picked = _sample_top(probs[members], us[members], [params[i] for i in sel], k)
            for i, t in zip(sel, picked, strict=True):
                out[i] = t
        return out


_WINDOW = 1024  # candidates looked at first for top-p alone
_BITS = torch.arange(32, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, allowed: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``logits`` with every token a row's mask does not allow set to -inf (a new tensor if any).

    ``allowed[i]`` is None (row i unconstrained) or an int32 tensor of ``ceil(vocab / 32)``
    words: token t is allowed iff ``(mask[t // 32] >> (t % 32)) & 1`` (xgrammar's and
    llguidance's layout). The mask may be narrower than the logits (the model's vocabulary can
    be padded past the tokenizer's): tokens past its end are not allowed.
    """
    rows = [i for i, m in enumerate(allowed) if m is not None]
    if not rows:
        return logits
    if logits.dim() != 2 or len(allowed) != logits.shape[0]:
        raise EngineInternalError("one mask (or None) per row of logits")
    masks = [allowed[i] for i in rows]
    words = {int(m.shape[-1]) for m in masks if m is not None}
    if len(words) != 1 or any(m is None or m.dim() != 1 or m.dtype != torch.int32 for m in masks):
        raise EngineInternalError("token masks must be int32 vectors of one width")
    vocab = logits.shape[1]
    packed = torch.stack([m for m in masks if m is not None]).to(logits.device)
    bits = ((packed.unsqueeze(-1) >> _BITS.to(logits.device)) & 1).bool().flatten(1)  # [r, words * 32]
    keep = torch.zeros((len(rows), vocab), dtype=torch.bool, device=logits.device)
    width = min(vocab, bits.shape[1])
    keep[:, :width] = bits[:, :width]
    index = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[index] = logits[index].masked_fill(~keep, float("-inf"))
    return out


def uniform(seed: int, step: int) -> float:
    """A number in [0, 1) fixed by the request seed and the token index."""
    return (mix_seed(seed, step) >> 11) * 2.0**-53


def _candidates(p: SamplingParams, vocab: int) -> int:
    """How many top tokens a row looks at: top_k, the top-p window, or 0 for the whole row."""
    if 0 < p.top_k < vocab:
        return p.top_k
    return min(_WINDOW, vocab) if p.top_p < 1.0 else 0


def _sample_full(probs: torch.Tensor, us: torch.Tensor) -> list[int]:
    """Inverse-CDF over the whole vocabulary, in token order."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (us * cdf[:, -1].double()).float().unsqueeze(1)
    j = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return [int(t) for t in j.clamp_(max=probs.shape[1] - 1).tolist()]


def _sample_top(probs: torch.Tensor, us: torch.Tensor, params: list[SamplingParams], k: int) -> list[int]:
    """Top-k, then top-p on the top-k renormalised distribution, over the k most likely tokens."""
    vals, idx = torch.topk(probs, k, dim=-1)  # sorted, most likely first
    cdf = torch.cumsum(vals, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32).unsqueeze(1)
    has_k = torch.tensor([0 < p.top_k < probs.shape[1] for p in params]).unsqueeze(1)
    # top-p is relative to the top-k mass when top-k is on, else to the whole distribution
    ref = torch.where(has_k, cdf[:, -1:], torch.ones_like(top_p))
    out = _pick(vals, idx, cdf, top_p * ref, us)
    for r, p in enumerate(params):
        if not (0 < p.top_k < probs.shape[1]) and float(cdf[r, -1]) < p.top_p:
            # The nucleus is wider than the window: sort this row in full (rare, flat rows).
            v, i = torch.sort(probs[r : r + 1], dim=-1, descending=True, stable=True)
            c = torch.cumsum(v, dim=-1)
            out[r] = _pick(v, i, c, torch.tensor([[p.top_p]]), us[r : r + 1])[0]
    return out


def _pick(
    vals: torch.Tensor, idx: torch.Tensor, cdf: torch.Tensor, threshold: torch.Tensor, us: torch.Tensor
) -> list[int]:
    """Keep the sorted prefix whose mass strictly ahead of each token is below ``threshold``
    (at least one token), then sample it by inverse CDF."""
    keep = ((cdf - vals) < threshold).sum(dim=-1).clamp_(min=1)
    mass = cdf.gather(1, (keep - 1).unsqueeze(1))
    target = (us.unsqueeze(1) * mass.double()).float()
    j = torch.minimum(torch.searchsorted(cdf, target, right=True), (keep - 1).unsqueeze(1))
    return [int(t) for t in idx.gather(1, j).squeeze(1).tolist()]
