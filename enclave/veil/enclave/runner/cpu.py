"""The CPU runner: the one owner of model tensors and the KV cache on a CPU-only host.

:class:`CpuRunner` implements :class:`~veil.enclave.runner.protocol.Runner`: it runs scheduled
:class:`~veil.enclave.runner.protocol.SeqStep` batches through the Llama forward pass
(:mod:`veil.enclave.model.llama`, Veil's AVX-512 kernels with PyTorch ops as fallback) and samples
the next token of each step that asks for one (:class:`~veil.enclave.engine.sampler.Sampler`). All its
torch work runs on one model thread (see :class:`CpuRunner`). KV layout: see
:mod:`veil.enclave.runner.protocol`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from veil.enclave.engine.sampler import Sampler
from veil.enclave.errors import InvalidRequestError
from veil.enclave.model.config import ModelConfig
from veil.enclave.model.llama import BatchPlan, KVCache, LlamaModel
from veil.enclave.model.loader import LoadedModel
from veil.enclave.runner.protocol import Runner, SeqStep, sample_steps, validate_steps

__all__ = ["CpuRunner"]

T = TypeVar("T")


def _init_model_thread(tid: list[int], threads: int) -> None:
    tid.append(threading.get_ident())
    torch.set_num_threads(threads)


class CpuRunner:
    """The CPU :class:`Runner`: executes batches of :class:`SeqStep` against a paged KV cache of
    ``num_kv_blocks`` blocks."""

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
        # multi-threaded torch work of the engine belongs on this thread (see ``submit``).
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
        self.device = f"cpu ({self.threads} threads)"
        self.sampler = Sampler()
        self.model, self.cache = self._pool.submit(self._build, model, num_kv_blocks, block_size).result()

    @staticmethod
    def _build(model: LoadedModel, num_kv_blocks: int, block_size: int) -> tuple[LlamaModel, KVCache]:
        return LlamaModel(model.config, model.weights), KVCache(model.config, num_kv_blocks, block_size)

    @property
    def _thread(self) -> int | None:
        return self._tid[0] if self._tid else None

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` on the model thread. The engine runs its whole step there (schedule,
        forward, sampling, detokenizing): one thread hand-off per step instead of two, and the
        sampler's torch work joins the model thread's OpenMP team instead of competing with it."""
        return self._pool.submit(fn, *args)

    def execute(self, steps: list[SeqStep]) -> list[int]:
        """Run ``steps`` and sample: one token id per step with ``sample`` set, in step order."""
        if not steps:
            return []
        return self._on_model_thread(self._execute, self._work(steps), steps)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero KV ``blocks`` in every layer (on the model thread, like every other cache write)."""
        if blocks:
            self._on_model_thread(self.cache.zero_blocks, blocks)

    def logits(self, steps: list[SeqStep]) -> torch.Tensor:
        """Run ``steps``; fp32 logits ``[steps with sample set, vocab]`` (parity tests, benchmarks)."""
        if not steps:
            return torch.empty(0, self.config.vocab)
        return self._on_model_thread(self._forward, self._work(steps))

    def _work(self, steps: list[SeqStep]) -> list[tuple[list[int], int, list[int], bool]]:
        validate_steps(
            steps,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            max_context=self.max_context,
            vocab=self.config.vocab,
        )
        return [(s.token_ids, s.start_pos, s.block_table, s.sample is not None) for s in steps]

    def _on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        tid = threading.get_ident()
        if tid == self._thread:
            return fn(*args)
        if tid not in self._callers:
            # The caller's own torch work must not start a second multi-threaded OpenMP team
            # (see __init__): keep that thread's torch single-threaded.
            torch.set_num_threads(1)
            self._callers.add(tid)
        return self._pool.submit(fn, *args).result()

    def _execute(self, work: list[tuple[list[int], int, list[int], bool]], steps: list[SeqStep]) -> list[int]:
        logits = self._forward(work)
        with torch.inference_mode():
            return sample_steps(self.sampler, logits, steps)

    def _forward(self, work: list[tuple[list[int], int, list[int], bool]]) -> torch.Tensor:
        # Even building the plan's small tensors stays on this thread (see __init__).
        with torch.inference_mode():
            plan = BatchPlan.build(work, self.block_size, self.model.cos, self.model.sin)
            return self.model.forward(plan, self.cache)


_RUNNER: type[Runner] = CpuRunner  # mypy checks that CpuRunner implements the protocol
