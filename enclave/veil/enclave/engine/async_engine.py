"""The engine as asyncio code sees it: :class:`AsyncEngine`, many streams, one model loop.

:class:`AsyncEngine` owns one :class:`~veil.enclave.engine.sync_engine.LLMEngine`. A single background
task loops: it applies the requests and cancellations that arrived since the last step (on
the event loop's thread), then runs ``LLMEngine.step`` on the runner's device thread
(``Runner.submit``), so the event loop never waits on the model, and hands each delta to its
request's queue. Engine state is touched by one thread at a time: the loop thread between
steps, the device thread during a step.

A prompt is checked, chat-templated and tokenized (:meth:`LLMEngine.encode`, which refuses a
prompt over ``max_prompt_bytes`` before tokenizing) on one tokenizer thread, never on the event
loop: a large prompt delays other prompts' tokenizing, never the streams being served.
Encoding (on the tokenizer thread) and decoding (on the device thread) use separate
tokenizer copies. A request being encoded counts as waiting (``max_waiting``, ``stats``).

Logs carry metadata only (request ids, counts, exception types): never prompt or completion
text.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import random
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from veil.enclave.data_policy import log_event
from veil.enclave.engine.detokenizer import FINISH_CANCELLED, FINISH_ERROR
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.engine.sync_engine import (
    ENGINE_VERSION,
    ERROR_TEXT,
    Delta,
    EngineRequest,
    EngineStats,
    LLMEngine,
    RequestOutput,
)
from veil.enclave.errors import EngineOverloadedError, EngineStoppedError, InvalidRequestError
from veil.enclave.runner.protocol import Runner

__all__ = [
    "DEVICES",
    "ENGINE_VERSION",
    "AsyncEngine",
    "Delta",
    "EngineRequest",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "resolve_device",
]

DEVICES = ("cpu", "cuda", "auto")

log = logging.getLogger(__name__)


class _DeltaStream:
    """The async iterator :meth:`AsyncEngine.generate` returns; closing it cancels the request."""

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        queue: asyncio.Queue[Delta] | None,
        error: BaseException | None,
        encoding: asyncio.Future[None] | None = None,
    ) -> None:
        self._engine = engine
        self._request_id = request_id
        self._queue = queue
        self._error = error
        self._encoding = encoding
        self._done = queue is None

    def __aiter__(self) -> _DeltaStream:
        return self

    async def __anext__(self) -> Delta:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._done or self._queue is None:
            raise StopAsyncIteration
        try:
            if self._encoding is not None:
                encoding, self._encoding = self._encoding, None
                try:
                    await asyncio.shield(encoding)
                except (InvalidRequestError, EngineOverloadedError, EngineStoppedError):
                    self._done = True  # the request never reached the engine
                    raise
            delta = await self._queue.get()
        except BaseException:  # the consumer was cancelled: so is the request
            self._close()
            raise
        if delta.finish_reason is not None:
            self._done = True
        return delta

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.cancel(self._request_id)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._engine._cancel_soon(self._request_id)


class AsyncEngine:
    """The engine as coroutines see it: many concurrent ``generate`` streams, one model loop."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch: int = 64,
        max_waiting: int = 256,
        max_num_batched_tokens: int = 512,
        rng: random.Random | None = None,
        max_prompt_bytes: int | None = None,
        prefix_caching: bool = False,
    ) -> None:
        """``prefix_caching``: reuse KV blocks among requests of one tenant (the data policy's
        ``share_kv_within_tenant``; see :class:`LLMEngine`)."""
        if max_waiting < 1:
            raise InvalidRequestError("max_waiting must be positive")
        # The device thread decodes while the tokenizer thread encodes: each has its own tokenizer.
        self._engine = LLMEngine(
            runner,
            max_batch=max_batch,
            max_num_batched_tokens=max_num_batched_tokens,
            rng=rng,
            decode_tokenizer=_private_copy(runner.tokenizer),
            max_prompt_bytes=max_prompt_bytes,
            prefix_caching=prefix_caching,
        )
        self.max_prompt_bytes: int = self._engine.max_prompt_bytes
        self.max_waiting = max_waiting
        self.model_digest: bytes = runner.model_digest
        self.engine_version: str = ENGINE_VERSION
        self.max_context: int = int(runner.max_context)
        self.device: str = runner.device
        self._queues: dict[str, asyncio.Queue[Delta]] = {}
        self._pending_adds: deque[tuple[str, list[int], SamplingParams, bytes | None]] = deque()
        self._pending_cancels: deque[str] = deque()
        self._encoding: set[str] = set()  # requests on the tokenizer thread
        self._cancelled_encoding: set[str] = set()  # ... and cancelled meanwhile
        self._encoder: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self._closing = False

    @classmethod
    def from_model(
        cls,
        path: str | Path | None = None,
        *,
        kv_cache_mb: int = 256,
        max_batch: int = 64,
        threads: int | None = None,
        block_size: int = 16,
        cache_dir: Path | None = None,
        device: str = "cpu",
        **kw: Any,
    ) -> AsyncEngine:
        """Load a GGUF file or checkpoint (default: the embedded SmolLM2) and build an engine.

        ``cache_dir``: where the loader caches the tokenizer (``veil serve``: its state dir).
        ``device``: ``"cpu"`` (:class:`~veil.enclave.runner.cpu.CpuRunner`), ``"cuda"``
        (:class:`~veil.enclave.runner.cuda.CudaRunner` on Triton kernels and CUDA graphs; raises
        DeviceUnavailableError without a GPU) or ``"auto"`` (CUDA when ``torch.cuda.is_available()``)."""
        from veil.enclave.engine.block_manager import blocks_for_budget
        from veil.enclave.model.loader import default_model_path, load_model

        kind = resolve_device(device)
        model = load_model(Path(path) if path is not None else default_model_path(), cache_dir=cache_dir)
        runner: Runner
        if kind == "cuda":
            from veil.enclave.runner.cuda import CudaRunner

            # bf16 keys and values: 2 + 2 bytes per element
            per_token = model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * 4
            blocks = blocks_for_budget(kv_cache_mb * 2**20, per_token, block_size)
            runner = CudaRunner(model, blocks, block_size, device="cuda", max_batch=max_batch)
        else:
            from veil.enclave.runner.cpu import CpuRunner

            blocks = blocks_for_budget(kv_cache_mb * 2**20, model.config.kv_bytes_per_token, block_size)
            runner = CpuRunner(model, blocks, block_size, threads=threads)
        return cls(runner, max_batch=max_batch, **kw)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # one thread: the encode tokenizer copy is never used by two threads at once
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-tokenizer")
        self._draining = self._closing = False
        self._task = asyncio.create_task(self._run(), name="veil-engine-loop")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Admit nothing new; let in-flight requests finish for ``grace_s``, cancel the rest."""
        if self._task is None or self._loop is None:
            return
        self._draining = True
        deadline = self._loop.time() + max(0.0, grace_s)
        while self._queues and self._loop.time() < deadline and not self._task.done():
            await asyncio.sleep(0.01)
        for rid in list(self._queues):
            self.cancel(rid)
        self._closing = True
        self._wakeup()
        with contextlib.suppress(Exception):
            await self._task
        self._task = None
        self._fail_streams()  # only if the loop died with streams open
        if self._encoder is not None:
            self._encoder.shutdown(wait=False, cancel_futures=True)
            self._encoder = None

    # ------------------------------------------------------------------ requests

    def validate(self, request: EngineRequest) -> list[int]:
        """Check ``request``; return its prompt token ids. Raises InvalidRequestError, PromptTooLongError."""
        return self._engine.encode(request)

    def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        """Start ``request``; iterate the result for its deltas (the last one has finish_reason).

        Like an async generator function, this never raises: a bad request
        (InvalidRequestError, PromptTooLongError), a full queue (EngineOverloadedError) or a
        stopped engine (EngineStoppedError) raise from the first ``__anext__``. The work starts
        at once (tokenizing, on the tokenizer thread); closing the iterator, or cancelling the
        task awaiting it, cancels the request.
        """
        rid = request.request_id
        try:
            self._admit(rid)
        except (InvalidRequestError, EngineOverloadedError, EngineStoppedError) as exc:
            return _DeltaStream(self, rid, None, exc)
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._queues[rid] = queue
        self._encoding.add(rid)
        encoding = asyncio.ensure_future(self._encode_and_queue(request))
        encoding.add_done_callback(_retrieve)  # the stream may be dropped before it looks
        return _DeltaStream(self, rid, queue, None, encoding)

    def _admit(self, rid: str) -> None:
        if self._task is None or self._draining or self._task.done() or self._encoder is None:
            raise EngineStoppedError("the engine is not running")
        if rid in self._queues:
            raise InvalidRequestError("duplicate request_id")
        if self.stats().waiting >= self.max_waiting:
            raise EngineOverloadedError("the engine queue is full")

    async def _encode_and_queue(self, request: EngineRequest) -> None:
        """Tokenize on the tokenizer thread, then queue for the engine loop (on the loop thread)."""
        rid = request.request_id
        encoder = self._encoder
        try:
            if encoder is None:
                raise EngineStoppedError("the engine is not running")
            try:
                ids = await asyncio.get_running_loop().run_in_executor(encoder, self.validate, request)
            except asyncio.CancelledError:
                if self._encoder is encoder:
                    raise
                raise EngineStoppedError("the engine stopped") from None  # stop() dropped the job
        except BaseException:
            self._queues.pop(rid, None)
            self._cancelled_encoding.discard(rid)
            raise
        finally:
            self._encoding.discard(rid)
        if rid not in self._queues:
            self._cancelled_encoding.discard(rid)
            return  # the engine stopped meanwhile: the stream already has its error
        self._pending_adds.append((rid, ids, request.params, request.tenant_secret))
        if rid in self._cancelled_encoding:
            self._cancelled_encoding.discard(rid)
            self._pending_cancels.append(rid)  # applied after the add: a clean "cancelled"
        self._wakeup()

    def cancel(self, request_id: str) -> None:
        """Cancel a request; its KV blocks are freed and its stream ends with ``cancelled``."""
        if request_id in self._encoding:
            self._cancelled_encoding.add(request_id)
            return
        if request_id in self._queues:
            self._pending_cancels.append(request_id)
            self._wakeup()

    def stats(self) -> EngineStats:
        s = self._engine.stats()
        return EngineStats(
            running=s.running,
            waiting=s.waiting + len(self._pending_adds) + len(self._encoding),
            free_kv_blocks=s.free_kv_blocks,
            total_kv_blocks=s.total_kv_blocks,
            preemptions=s.preemptions,
        )

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        wake = self._wake
        if wake is None:
            return
        try:
            while True:
                try:
                    self._apply_pending()
                    if not self._engine.has_unfinished():
                        if self._closing:
                            return
                        wake.clear()
                        if not (self._pending_adds or self._pending_cancels or self._closing):
                            await wake.wait()
                        continue
                    # the whole step runs on the runner's device thread (see Runner.submit)
                    outputs = await asyncio.wrap_future(self._engine.runner.submit(self._engine.step))
                except Exception as exc:  # a bug: fail what is in flight, keep serving
                    log_event(log, "engine.step_failed", logging.ERROR, error_type=type(exc).__name__)
                    outputs = self._abort_everything()
                self._dispatch(outputs)
        finally:
            self._fail_streams()

    def _abort_everything(self) -> list[RequestOutput]:
        """After an engine bug: end every request with ``error`` and start from a clean state."""
        try:
            return self._engine.abort_all(FINISH_ERROR)
        except Exception:
            # The bookkeeping itself is broken: rebuild the core; open streams get an error.
            self._engine = self._engine.fresh()
            self._fail_streams()
            return []

    def _apply_pending(self) -> None:
        engine = self._engine
        while self._pending_adds:
            rid, ids, params, tenant = self._pending_adds.popleft()
            if rid not in self._queues:
                continue  # cancelled before it was added
            try:
                engine.add_request(rid, ids, params, tenant)
            except Exception as exc:
                log_event(log, "engine.add_failed", logging.ERROR, request=rid, error_type=type(exc).__name__)
                self._dispatch([RequestOutput(rid, Delta("", (), FINISH_ERROR, len(ids), 0, ERROR_TEXT))])
        while self._pending_cancels:
            rid = self._pending_cancels.popleft()
            out = engine.abort_request(rid, FINISH_CANCELLED)
            if out is not None:
                self._dispatch([out])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is None:
                continue
            queue.put_nowait(out.delta)
            if out.delta.finish_reason is not None:
                del self._queues[out.request_id]

    def _fail_streams(self) -> None:
        """End every open stream with an error (the loop is gone)."""
        for rid in list(self._queues):
            self._dispatch([RequestOutput(rid, Delta("", (), FINISH_ERROR, error=ERROR_TEXT))])
        self._pending_adds.clear()

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _cancel_soon(self, request_id: str) -> None:
        """``cancel`` from any thread (a stream garbage-collected unclosed)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.cancel, request_id)


def resolve_device(device: str) -> str:
    """``"cpu"`` or ``"cuda"`` for a ``--device`` choice: ``auto`` is CUDA when a GPU is present."""
    if device not in DEVICES:
        raise InvalidRequestError(f"device must be one of {', '.join(DEVICES)}")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _private_copy(tokenizer: Any) -> Any:
    try:
        return copy.deepcopy(tokenizer)
    except Exception:
        return tokenizer
