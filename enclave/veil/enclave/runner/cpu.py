"""The one owner of model tensors and the KV cache: runs scheduled steps, returns logits.

The scheduler (pure Python) decides which sequences run and which KV blocks they own; it hands
the runner a list of :class:`SeqStep` and gets back the logits of the last position of each step
that asked for them. The runner knows nothing about requests, sampling or text.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from veil.enclave.errors import InvalidRequestError
from veil.enclave.model.config import ModelConfig
from veil.enclave.model.llama import BatchPlan, KVCache, LlamaModel
from veil.enclave.model.loader import LoadedModel, default_model_path, load_model

__all__ = ["ModelRunner", "SeqStep", "default_model_path", "load_model", "validate_steps"]

T = TypeVar("T")


def _init_model_thread(tid: list[int], threads: int) -> None:
    tid.append(threading.get_ident())
    torch.set_num_threads(threads)


@dataclass(slots=True)
class SeqStep:
    """One sequence's work in a step."""

    seq_id: int
    token_ids: list[int]  # tokens to run now: a prefill chunk, or 1 token in decode
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int] = field(default_factory=list)  # physical blocks covering [0, start_pos + n)
    want_logits: bool = True  # only the last position's logits are returned


def validate_steps(
    steps: list[SeqStep], *, block_size: int, num_kv_blocks: int, max_context: int, vocab: int
) -> None:
    """Reject a step no runner may execute (shared by the CPU and CUDA runners)."""
    bs = block_size
    for s in steps:
        n = len(s.token_ids)
        end = s.start_pos + n
        if n == 0 or s.start_pos < 0:
            raise InvalidRequestError(f"sequence {s.seq_id}: empty step or negative start position")
        if end > max_context:
            raise InvalidRequestError(f"sequence {s.seq_id}: position {end} exceeds the context")
        if len(s.block_table) * bs < end:
            raise InvalidRequestError(f"sequence {s.seq_id}: block table too short for {end} tokens")
        if any(b < 0 or b >= num_kv_blocks for b in s.block_table[: (end + bs - 1) // bs]):
            raise InvalidRequestError(f"sequence {s.seq_id}: block id out of range")
        if any(t < 0 or t >= vocab for t in s.token_ids):
            raise InvalidRequestError(f"sequence {s.seq_id}: token id out of range")


class ModelRunner:
    """Executes batches of :class:`SeqStep` against a paged KV cache of ``num_kv_blocks`` blocks."""

    def __init__(
        self, model: LoadedModel, num_kv_blocks: int, block_size: int = 16, threads: int | None = None
    ) -> None:
        if num_kv_blocks < 1 or block_size < 1:
            raise InvalidRequestError("the KV cache needs at least one block of at least one slot")
        self.threads = threads or os.cpu_count() or 1
        # Every forward runs on this one thread. OpenMP (libgomp) keeps a thread team per calling
        # thread; once the teams of all threads together hold more threads than there are cores,
        # libgomp stops spin-waiting and every op pays a futex wake-up: decode speed halved on 2
        # cores when the engine's worker thread and the loading thread both had teams. So all
        # multi-threaded torch work of the engine belongs on this thread (see ``call``).
        self._tid: list[int] = []  # filled by the model thread (no reference back to self)
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="veil-model",
            initializer=_init_model_thread,
            initargs=(self._tid, self.threads),
        )
        self._callers: set[int] = set()
        # A dropped runner must not leave its thread (and its OpenMP team) behind.
        weakref.finalize(self, self._pool.shutdown, wait=False)
        self.config: ModelConfig = model.config
        self.tokenizer = model.tokenizer
        self.chat_template: str | None = model.chat_template
        self.eos_token_ids: frozenset[int] = model.eos_token_ids
        self.model_digest: bytes = model.model_digest
        self.max_context: int = model.config.max_context
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.model, self.cache = self._pool.submit(self._build, model, num_kv_blocks, block_size).result()

    @staticmethod
    def _build(model: LoadedModel, num_kv_blocks: int, block_size: int) -> tuple[LlamaModel, KVCache]:
        return LlamaModel(model.config, model.weights), KVCache(model.config, num_kv_blocks, block_size)

    @property
    def _thread(self) -> int | None:
        return self._tid[0] if self._tid else None

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the model thread (for other multi-threaded torch work, e.g. sampling)."""
        if threading.get_ident() == self._thread:
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` on the model thread. The engine runs its whole step there (schedule,
        forward, sampling, detokenizing): one thread hand-off per step instead of two, and the
        sampler's torch work joins the model thread's OpenMP team instead of competing with it."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Stop the model thread (idempotent); the runner cannot execute afterwards."""
        self._pool.shutdown(wait=True)

    @staticmethod
    def blocks_for_budget(config: ModelConfig, kv_cache_bytes: int, block_size: int = 16) -> int:
        """How many KV blocks fit in ``kv_cache_bytes``."""
        return max(0, kv_cache_bytes // (config.kv_bytes_per_token * block_size))

    def execute(self, steps: list[SeqStep]) -> torch.Tensor:
        """Run ``steps``; fp32 logits [number of steps with want_logits, vocab], in step order."""
        if not steps:
            return torch.empty(0, self.config.vocab)
        validate_steps(
            steps,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            max_context=self.max_context,
            vocab=self.config.vocab,
        )
        work = [(s.token_ids, s.start_pos, s.block_table, s.want_logits) for s in steps]
        tid = threading.get_ident()
        if tid == self._thread:
            return self._forward(work)
        if tid not in self._callers:
            # The caller's own torch work (sampling) must not start a second multi-threaded
            # OpenMP team (see __init__): keep that thread's torch single-threaded.
            torch.set_num_threads(1)
            self._callers.add(tid)
        return self._pool.submit(self._forward, work).result()

    def _forward(self, work: list[tuple[list[int], int, list[int], bool]]) -> torch.Tensor:
        # Even building the plan's small tensors stays on this thread (see __init__).
        with torch.inference_mode():
            plan = BatchPlan.build(work, self.block_size, self.model.cos, self.model.sin)
            return self.model.forward(plan, self.cache)
