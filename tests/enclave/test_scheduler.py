"""Scheduler + block manager, driven by a simulated model with a real paged cache of token ids.

The simulated model writes each fed token into the cache slots its block table names, reads
the whole sequence back through the table, and "predicts" a token that is a hash of what it
read. If two sequences ever shared a block, a block table missed a position, or a chunk was
fed twice or skipped, the prediction would differ from the one an unpaged reference makes
from the true token list — so the final completions check the bookkeeping end to end.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.enclave.engine.block_manager import BlockManager
from veil.enclave.engine.scheduler import Scheduler, SchedulerOutput
from veil.enclave.engine.sequence import Sequence, SequenceStatus
from veil.enclave.errors import EngineInternalError

VOCAB = 1000


def predict(tokens: list[int]) -> int:
    return int.from_bytes(hashlib.blake2b(repr(tokens).encode(), digest_size=4).digest(), "big") % VOCAB


def reference_completion(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(predict(toks))
    return toks[len(prompt) :]


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    arrival: int
    cancel_at: int | None = None


class PagedSim:
    """The model side: a paged cache of token ids instead of keys and values."""

    def __init__(self, bm: BlockManager) -> None:
        self.bs = bm.block_size
        self.slots: list[int | None] = [None] * (bm.num_blocks * bm.block_size)

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        sampled: dict[int, int] = {}
        for item in out.scheduled:
            table = item.seq.block_table
            assert len(table) * self.bs >= item.start_pos + item.num_tokens, "table too short"
            for k, tok in enumerate(item.token_ids):
                pos = item.start_pos + k
                self.slots[table[pos // self.bs] * self.bs + pos % self.bs] = tok
            if item.want_logits:
                end = item.start_pos + item.num_tokens
                seen = [self.slots[table[p // self.bs] * self.bs + p % self.bs] for p in range(end)]
                assert None not in seen
                sampled[item.seq.seq_id] = predict([t for t in seen if t is not None])
        return sampled


def check_invariants(sched: Scheduler, seqs: list[Sequence], out: SchedulerOutput) -> None:
    bm = sched.block_manager
    owned = [b for s in seqs for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block has two owners"
    assert set(owned).isdisjoint(bm.free_blocks())
    assert set(owned) | bm.free_blocks() == set(range(bm.num_blocks)), "a block leaked"
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    assert len(sched.running) <= sched.max_num_seqs
    ids = [i.seq.seq_id for i in out.scheduled]
    assert len(ids) == len(set(ids))
    for item in out.scheduled:
        assert item.num_tokens >= 1
        assert item.start_pos == item.seq.num_computed
        assert item.seq.status is SequenceStatus.RUNNING
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed == 0
    for s in seqs:
        if s.status is SequenceStatus.FINISHED:
            assert s.block_table == []
    assert [s.seq_id for s in sched.running] == sorted(s.seq_id for s in sched.running)
    assert [s.seq_id for s in sched.waiting] == sorted(s.seq_id for s in sched.waiting)


def simulate(
    reqs: list[Req], *, num_blocks: int, block_size: int, max_num_seqs: int, budget: int
) -> tuple[dict[int, list[int]], set[int], Scheduler]:
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    sim = PagedSim(bm)
    seqs = [Sequence(i, list(r.prompt)) for i, r in enumerate(reqs)]
    cancelled: set[int] = set()
    total = sum(len(r.prompt) + r.max_tokens for r in reqs)
    max_steps = 50 + 20 * total * max(1, len(reqs))
    step = 0
    while step <= max(r.arrival for r in reqs) or sched.has_unfinished():
        assert step < max_steps, "no progress: some sequence never finishes"
        for seq, r in zip(seqs, reqs, strict=True):
            if r.arrival == step:
                sched.add(seq, len(r.prompt) + r.max_tokens)
            if r.cancel_at == step and seq.status is not SequenceStatus.FINISHED and r.arrival <= step:
                sched.finish(seq)
                cancelled.add(seq.seq_id)
        out = sched.schedule()
        check_invariants(sched, seqs, out)
        if sched.has_unfinished() and not sched.running:
            assert out.scheduled or not sched.waiting, "idle with work waiting"
        sampled = sim.run(out)
        sched.commit(out)
        for item in out.scheduled:
            seq = item.seq
            assert seq.num_computed == item.start_pos + item.num_tokens
            if seq.seq_id in sampled:
                seq.append_token(sampled[seq.seq_id])
                if seq.num_completion_tokens >= reqs[seq.seq_id].max_tokens:
                    sched.finish(seq)
        step += 1
    assert sched.block_manager.num_free == num_blocks
    return {s.seq_id: s.token_ids[s.num_prompt_tokens :] for s in seqs}, cancelled, sched


req_strategy = st.builds(
    Req,
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24),
    max_tokens=st.integers(1, 10),
    arrival=st.integers(0, 6),
    cancel_at=st.one_of(st.none(), st.integers(0, 30)),
)


@settings(max_examples=150, deadline=None)
@given(
    reqs=st.lists(req_strategy, min_size=1, max_size=7),
    block_size=st.integers(1, 4),
    extra_blocks=st.integers(0, 6),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 40),
)
def test_every_sequence_finishes_with_correct_tokens(
    reqs: list[Req], block_size: int, extra_blocks: int, max_num_seqs: int, budget: int
) -> None:
    longest = max(len(r.prompt) + r.max_tokens for r in reqs)
    num_blocks = -(-longest // block_size) + extra_blocks  # the longest fits alone, often barely
    outputs, cancelled, _ = simulate(
        reqs, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs, budget=budget
    )
    for i, r in enumerate(reqs):
        ref = reference_completion(r.prompt, r.max_tokens)
        if i in cancelled:
            assert outputs[i] == ref[: len(outputs[i])]
        else:
            assert outputs[i] == ref


def test_tiny_kv_budget_preempts_and_recomputes_correctly() -> None:
    reqs = [Req(prompt=list(range(s, s + 6)), max_tokens=10, arrival=0) for s in (0, 100, 200, 300)]
    outputs, _, sched = simulate(reqs, num_blocks=5, block_size=4, max_num_seqs=4, budget=64)
    assert sched.num_preemptions > 0
    for i, r in enumerate(reqs):
        assert outputs[i] == reference_completion(r.prompt, r.max_tokens)


def test_newest_running_sequence_is_preempted_first() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = Sequence(0, [1, 2]), Sequence(1, [3, 4])
    sched.add(old, 6)
    sched.add(new, 6)
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == [old, new]
    sched.commit(out)
    old.append_token(5)
    new.append_token(6)
    out = sched.schedule()  # old needs a second block (one free); then new needs one: none left
    assert [i.seq for i in out.scheduled] == [old]
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING
    assert new.num_computed == 0 and new.block_table == [] and new.num_preemptions == 1
    assert sched.waiting == [new]


def test_chunked_prefill_respects_budget_and_decodes_go_first() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    short = Sequence(0, [1, 2])
    long = Sequence(1, list(range(20)))
    sched.add(short, 10)
    sched.add(long, 30)
    out = sched.schedule()
    assert [(i.seq.seq_id, i.start_pos, i.num_tokens, i.want_logits) for i in out.scheduled] == [
        (0, 0, 2, True),
        (1, 0, 6, False),
    ]
    sched.commit(out)
    short.append_token(7)
    out = sched.schedule()
    assert [(i.seq.seq_id, i.start_pos, i.num_tokens) for i in out.scheduled] == [(0, 2, 1), (1, 6, 7)]
    assert out.scheduled[1].token_ids == list(range(6, 13))


def test_admission_is_first_come_first_served_and_bounded_by_batch() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [Sequence(i, [i] * 3) for i in range(4)]
    for s in seqs:
        sched.add(s, 10)
    out = sched.schedule()
    assert [i.seq.seq_id for i in out.scheduled] == [0, 1]
    assert sched.num_running == 2 and sched.num_waiting == 2
    sched.finish(seqs[0])
    sched.commit(out)
    seqs[1].append_token(9)
    out = sched.schedule()
    assert [i.seq.seq_id for i in out.scheduled] == [1, 2]


def test_finish_is_idempotent_and_frees_waiting_and_running() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    a, b = Sequence(0, [1] * 5), Sequence(1, [2] * 5)
    sched.add(a, 8)
    sched.add(b, 8)
    sched.schedule()
    assert bm.num_free == 6
    sched.finish(a)
    sched.finish(a)
    sched.finish(b)  # still waiting
    assert bm.num_free == 8 and not sched.has_unfinished()


def test_sequence_that_never_fits_is_refused() -> None:
    sched = Scheduler(BlockManager(num_blocks=2, block_size=4), max_num_seqs=1, max_num_batched_tokens=8)
    assert sched.fits(8) and not sched.fits(9)
    with pytest.raises(EngineInternalError):
        sched.add(Sequence(0, [1] * 5), 9)
    with pytest.raises(EngineInternalError):
        sched.add(Sequence(1, []), 4)
    with pytest.raises(EngineInternalError):
        Scheduler(BlockManager(2, 4), max_num_seqs=0, max_num_batched_tokens=8)
