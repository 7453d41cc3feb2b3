"""Prompts are tokenized off the event loop, after a byte limit (issue #12, item 5).

The real model and tokenizer; a wrapper tokenizer makes ``encode`` slow or records calls.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any

import pytest

from veil.enclave.engine.async_engine import AsyncEngine, EngineRequest
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.engine.sync_engine import PROMPT_BYTES_PER_TOKEN
from veil.enclave.errors import EngineStoppedError, PromptTooLargeError, PromptTooLongError
from veil.enclave.runner.cpu import CpuRunner


class GatedTokenizer:
    """The real tokenizer, but ``encode`` records its thread and waits for ``gate`` first."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[tuple[str, int]] = []

    def encode(self, text: str, **kw: Any) -> Any:
        self.calls.append((threading.current_thread().name, len(text)))
        self.gate.wait(5)
        return self.real.encode(text, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.real, memo)  # the decode copy needs no gate


class GatedRunner:
    """The real CPU runner with :class:`GatedTokenizer`."""

    def __init__(self, real: CpuRunner) -> None:
        self.real = real
        self.tokenizer = GatedTokenizer(real.tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture(scope="module")
def runner(loaded_model: Any) -> CpuRunner:
    return CpuRunner(loaded_model, num_kv_blocks=64, block_size=16)


def test_tokenizing_runs_off_the_event_loop(runner: CpuRunner) -> None:
    gated = GatedRunner(runner)
    tok = gated.tokenizer

    async def main() -> None:
        engine = AsyncEngine(gated)  # type: ignore[arg-type]
        await engine.start()
        try:
            tok.gate.clear()  # tokenizing "takes" until the gate opens
            params = SamplingParams(max_tokens=2, temperature=0.0)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            stream = engine.generate(EngineRequest("slow", params, prompt="Hello there"))
            first = asyncio.ensure_future(anext(stream))
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert loop.time() - t0 < 1.0  # the loop ticks while the tokenizer is blocked
            assert not first.done()
            assert engine.stats().waiting == 1  # being tokenized counts as waiting
            # a request cancelled while it is being tokenized ends "cancelled", its blocks freed
            other = engine.generate(EngineRequest("gone", params, prompt="Bye"))
            other_first = asyncio.ensure_future(anext(other))
            await asyncio.sleep(0.01)
            engine.cancel("gone")
            tok.gate.set()
            deltas = [await first] + [d async for d in stream]
            assert deltas[-1].finish_reason in ("stop", "length")
            gone = [await other_first] + [d async for d in other]
            assert gone[-1].finish_reason == "cancelled"
            stats = engine.stats()
            assert stats.running == stats.waiting == 0 and stats.free_kv_blocks == stats.total_kv_blocks
        finally:
            tok.gate.set()
            await engine.stop()

    asyncio.run(main())
    threads = {name for name, _ in tok.calls}
    assert threads and all(name.startswith("veil-tokenizer") for name in threads), threads
    assert threading.main_thread().name not in threads


def test_the_byte_limit_is_checked_before_tokenizing_or_templating(runner: CpuRunner) -> None:
    gated = GatedRunner(runner)
    engine = AsyncEngine(gated, max_prompt_bytes=1000)  # type: ignore[arg-type]
    assert AsyncEngine(runner).max_prompt_bytes == PROMPT_BYTES_PER_TOKEN * runner.max_context
    params = SamplingParams(max_tokens=2)
    big = [
        EngineRequest("p", params, prompt="x" * 1001),
        EngineRequest("m", params, messages=[{"role": "user", "content": "é" * 501}]),  # 1002 bytes
        EngineRequest("n", params, messages=[{"role": "user", "content": "y" * 400}] * 3),
    ]
    for req in big:
        with pytest.raises(PromptTooLargeError) as info:
            engine.validate(req)
        assert isinstance(info.value, PromptTooLongError)  # answered as CODE_PROMPT_TOO_LONG
        assert "x" not in str(info.value) and "é" not in str(info.value)
    assert gated.tokenizer.calls == []  # nothing reached the tokenizer
    assert engine.validate(EngineRequest("ok", params, prompt="x" * 990))
    assert len(gated.tokenizer.calls) == 1

    async def main() -> None:
        await engine.start()
        try:
            started = time.monotonic()
            with pytest.raises(PromptTooLargeError):
                await anext(engine.generate(EngineRequest("p2", params, prompt="z" * 2_000_000)))
            assert time.monotonic() - started < 2.0
        finally:
            await engine.stop()
        with pytest.raises(EngineStoppedError):
            await anext(engine.generate(EngineRequest("late", params, prompt="hi")))

    asyncio.run(main())
