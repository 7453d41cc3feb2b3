"""Response framing: what the host sees of an answer is a function of time, not of tokens.

The rule is in :mod:`veil.attestation.channel.padding` ("Response framing"); this module
applies it inside the enclave:

* :class:`ResponseFramer` (pure, no I/O): text in, padded and encrypted frames out. A
  streamed answer leaves as one :data:`~veil.attestation.channel.padding.STREAM_FRAME_BYTES`
  frame per tick carrying whatever text accrued (possibly none, at most
  :func:`~veil.attestation.channel.padding.frame_text_capacity`; the rest waits for the next
  tick); a non-streamed answer leaves as one frame padded to its
  :func:`~veil.attestation.channel.padding.response_bucket`. The FINAL frame, and an error,
  look like any other frame.
* :class:`Cadence` (asyncio): the streamed-answer clock of one server. Every streamed answer
  ticks on the same boundaries, driven by one timer, so N concurrent streams cost one
  wake-up per tick rather than N (the event loop shares the GIL with the engine thread:
  N timers per tick were measurable in the engine's throughput at 16 streams).
* :class:`FramedResponse` (asyncio): drives one request. A pump task moves the engine's
  deltas into the framer; the response side sends a frame on every tick of the cadence
  (streamed) or everything once the answer is complete (non-streamed). An engine that
  refuses the request (queue full, stopped) before anything was sent raises
  :class:`EngineOverloadedError` / :class:`EngineStoppedError` from :meth:`FramedResponse.frames`
  so the servicer can choose a gRPC status; everything that depends on the plaintext
  travels inside the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from veil.attestation.channel.padding import (
    MAX_CHUNK_BYTES,
    STREAM_FRAME_BYTES,
    exact_size,
    frame_text_capacity,
    response_bucket,
)
from veil.attestation.channel.stream import StreamEncryptor
from veil.enclave.data_policy import log_event
from veil.enclave.engine.detokenizer import FINISH_CANCELLED, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP
from veil.enclave.errors import (
    EngineInternalError,
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
)
from veil.proto.v1 import generate_pb2

if TYPE_CHECKING:
    from veil.enclave.engine.async_engine import AsyncEngine, Delta, EngineRequest

__all__ = ["DEFAULT_FRAME_INTERVAL_S", "Cadence", "FramedResponse", "ResponseFramer"]

log = logging.getLogger("veil.enclave.server")

DEFAULT_FRAME_INTERVAL_S = 0.075
MAX_ERROR_MESSAGE_BYTES = 256  # an error frame must fit a streamed frame
_FINISH = {
    FINISH_STOP: generate_pb2.FINISH_REASON_STOP,
    FINISH_LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FINISH_CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
    FINISH_ERROR: generate_pb2.FINISH_REASON_ERROR,
}


def _utf8_prefix(data: bytes | bytearray, limit: int) -> int:
    """The longest prefix length ≤ ``limit`` of valid UTF-8 ``data`` that ends on a character boundary."""
    if len(data) <= limit:
        return len(data)
    cut = limit
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # never split a character
        cut -= 1
    return cut


def error_chunk(exc: BaseException | None) -> generate_pb2.ResponseChunk:
    """The encrypted error an exception becomes (its text only for request errors, never prompt text)."""
    if isinstance(exc, PromptTooLongError):
        code = generate_pb2.ChunkError.CODE_PROMPT_TOO_LONG
    elif isinstance(exc, InvalidRequestError):
        code = generate_pb2.ChunkError.CODE_INVALID_REQUEST
    else:
        code = generate_pb2.ChunkError.CODE_INTERNAL
    message = str(exc) if isinstance(exc, InvalidRequestError) else "internal error"
    raw = message.encode()
    message = raw[: _utf8_prefix(raw, MAX_ERROR_MESSAGE_BYTES)].decode()
    return generate_pb2.ResponseChunk(
        finish_reason=generate_pb2.FINISH_REASON_ERROR,
        error=generate_pb2.ChunkError(code=code, message=message),
    )


class ResponseFramer:
    """Turns one answer's text into padded, encrypted frames (pure: no I/O, no clock).

    Feed it with :meth:`add_text`, end it with :meth:`finish` or :meth:`fail`; take frames
    with :meth:`tick` (streamed: the messages of one tick) or :meth:`whole` (non-streamed:
    every message, once ended). The first message either returns is the stream header.
    """

    def __init__(
        self, encryptor: StreamEncryptor, *, streamed: bool, frame_bytes: int = STREAM_FRAME_BYTES
    ) -> None:
        self._enc = encryptor
        self.streamed = streamed
        self._frame_rule = exact_size(frame_bytes)
        self._capacity = frame_text_capacity(frame_bytes)
        self._pending = bytearray()
        self._end: generate_pb2.ResponseChunk | None = None
        self.header_sent = False
        self.frames_sent = 0

    @property
    def ended(self) -> bool:
        """True once :meth:`finish` or :meth:`fail` was called."""
        return self._end is not None

    @property
    def done(self) -> bool:
        """True once the FINAL frame was produced."""
        return self._enc.finished

    def add_text(self, text: str) -> None:
        if self._end is not None:
            raise EngineInternalError("text after the end of the answer")
        self._pending += text.encode()

    def finish(
        self, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> None:
        """The answer ended normally; the FINAL frame will carry the reason and the usage."""
        if self._end is not None:
            raise EngineInternalError("answer ended twice")
        self._end = generate_pb2.ResponseChunk(
            finish_reason=_FINISH.get(finish_reason, generate_pb2.FINISH_REASON_STOP),
            usage=generate_pb2.Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=cached_tokens,
            ),
        )

    def fail(self, chunk: generate_pb2.ResponseChunk) -> None:
        """The answer ended with an error (``chunk`` from :func:`error_chunk`); unsent text is dropped."""
        if self._end is None:
            self._end = chunk
            self._pending.clear()

    def _take(self, limit: int) -> str:
        cut = _utf8_prefix(self._pending, limit)
        text = bytes(self._pending[:cut]).decode()
        del self._pending[:cut]
        return text

    def _header(self) -> list[bytes]:
        if self.header_sent:
            return []
        self.header_sent = True
        return [self._enc.header]

    def tick(self) -> list[bytes]:
        """Streamed: the header on the first tick, then exactly one frame of ``frame_bytes``.

        The frame is FINAL once the answer ended and all its text fits in it.
        """
        if not self.streamed:
            raise EngineInternalError("tick() on a non-streamed answer")
        out = self._header()
        chunk = generate_pb2.ResponseChunk(text_delta=self._take(self._capacity))
        final = self._end is not None and not self._pending
        if final and self._end is not None:
            chunk.MergeFrom(self._end)
        out.append(self._enc.encrypt_frame(chunk, self._frame_rule, final=final))
        self.frames_sent += 1
        return out

    def whole(self) -> list[bytes]:
        """Non-streamed, once ended: the header, full 64 KiB frames while the text needs them,
        then the last frame padded to its :func:`response_bucket`, FINAL."""
        if self._end is None:
            raise EngineInternalError("whole() before the answer ended")
        out = self._header()
        big = exact_size(MAX_CHUNK_BYTES)
        while len(self._pending) > frame_text_capacity(MAX_CHUNK_BYTES):
            piece = generate_pb2.ResponseChunk(text_delta=self._take(frame_text_capacity(MAX_CHUNK_BYTES)))
            out.append(self._enc.encrypt_frame(piece, big))
            self.frames_sent += 1
        chunk = generate_pb2.ResponseChunk(text_delta=self._take(len(self._pending)))
        chunk.MergeFrom(self._end)
        out.append(self._enc.encrypt_frame(chunk, response_bucket, final=True))
        self.frames_sent += 1
        return out


class Cadence:
    """Ticks at ``epoch + k * interval_s`` (the epoch is the first use); :meth:`wait` sleeps until
    the next tick. One timer task serves every waiter and exists only while someone waits.

    A waiter that arrives late (a stream whose reader stalled) waits for the next boundary: the
    cadence resumes, it never bursts. ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        epoch: float | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")  # configuration bug, not input
        self.interval_s = interval_s
        self._clock = clock
        self._sleep = sleep
        self._epoch = epoch
        self._last = -math.inf  # the last boundary fired: never fire one twice
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    def _next_boundary(self, now: float) -> float:
        if self._epoch is None:
            self._epoch = now
        k = math.floor((now - self._epoch) / self.interval_s) + 1
        return max(self._epoch + k * self.interval_s, self._last + self.interval_s)

    async def wait(self) -> None:
        """Return at the next tick."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="veil-cadence")
        await waiter  # a cancelled waiter is skipped when the tick fires

    async def _run(self) -> None:
        while self._waiters:
            boundary = self._next_boundary(self._clock())
            await self._sleep(max(0.0, boundary - self._clock()))
            self._last = boundary
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


class FramedResponse:
    """One request from engine to frames; the servicer iterates :meth:`frames` and calls :meth:`close`.

    ``make_request`` builds the engine request (it may raise :class:`InvalidRequestError`,
    which becomes an encrypted error frame). ``cadence`` is the server's shared streamed clock;
    without one the response ticks on its own every ``interval_s`` from its start.
    ``clock`` and ``sleep`` are injectable for tests. After the stream, ``status``,
    ``finish_reason``, ``usage`` and ``ttft_s`` describe the outcome (for the log line).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        make_request: Callable[[], EngineRequest],
        encryptor: StreamEncryptor,
        *,
        streamed: bool,
        interval_s: float = DEFAULT_FRAME_INTERVAL_S,
        cadence: Cadence | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._engine = engine
        self._rid = request_id
        self._make_request = make_request
        self.framer = ResponseFramer(encryptor, streamed=streamed)
        self._clock = clock
        self._started = clock()
        self._cadence = cadence or Cadence(interval_s, clock=clock, sleep=sleep, epoch=self._started)
        self._stream: AsyncIterator[Delta] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._refused: EngineOverloadedError | EngineStoppedError | None = None
        self.status = "cancelled"
        self.finish_reason: str | None = None
        self.usage = (0, 0)
        self.ttft_s: float | None = None

    @property
    def finished(self) -> bool:
        """True once the FINAL frame was produced."""
        return self.framer.done

    async def _pump(self) -> None:
        """Move the engine's deltas into the framer until the answer ends (never raises but cancel)."""
        framer = self.framer
        try:
            self._stream = self._engine.generate(self._make_request())
            async for delta in self._stream:
                if self.ttft_s is None:
                    self.ttft_s = self._clock() - self._started
                if delta.error is not None:
                    self.status = "engine_error"
                    framer.fail(error_chunk(None))
                    return
                if delta.text:
                    framer.add_text(delta.text)
                if delta.finish_reason is not None:
                    self.status, self.finish_reason = "ok", delta.finish_reason
                    self.usage = (delta.prompt_tokens, delta.completion_tokens)
                    framer.finish(delta.finish_reason, *self.usage, delta.cached_tokens)
                    return
            raise EngineStoppedError("engine stream ended without a final delta")
        except InvalidRequestError as exc:
            self.status = "invalid_request"
            framer.fail(error_chunk(exc))
        except (EngineOverloadedError, EngineStoppedError) as exc:
            if self.ttft_s is None:  # refused before any output: the servicer picks a status
                self._refused = exc
                self.status = "overloaded" if isinstance(exc, EngineOverloadedError) else "stopped"
            else:
                self.status = "internal_error"
            framer.fail(error_chunk(None))
        except Exception as exc:  # a bug or an engine failure: generic, inside the stream
            log_event(
                log, "request.internal_error", logging.ERROR, request=self._rid, error_type=type(exc).__name__
            )
            self.status = "internal_error"
            framer.fail(error_chunk(None))

    def _raise_if_refused(self) -> None:
        if self._refused is not None and not self.framer.header_sent:
            raise self._refused

    async def frames(self) -> AsyncIterator[bytes]:
        """The payloads to send, in order; raises a refusal before the first one."""
        if not self.framer.streamed:
            await self._pump()
            self._raise_if_refused()
            for payload in self.framer.whole():
                yield payload
            return
        self._pump_task = asyncio.create_task(self._pump(), name=f"veil-pump-{self._rid}")
        while True:
            await self._cadence.wait()  # one frame per tick; after a stall, the next tick
            self._raise_if_refused()
            for payload in self.framer.tick():
                yield payload
            if self.framer.done:
                return

    async def close(self) -> None:
        """Stop the pump and the engine work (frees the request's KV blocks); idempotent."""
        task = self._pump_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.status == "ok":
            return
        try:
            self._engine.cancel(self._rid)
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                await aclose()
        except Exception as exc:  # never let cleanup mask the original outcome
            log_event(
                log,
                "request.cancel_failed",
                logging.WARNING,
                request=self._rid,
                error_type=type(exc).__name__,
            )

    def elapsed_s(self) -> float:
        return self._clock() - self._started
