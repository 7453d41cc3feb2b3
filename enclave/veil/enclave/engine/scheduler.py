"""Continuous batching: which sequences run in the next model step, and how many tokens each.

One rule covers prefill and decode: a running sequence feeds ``token_ids[num_computed:]``,
cut to the step's token budget (chunked prefill); a sequence whose step reaches its last
token gets logits and samples one more. Sequences are served oldest first (by ``seq_id``,
which the engine hands out in arrival order):

1. Running sequences, oldest first, each take what they need of the token budget. When the
   free blocks cannot hold a sequence's chunk, the newest running sequence is preempted by
   recompute (its blocks freed, its progress reset, back to the waiting queue), repeatedly,
   down to preempting the sequence itself.
2. If nothing was preempted, waiting sequences are admitted in order while there is budget,
   a batch slot and free blocks for their first chunk; the first that does not fit stops
   admission (first come, first served: nothing overtakes it). A sequence with a tenant cache
   key first takes the cached blocks of its longest cached prefix (its own tenant's only, see
   :class:`~veil.enclave.engine.block_manager.BlockManager`): those tokens count as computed and
   cost no budget. After a step, :meth:`Scheduler.commit` names the newly full blocks in the cache.

The oldest running sequence is never preempted by another, and a sequence whose full
length fits the cache alone always fits once everything newer is gone, so every admitted
sequence finishes. Pure Python: no tensors, no I/O.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from veil.enclave.engine.block_manager import BlockManager
from veil.enclave.engine.sequence import Sequence, SequenceStatus
from veil.enclave.errors import EngineInternalError

__all__ = ["ScheduledSeq", "Scheduler", "SchedulerOutput"]


@dataclass(slots=True)
class ScheduledSeq:
    """``seq`` runs ``token_ids[start_pos : start_pos + num_tokens]`` in this step."""

    seq: Sequence
    start_pos: int
    num_tokens: int

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start_pos : self.start_pos + self.num_tokens]

    @property
    def want_logits(self) -> bool:
        """True when the step reaches the sequence's last token, so a new token is sampled."""
        return self.start_pos + self.num_tokens == len(self.seq.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # blocks that held another tenant's data: the runner zeroes them before this step runs
    zero_blocks: list[int] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


def _key(seq: Sequence) -> int:
    return seq.seq_id


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise EngineInternalError("max_num_seqs and max_num_batched_tokens must be positive")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Both kept sorted by seq_id: oldest first.
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence that grows to ``num_tokens`` tokens can ever be served."""
        return num_tokens <= self.block_manager.capacity_tokens

    def add(self, seq: Sequence, max_total_tokens: int) -> None:
        """Queue ``seq``; it will never grow beyond ``max_total_tokens`` tokens."""
        if not self.fits(max_total_tokens):
            raise EngineInternalError("sequence longer than the KV cache was not rejected at validation")
        if not seq.token_ids:
            raise EngineInternalError("empty sequence was not rejected at validation")
        if self.waiting and seq.seq_id <= self.waiting[-1].seq_id:
            bisect.insort(self.waiting, seq, key=_key)
        else:
            self.waiting.append(seq)
        seq.status = SequenceStatus.WAITING

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n <= 0:
                raise EngineInternalError("running sequence with nothing to compute")
            while not bm.can_grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # preempted itself; everything after it is preempted too
            bm.grow(seq, seq.num_computed + n)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
            i += 1

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                hits = bm.match_prefix(seq)
                start = seq.num_computed + len(hits) * bm.block_size
                n = min(len(seq.token_ids) - start, budget)
                if not bm.can_admit(seq, hits, start + n):
                    break
                self.waiting.pop(0)
                if hits:
                    bm.admit(seq, hits)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = min(start, seq.num_prompt_tokens)
                bm.grow(seq, seq.num_computed + n)
                seq.status = SequenceStatus.RUNNING
                bisect.insort(self.running, seq, key=_key)
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
                budget -= n
        out.zero_blocks = bm.take_zero_list()
        return out

    def commit(self, out: SchedulerOutput) -> None:
        """Record that the model step for ``out`` ran: its tokens are now in the KV cache."""
        for item in out.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed != item.start_pos:
                continue  # finished or aborted while the step ran
            seq.num_computed += item.num_tokens
            self.block_manager.seal(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove ``seq`` (finished, cancelled or failed) and free its blocks. Idempotent."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_key)
        self.num_preemptions += 1
