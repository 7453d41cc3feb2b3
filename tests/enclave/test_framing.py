"""Response framing (issue #12): the frames' number and sizes follow time, not tokens.

Pure tests of :class:`ResponseFramer` and of :class:`FramedResponse` over a scripted engine
with a fake clock; the real server is exercised in ``test_wire_shape.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.attestation.channel.padding import (
    MAX_CHUNK_BYTES,
    STREAM_FRAME_BYTES,
    frame_text_capacity,
    response_bucket,
)
from veil.attestation.channel.stream import HEADER_SIZE, StreamDecryptor, StreamEncryptor
from veil.enclave.engine.sync_engine import Delta
from veil.enclave.errors import EngineOverloadedError, InvalidRequestError
from veil.enclave.framing import Cadence, FramedResponse, ResponseFramer, error_chunk
from veil.proto.v1 import generate_pb2

KEY = bytes(range(32))
RID = bytes(range(16))
ABYTES = 17
FRAME = STREAM_FRAME_BYTES + ABYTES


def _framer(streamed: bool) -> ResponseFramer:
    return ResponseFramer(StreamEncryptor(KEY, RID), streamed=streamed)


def _read(payloads: list[bytes]) -> tuple[str, list[generate_pb2.ResponseChunk]]:
    dec = StreamDecryptor(KEY, RID, payloads[0])
    chunks = [dec.decrypt(p)[0] for p in payloads[1:]]
    dec.close()  # FINAL was there
    return "".join(c.text_delta for c in chunks), chunks


def test_non_streamed_answers_of_one_bucket_look_alike() -> None:
    shapes = set()
    for n_tokens in (1, 3, 14, 120):
        framer = _framer(streamed=False)
        for _ in range(n_tokens):
            framer.add_text(" word")
        framer.finish("length", 9, n_tokens)
        payloads = framer.whole()
        text, chunks = _read(payloads)
        assert text == " word" * n_tokens
        assert chunks[-1].usage.completion_tokens == n_tokens
        shapes.add(tuple(len(p) for p in payloads))
    assert shapes == {(HEADER_SIZE, 1024 + ABYTES)}


def test_non_streamed_long_answer_is_full_frames_then_a_bucket() -> None:
    framer = _framer(streamed=False)
    framer.add_text("é" * 50_000)  # 100 000 bytes: more than one 64 KiB frame
    framer.finish("stop", 3, 50_000)
    payloads = framer.whole()
    assert [len(p) for p in payloads] == [HEADER_SIZE, MAX_CHUNK_BYTES + ABYTES, MAX_CHUNK_BYTES + ABYTES]
    assert _read(payloads)[0] == "é" * 50_000
    assert response_bucket(1) == 1024 and response_bucket(40_000) == 65536


def test_streamed_frames_are_equal_size_whatever_they_carry() -> None:
    framer = _framer(streamed=True)
    payloads = framer.tick()  # header + an empty frame
    framer.add_text("a")
    payloads += framer.tick()
    payloads += framer.tick()  # nothing accrued: an empty frame
    framer.add_text("b" * 700)
    framer.finish("stop", 5, 2)
    payloads += framer.tick()  # text and the end fit: FINAL
    assert framer.done
    assert [len(p) for p in payloads] == [HEADER_SIZE] + [FRAME] * 4
    text, chunks = _read(payloads)
    assert text == "a" + "b" * 700
    assert chunks[-1].finish_reason == generate_pb2.FINISH_REASON_STOP
    assert chunks[-1].usage.prompt_tokens == 5


def test_streamed_text_over_a_frame_waits_for_the_next_tick() -> None:
    framer = _framer(streamed=True)
    cap = frame_text_capacity(STREAM_FRAME_BYTES)
    assert cap == 992
    framer.add_text("€" * 900)  # 2700 bytes, 3 each: 330 characters (990 bytes) a frame, never split
    framer.finish("length", 1, 1)
    payloads: list[bytes] = []
    while not framer.done:
        payloads += framer.tick()
    assert [len(p) for p in payloads] == [HEADER_SIZE] + [FRAME] * 3
    assert _read(payloads)[0] == "€" * 900


def test_an_error_frame_looks_like_any_frame() -> None:
    framer = _framer(streamed=True)
    framer.add_text("dropped")
    framer.fail(error_chunk(InvalidRequestError("x" * 5000)))  # a long message is cut to fit
    payloads = framer.tick()
    assert [len(p) for p in payloads] == [HEADER_SIZE, FRAME]
    _, chunks = _read(payloads)
    assert chunks[0].error.code == generate_pb2.ChunkError.CODE_INVALID_REQUEST
    assert chunks[0].text_delta == ""
    assert len(chunks[0].error.message) <= 256


@given(st.lists(st.text(max_size=300), max_size=12))
def test_streamed_frames_round_trip_any_text(deltas: list[str]) -> None:
    framer = _framer(streamed=True)
    payloads: list[bytes] = []
    for d in deltas:
        framer.add_text(d)
        payloads += framer.tick()
    framer.finish("stop", 1, len(deltas))
    while not framer.done:
        payloads += framer.tick()
    assert {len(p) for p in payloads[1:]} == {FRAME}
    assert _read(payloads)[0] == "".join(deltas)


# --- FramedResponse over a scripted engine ------------------------------------------------------


class ScriptedEngine:
    """``generate`` yields the scripted deltas, each after ``delay`` seconds of the fake clock."""

    def __init__(self, clock: FakeClock, deltas: list[Delta], delay: float = 0.0) -> None:
        self.clock, self.deltas, self.delay = clock, deltas, delay
        self.cancelled: list[str] = []
        self.refuse: BaseException | None = None

    def generate(self, request: Any) -> AsyncIterator[Delta]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[Delta]:
        if self.refuse is not None:
            raise self.refuse
        for d in self.deltas:
            await self.clock.sleep(self.delay)
            yield d

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


class FakeClock:
    """Virtual time for coroutines: the sleeper with the earliest deadline moves time to it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._deadlines: list[float] = []
        self._changes = 0  # time moved or a sleeper woke: everyone settles again before time moves

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        target = self.now + seconds
        self._deadlines.append(target)
        try:
            while self.now < target:
                seen = self._changes
                for _ in range(5):  # let every runnable task finish what it is doing first
                    await asyncio.sleep(0)
                if seen == self._changes and target <= min(self._deadlines):
                    self.now = max(self.now, target)
                    self._changes += 1
        finally:
            self._deadlines.remove(target)
            self._changes += 1


def _run(engine: ScriptedEngine, clock: FakeClock, *, streamed: bool) -> tuple[list[bytes], FramedResponse]:
    async def go() -> tuple[list[bytes], FramedResponse]:
        response = FramedResponse(
            engine,  # type: ignore[arg-type]
            "r1",
            lambda: None,  # type: ignore[arg-type,return-value]
            StreamEncryptor(KEY, RID),
            streamed=streamed,
            interval_s=0.1,
            clock=clock,
            sleep=clock.sleep,
        )
        try:
            out = [p async for p in response.frames()]
        finally:
            await response.close()  # what the servicer's finally does
        return out, response

    return asyncio.run(go())


def _deltas(n: int) -> list[Delta]:
    out = [Delta(" tok", (1,)) for _ in range(n - 1)]
    return [*out, Delta(" end", (2,), "length", 4, n)]


def test_streamed_frame_count_follows_time_not_tokens() -> None:
    shapes = []
    for n, delay in ((5, 0.05), (50, 0.005)):  # 0.25 s of output either way, 10x the tokens
        clock = FakeClock()
        payloads, response = _run(ScriptedEngine(clock, _deltas(n), delay), clock, streamed=True)
        assert response.finished and response.status == "ok" and response.usage == (4, n)
        assert _read(payloads)[0].count("tok") == n - 1
        shapes.append([len(p) for p in payloads])
    assert shapes[0] == shapes[1]
    assert shapes[0][0] == HEADER_SIZE and set(shapes[0][1:]) == {FRAME}


def test_non_streamed_is_one_frame_after_the_end() -> None:
    clock = FakeClock()
    payloads, response = _run(ScriptedEngine(clock, _deltas(30), 0.01), clock, streamed=False)
    assert [len(p) for p in payloads] == [HEADER_SIZE, 1024 + ABYTES]
    assert response.finished


@pytest.mark.parametrize("streamed", [True, False])
def test_a_refusal_before_output_is_raised_for_the_servicer(streamed: bool) -> None:
    clock = FakeClock()
    engine = ScriptedEngine(clock, [])
    engine.refuse = EngineOverloadedError("queue full")
    with pytest.raises(EngineOverloadedError):
        _run(engine, clock, streamed=streamed)
    assert engine.cancelled == ["r1"]  # close() released the request


def test_cadence_one_timer_for_all_streams_on_shared_boundaries() -> None:
    """Every waiter wakes on the same boundaries (epoch + k·interval) and one sleep serves them
    all; a late waiter waits for the next boundary (no burst); a cancelled waiter is skipped."""
    clock = FakeClock()
    sleeps: list[float] = []

    async def counting_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await clock.sleep(seconds)

    async def go() -> dict[str, list[float]]:
        cadence = Cadence(0.1, clock=clock, sleep=counting_sleep, epoch=0.0)
        seen: dict[str, list[float]] = {}

        async def stream(name: str, ticks: int, start: float) -> None:
            await clock.sleep(start)
            for _ in range(ticks):
                await cadence.wait()
                seen.setdefault(name, []).append(round(clock(), 9))

        cancelled = asyncio.create_task(cadence.wait())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(*(stream(f"s{i}", 3, 0.0) for i in range(8)), stream("late", 2, 0.25))
        return seen

    seen = asyncio.run(go())
    for i in range(8):
        assert seen[f"s{i}"] == [0.1, 0.2, 0.3]
    assert seen["late"] == [0.3, 0.4]
    assert len(sleeps) <= 5  # one timer sleep per boundary (0.1 … 0.4), not one per stream


def test_cadence_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError):
        Cadence(0.0)
