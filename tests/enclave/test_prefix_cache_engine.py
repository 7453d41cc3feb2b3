"""Prefix caching with the real model and engine: a tenant's second turn reuses its first turn's
blocks and answers exactly as without the cache; another tenant sending the same prefix never
shares a block; blocks that held another tenant's data are zeroed before they are read."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.engine.sync_engine import Delta, EngineRequest, LLMEngine
from veil.enclave.errors import InvalidRequestError
from veil.enclave.runner.cpu import CpuRunner
from veil.enclave.runner.protocol import GREEDY, SeqStep

TENANT_A = b"a" * 32
TENANT_B = b"b" * 32
SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one or two short sentences, name "
    "prices in euros, and never invent opening hours that you were not told about."
)
TURN1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What bread do you sell?"}]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[Delta]]:
    for r in reqs:
        engine.add_request(r.request_id, engine.encode(r), r.params, r.tenant_secret)
    out: dict[str, list[Delta]] = {r.request_id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].append(o.delta)
    return out


def ids(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def same_or_tied(runner: CpuRunner, prompt_ids: list[int], want: list[int], got: list[int]) -> bool:
    """True if ``got == want``; else the first difference must be a tie in the reference logits.

    Cached blocks hold keys and values computed when they were first run (a completion's by the
    decode kernel); recomputing them in one prefill rounds differently (bf16 values), so greedy
    text may take the other of two tokens whose logits tie to bf16 resolution (2**-7 relative),
    as in test_engine's batched runs. A wrong or foreign block gives a clear loser instead.
    """
    if got == want:
        return True
    assert len(got) == len(want)
    k = next(i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b)
    prefix = [*prompt_ids, *want[:k]]
    step = SeqStep(0, prefix, 0, list(range(-(-len(prefix) // runner.block_size))), GREEDY)
    logits = runner.logits([step])[0]
    a, b, best = float(logits[want[k]]), float(logits[got[k]]), float(logits.max())
    assert abs(a - b) <= abs(best) * 2**-7, f"diverged at token {k} without a tie: {a} vs {b}"
    return False


@pytest.fixture(scope="module")
def runners(loaded_model: Any) -> tuple[CpuRunner, CpuRunner]:
    return CpuRunner(loaded_model, num_kv_blocks=64, block_size=16), CpuRunner(
        loaded_model, num_kv_blocks=64, block_size=16
    )


def test_second_turn_reuses_first_turn_blocks_and_answers_the_same(
    runners: tuple[CpuRunner, CpuRunner],
) -> None:
    cached = LLMEngine(runners[0], prefix_caching=True)
    plain = LLMEngine(runners[1])
    first = run(cached, [EngineRequest("t1", greedy(12), messages=TURN1, tenant_secret=TENANT_A)])["t1"]
    assert first[-1].cached_tokens == 0
    turn2 = [
        *TURN1,
        {"role": "assistant", "content": text(first)},
        {"role": "user", "content": "And how much is a baguette?"},
    ]
    hits_before = cached.block_manager.num_cache_hits
    again = run(cached, [EngineRequest("t2", greedy(12), messages=turn2, tenant_secret=TENANT_A)])["t2"]
    reference = run(plain, [EngineRequest("r2", greedy(12), messages=turn2, tenant_secret=TENANT_A)])["r2"]
    reused = cached.block_manager.num_cache_hits - hits_before
    assert reused >= 3  # the system prompt and the first question at least
    assert again[-1].cached_tokens == 16 * reused > 0
    assert reference[-1].cached_tokens == 0  # prefix caching off: nothing reused
    # same tokens as without the cache (up to a bf16 tie, see same_or_tied)
    prompt_ids = plain.encode(EngineRequest("p", greedy(12), messages=turn2))
    same_or_tied(runners[1], prompt_ids, ids(reference), ids(again))

    # the same conversation from another tenant: no block of tenant A, same answer
    other = run(cached, [EngineRequest("b2", greedy(12), messages=turn2, tenant_secret=TENANT_B)])["b2"]
    assert other[-1].cached_tokens == 0
    assert ids(other) == ids(reference)  # computed from scratch, as without the cache
    # no tenant at all: shares nothing
    anon = run(cached, [EngineRequest("n2", greedy(12), messages=turn2)])["n2"]
    assert anon[-1].cached_tokens == 0
    assert cached.block_manager.num_free == cached.block_manager.num_blocks


def test_a_cached_prompt_prefix_gives_exactly_the_uncached_tokens(
    runners: tuple[CpuRunner, CpuRunner],
) -> None:
    """Blocks first computed by a prefill (a shared system prompt) are bit-for-bit what a fresh
    prefill computes, so the answers match exactly, token for token."""
    cached = LLMEngine(runners[0], prefix_caching=True)
    plain = LLMEngine(runners[1])
    stem = SYSTEM + " Tell me about rye bread and its history in northern Europe."
    run(cached, [EngineRequest("s", greedy(1), prompt=stem, tenant_secret=TENANT_A)])
    for i, tail in enumerate([" Also, wheat?", " And what about spelt and barley in old recipes?"]):
        req = EngineRequest(f"q{i}", greedy(24), prompt=stem + tail, tenant_secret=TENANT_A)
        got = run(cached, [req])[req.request_id]
        want = run(plain, [req])[req.request_id]
        assert got[-1].cached_tokens >= 32 and want[-1].cached_tokens == 0
        assert ids(got) == ids(want)


def test_two_tenants_in_flight_with_one_prefix_hold_disjoint_blocks(
    runners: tuple[CpuRunner, CpuRunner],
) -> None:
    engine = LLMEngine(runners[0], prefix_caching=True)
    prompt = SYSTEM + " Tell me about rye."
    run(engine, [EngineRequest("warm", greedy(2), prompt=prompt, tenant_secret=TENANT_A)])
    reqs = [
        EngineRequest("a", greedy(6), prompt=prompt, tenant_secret=TENANT_A),
        EngineRequest("b", greedy(6), prompt=prompt, tenant_secret=TENANT_B),
    ]
    for r in reqs:
        engine.add_request(r.request_id, engine.encode(r), r.params, r.tenant_secret)
    engine.step()
    seq_a, seq_b = (engine._requests[r].seq for r in ("a", "b"))
    assert seq_a.num_cached_tokens > 0 and seq_b.num_cached_tokens == 0
    assert set(seq_a.block_table).isdisjoint(seq_b.block_table)
    bm = engine.block_manager
    assert all(bm.ref_count(b) == 1 for b in seq_b.block_table)
    while engine.has_unfinished():
        engine.step()
    assert bm.num_free == bm.num_blocks


def test_blocks_of_another_tenant_are_zeroed_before_they_are_read(loaded_model: Any) -> None:
    """Tenant A's blocks are filled with non-finite values after A finishes (the worst residue a
    tenant can leave); tenant B's request, which must reuse them, still answers as on a clean
    cache. Without zeroing, the masked tail of B's last block would turn its attention into NaN."""
    runner = CpuRunner(loaded_model, num_kv_blocks=8, block_size=16)  # 128 positions in all
    clean = CpuRunner(loaded_model, num_kv_blocks=8, block_size=16)
    engine = LLMEngine(runner, prefix_caching=True)
    long_a = "Count the loaves: " + "one loaf, " * 30
    run(engine, [EngineRequest("a", greedy(4), prompt=long_a, tenant_secret=TENANT_A)])
    bm = engine.block_manager
    key_a = next(bm.residue(b) for b in range(bm.num_blocks) if isinstance(bm.residue(b), bytes))
    poisoned = [b for b in range(bm.num_blocks) if bm.residue(b) == key_a]
    assert len(poisoned) >= 5 and bm.num_cached >= 4
    runner.cache.k[:, :, poisoned] = float("nan")
    runner.cache.v[:, :, poisoned] = float("inf")
    prompt_b = "Recipe: " + "flour and water, " * 19
    req_b = EngineRequest("b", greedy(8), prompt=prompt_b, tenant_secret=TENANT_B)
    got = run(engine, [req_b])["b"]
    want = run(LLMEngine(clean), [req_b])["b"]
    assert ids(got) == ids(want)
    assert got[-1].finish_reason == "length"
    assert bm.num_evictions > 0
    touched = [b for b in poisoned if bm.residue(b) != key_a]
    assert touched and all(
        torch.isfinite(runner.cache.k[:, :, b]).all() and torch.isfinite(runner.cache.v[:, :, b]).all()
        for b in touched
    )


def test_prefix_caching_off_shares_nothing_and_bad_tenant_secrets_are_refused(
    runners: tuple[CpuRunner, CpuRunner],
) -> None:
    engine = LLMEngine(runners[1])  # the data policy did not allow sharing
    prompt = SYSTEM + " What about croissants?"
    for rid in ("x", "y"):
        out = run(engine, [EngineRequest(rid, greedy(2), prompt=prompt, tenant_secret=TENANT_A)])[rid]
        assert out[-1].cached_tokens == 0
    assert engine.block_manager.num_cached == 0
    for bad in (b"short", b"x" * 65):
        with pytest.raises(InvalidRequestError, match="tenant_secret"):
            engine.encode(EngineRequest("bad", greedy(2), prompt="hi", tenant_secret=bad))
