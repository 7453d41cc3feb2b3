"""The engine: the real embedded model for what users see, scripted runners for failure paths.

Real-model tests share one loaded model (session fixture) and stay at <= 32 new tokens.
The scripted runners are test doubles of the model only (the engine, scheduler, sampler and
detokenizer under test are the real ones, with the model's real tokenizer): a paged cache
of token ids whose "logits" follow a script or a hash of the prefix read back through the
block table, so failures can be injected at an exact point.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import torch

from veil.enclave.engine.async_engine import AsyncEngine, Delta, EngineRequest, EngineStats
from veil.enclave.engine.sampler import Sampler
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.engine.sync_engine import LLMEngine
from veil.enclave.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
)
from veil.enclave.runner.cpu import CpuRunner
from veil.enclave.runner.protocol import GREEDY, SeqStep, sample_steps

T = TypeVar("T")
MULTIBYTE = "Grüße 🌍 wörld ✓ 日本語 👩‍👩‍👧 café"

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def runner(loaded_model: Any) -> CpuRunner:
    return CpuRunner(loaded_model, num_kv_blocks=256, block_size=16)


@pytest.fixture(scope="session")
def tokenizer(runner: CpuRunner) -> Any:
    return runner.tokenizer


class ScriptedRunner:
    """A model double over a paged cache of token ids.

    ``script(prefix)`` names the next token for a sequence whose whole token list (read back
    from the cache through its block table) is ``prefix``; the double checks that what it
    reads is exactly what the engine fed, so paging mistakes surface as wrong text.
    """

    def __init__(
        self,
        tokenizer: Any,
        script: Callable[[list[int]], int],
        *,
        num_kv_blocks: int = 128,
        block_size: int = 4,
        max_context: int = 512,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template: str | None = tokenizer.chat_template
        self.eos_token_ids = frozenset({int(tokenizer.eos_token_id)})
        self.model_digest = b"\x5a" * 32
        self.max_context = max_context
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.vocab = len(tokenizer)
        self.script = script
        self.slots: dict[int, int] = {}
        self.batch_sizes: list[int] = []
        self.fail_if: Callable[[SeqStep], bool] = lambda step: False
        self.gate: threading.Event | None = None  # when set, execute waits for it
        self.delay = 0.0  # seconds each execute takes
        self._pool: ThreadPoolExecutor | None = None
        self.device = "cpu (scripted)"
        self.sampler = Sampler()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn`` on the double's one worker thread, as a real runner runs steps on its device thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scripted-runner")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool.submit(fn, *args)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Forget every slot of ``blocks``: reading one before it is written again fails loudly."""
        for b in blocks:
            for i in range(self.block_size):
                self.slots.pop(b * self.block_size + i, None)

    def execute(self, steps: list[SeqStep]) -> list[int]:
        """Scripted logits, sampled by the real sampler the way both real runners sample them."""
        return sample_steps(self.sampler, self.logits(steps), steps)

    def logits(self, steps: list[SeqStep]) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.batch_sizes.append(len(steps))
        rows = []
        for step in steps:
            if self.fail_if(step):
                raise RuntimeError("injected runner failure")
            bs, table = self.block_size, step.block_table
            for k, tok in enumerate(step.token_ids):
                pos = step.start_pos + k
                self.slots[table[pos // bs] * bs + pos % bs] = tok
            if step.want_logits:
                end = step.start_pos + len(step.token_ids)
                prefix = [self.slots[table[p // bs] * bs + p % bs] for p in range(end)]
                logits = torch.full((self.vocab,), -20.0)
                logits[self.script(prefix)] = 20.0
                rows.append(logits)
        return torch.stack(rows) if rows else torch.empty(0, self.vocab)


def hash_script(cands: list[int]) -> Callable[[list[int]], int]:
    def script(prefix: list[int]) -> int:
        h = hashlib.blake2b(repr(prefix).encode(), digest_size=8).digest()
        return cands[int.from_bytes(h, "big") % len(cands)]

    return script


def follow(target: list[int], prompt_len: Callable[[list[int]], int], eos: int) -> Callable[[list[int]], int]:
    """Emit ``target`` token by token after the prompt, then EOS."""

    def script(prefix: list[int]) -> int:
        k = len(prefix) - prompt_len(prefix)
        return target[k] if k < len(target) else eos

    return script


def run_sync(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[Delta]]:
    for r in reqs:
        engine.add_request(r.request_id, engine.encode(r), r.params)
    out: dict[str, list[Delta]] = {r.request_id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].append(o.delta)
    return out


async def collect(engine: AsyncEngine, req: EngineRequest) -> list[Delta]:
    return [d async for d in engine.generate(req)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def ids_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning",
    "List three colors:",
    "Water boils at",
    "In 1969, the first humans to walk on the Moon were",
    "The quick brown fox",
    "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make food. "
    "Explain it in simple words for a child who is eight years old and curious about gardens:",
]

# ---------------------------------------------------------------------------- real model


def test_engine_metadata(runner: CpuRunner) -> None:
    engine = AsyncEngine(runner)
    assert engine.model_digest == runner.model_digest and len(engine.model_digest) == 32
    assert engine.engine_version.startswith("veil-engine/")
    assert engine.max_context == runner.max_context
    assert engine.stats() == EngineStats(0, 0, 256, 256, 0)


GREEDY_REQS = [EngineRequest(f"g{i}", greedy(24, ignore_eos=True), prompt=p) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="session")
def batch_invariant(runner: CpuRunner) -> bool:
    """Whether the runner gives a sequence the same logits alone and next to another one.

    Exact equality of batched and solo outputs is only possible when this holds; the engine's
    part (scheduling, paging, sampling) is proved exact by the scripted-runner tests below.
    """
    a = runner.tokenizer.encode("Write a short poem about the sea:")
    b = runner.tokenizer.encode(PROMPTS[7] * 2)  # a longer neighbour: a wider block table
    ta, tb = [0, 1, 2], list(range(3, 3 + len(b) // 16 + 1))
    runner.logits([SeqStep(0, a, 0, ta), SeqStep(1, b, 0, tb)])
    alone = runner.logits([SeqStep(0, [198], len(a), ta, GREEDY)])
    both = runner.logits([SeqStep(0, [198], len(a), ta, GREEDY), SeqStep(1, [198], len(b), tb, GREEDY)])
    return bool(torch.equal(alone[0], both[0]))


def test_runner_is_batch_invariant(batch_invariant: bool) -> None:
    """The real runner gives a sequence the same logits alone and in a batch.

    This is what makes seeded and greedy output independent of batch-mates; the tie-tolerant
    and xfail paths below exist only to diagnose a runner that loses it, never to pass one.
    """
    assert batch_invariant, NOT_INVARIANT


NOT_INVARIANT = (
    "the model runner's logits depend on the batch composition (decode attention rounding), "
    "so sampled text may too; the engine's own part is exact (scripted-runner tests)"
)


@pytest.fixture(scope="session")
def alone_greedy(runner: CpuRunner) -> dict[str, list[int]]:
    """Each greedy request run on its own: the reference for batched and preempted runs."""
    return {r.request_id: ids_of(run_sync(LLMEngine(runner), [r])[r.request_id]) for r in GREEDY_REQS}


def same_or_tied(runner: CpuRunner, prompt: str, alone: list[int], got: list[int], strict: bool) -> bool:
    """True if ``got == alone``; if not, and not ``strict``, the first difference must be a tie.

    With a runner whose logits move with the batch (``batch_invariant`` false), and logits of
    bf16 resolution (2**-7 relative, 0.25 near 40) where top tokens often tie exactly, a batch
    may pick the other of two tied tokens. A paging or scheduling bug gives a clear loser
    instead: at the first difference both tokens must be within 2**-7 (relative) of each other
    in the logits of the alone-run prefix, recomputed here. (Call only while no engine uses
    ``runner``.)
    """
    if got == alone:
        return True
    assert not strict, "batched output differs from the solo run although the runner is batch-invariant"
    assert len(got) == len(alone)
    k = next(i for i, (a, b) in enumerate(zip(alone, got, strict=True)) if a != b)
    prefix = [*runner.tokenizer.encode(prompt), *alone[:k]]
    blocks = list(range(-(-len(prefix) // runner.block_size)))
    logits = runner.logits([SeqStep(0, prefix, 0, blocks, GREEDY)])[0]
    a, b, best = float(logits[alone[k]]), float(logits[got[k]]), float(logits.max())
    assert abs(a - b) <= abs(best) * 2**-7, f"diverged at token {k} without a tie: {a} vs {b}"
    return False


def test_long_and_short_batch_matches_each_alone(
    runner: CpuRunner, alone_greedy: dict[str, list[int]], batch_invariant: bool
) -> None:
    # A small token budget forces chunked prefill of the long prompts next to decodes.
    engine = LLMEngine(runner, max_batch=8, max_num_batched_tokens=24)
    batched = run_sync(engine, GREEDY_REQS)
    assert engine.stats().free_kv_blocks == runner.num_kv_blocks
    exact = 0
    for r in GREEDY_REQS:
        assert r.prompt is not None
        got = ids_of(batched[r.request_id])
        assert len(got) == batched[r.request_id][-1].completion_tokens == 24
        exact += same_or_tied(runner, r.prompt, alone_greedy[r.request_id], got, batch_invariant)
    assert exact >= 1


def test_preemption_with_tiny_kv_budget_keeps_greedy_output(
    loaded_model: Any, runner: CpuRunner, alone_greedy: dict[str, list[int]], batch_invariant: bool
) -> None:
    reqs = GREEDY_REQS[:5]
    tiny = CpuRunner(loaded_model, num_kv_blocks=8, block_size=16)  # 128 tokens for all of them
    engine = LLMEngine(tiny, max_batch=8, max_num_batched_tokens=64)
    out = run_sync(engine, reqs)
    assert engine.stats().preemptions > 0
    assert engine.stats().free_kv_blocks == 8
    exact = 0
    for r in reqs:
        assert r.prompt is not None and out[r.request_id][-1].finish_reason == "length"
        got = ids_of(out[r.request_id])
        exact += same_or_tied(runner, r.prompt, alone_greedy[r.request_id], got, batch_invariant)
    assert exact >= 1


def test_seeded_request_is_identical_alone_and_in_a_mixed_batch_of_16(
    runner: CpuRunner, batch_invariant: bool
) -> None:
    mine = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    target = EngineRequest("mine", mine, prompt="Write a short poem about the sea:")

    async def main() -> tuple[list[Delta], list[Delta], list[list[Delta]]]:
        engine = AsyncEngine(runner, max_batch=16)
        await engine.start()
        try:
            alone = await collect(engine, target)
            others = [
                EngineRequest(
                    f"o{i}",
                    SamplingParams(
                        max_tokens=8 + i,
                        temperature=[0.0, 0.7, 1.2][i % 3],
                        top_k=[0, 10, 40][i % 3],
                        seed=i if i % 2 else None,
                    ),
                    prompt=PROMPTS[i % len(PROMPTS)],
                )
                for i in range(15)
            ]
            again, *rest = await asyncio.gather(
                *(collect(engine, r) for r in [EngineRequest("mine2", mine, prompt=target.prompt), *others])
            )
        finally:
            await engine.stop()
        return alone, again, rest

    alone, again, rest = asyncio.run(main())
    assert all(r[-1].finish_reason in ("stop", "length") for r in rest)
    assert text_of(alone)
    # a different seed samples something else
    other = run_sync(
        LLMEngine(runner),
        [EngineRequest("x", SamplingParams(max_tokens=24, temperature=0.9, seed=99), prompt=target.prompt)],
    )
    assert ids_of(other["x"]) != ids_of(alone)
    if ids_of(alone) != ids_of(again) and not batch_invariant:
        pytest.xfail(NOT_INVARIANT)
    assert ids_of(alone) == ids_of(again)
    assert text_of(alone) == text_of(again)


def test_stop_string_on_real_output(
    runner: CpuRunner, tokenizer: Any, alone_greedy: dict[str, list[int]]
) -> None:
    req = GREEDY_REQS[2]
    full = tokenizer.decode(alone_greedy[req.request_id], skip_special_tokens=True)
    words = full.split()
    assert len(words) > 6
    stop = " " + words[4]
    cut = full[: full.index(stop)]
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=(stop, "never appears"))
    out = run_sync(LLMEngine(runner), [EngineRequest("b", params, prompt=req.prompt)])["b"]
    assert text_of(out) == cut
    assert out[-1].finish_reason == "stop"
    assert out[-1].completion_tokens < 24
    assert stop not in text_of(out)


def test_chat_messages_use_the_models_template(runner: CpuRunner, tokenizer: Any) -> None:
    engine = LLMEngine(runner)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ids = engine.encode(EngineRequest("c", greedy(8), messages=msgs))
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)
    out = run_sync(engine, [EngineRequest("c", greedy(8), messages=msgs)])["c"]
    assert out[-1].finish_reason in ("stop", "length") and out[-1].prompt_tokens == len(ids)


def test_real_model_streams_whole_characters(runner: CpuRunner, tokenizer: Any) -> None:
    reqs = [
        EngineRequest("emoji", greedy(32), messages=[{"role": "user", "content": "Give me three emoji."}]),
        EngineRequest("smile", greedy(32), prompt="Emoji: 😀 😃 😄 😁 😆 😅 😂 🤣 😊 😇 🙂"),
        EngineRequest("kana", greedy(24), prompt="日本語の文章: 今日は天気がいいです。明日は"),
    ]
    out = run_sync(LLMEngine(runner), reqs)
    for r in reqs:
        deltas = out[r.request_id]
        text, ids = text_of(deltas), ids_of(deltas)
        assert any(ord(ch) > 0x7FF for ch in text), "expected multi-byte output from this prompt"
        assert len(ids) > len(deltas) - 1  # characters span several tokens
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        for d in deltas:
            d.text.encode("utf-8")
            # only a completion cut by max_tokens mid-character ends in U+FFFD, in its last delta
            assert "\ufffd" not in d.text or (d is deltas[-1] and d.finish_reason == "length")
    assert any(ord(ch) > 0xFFFF for ch in text_of(out["smile"]))  # 4-byte characters


def test_bad_requests_raise_typed_errors_before_queueing(runner: CpuRunner) -> None:
    engine = AsyncEngine(runner)
    ok = SamplingParams(max_tokens=8)
    bad = [
        EngineRequest("e1", ok, prompt=""),
        EngineRequest("e2", ok),
        EngineRequest("e3", ok, prompt="hi", messages=[{"role": "user", "content": "hi"}]),
        EngineRequest("e4", ok, messages=[]),
        EngineRequest("e5", ok, messages=[{"role": "wizard", "content": "hi"}]),
        EngineRequest("e6", ok, messages=[{"role": "user"}]),
        EngineRequest("", ok, prompt="hi"),
        EngineRequest("e8", "not params", prompt="hi"),  # type: ignore[arg-type]
    ]
    for req in bad:
        with pytest.raises(InvalidRequestError) as info:
            engine.validate(req)
        assert not isinstance(info.value, PromptTooLongError)
    with pytest.raises(PromptTooLongError):
        engine.validate(EngineRequest("l1", ok, prompt="word " * (runner.max_context + 10)))
    with pytest.raises(PromptTooLongError):
        engine.validate(EngineRequest("l2", SamplingParams(max_tokens=runner.max_context), prompt="Hi there"))
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(InvalidRequestError):
        SamplingParams(top_p=0.0)
    assert engine.stats().waiting == 0

    async def main() -> None:
        await engine.start()
        try:
            with pytest.raises(InvalidRequestError):
                await anext(engine.generate(EngineRequest("e9", ok, prompt="")))
        finally:
            await engine.stop()

    asyncio.run(main())


def test_cancel_frees_blocks(runner: CpuRunner) -> None:
    async def main() -> None:
        engine = AsyncEngine(runner)
        await engine.start()
        try:
            req = EngineRequest("c1", SamplingParams(max_tokens=32, ignore_eos=True), prompt=PROMPTS[7])
            stream = engine.generate(req)
            first = await anext(stream)
            assert first.finish_reason is None
            assert engine.stats().free_kv_blocks < engine.stats().total_kv_blocks
            engine.cancel("c1")
            rest = [d async for d in stream]
            assert rest[-1].finish_reason == "cancelled"
            assert rest[-1].completion_tokens < 32
            stats = engine.stats()
            assert stats.free_kv_blocks == stats.total_kv_blocks
            assert stats.running == stats.waiting == 0
        finally:
            await engine.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------- scripted runner


@pytest.fixture
def words(tokenizer: Any) -> list[int]:
    return sorted(set(tokenizer.encode(" the cat sat on a mat and then ran away, happily ever after.")))


def test_paged_bookkeeping_under_preemption_matches_a_roomy_cache(tokenizer: Any, words: list[int]) -> None:
    reqs = [EngineRequest(f"h{i}", greedy(12 + i, ignore_eos=True), prompt=p) for i, p in enumerate(PROMPTS)]
    roomy = run_sync(LLMEngine(ScriptedRunner(tokenizer, hash_script(words), num_kv_blocks=512)), reqs)
    tight_runner = ScriptedRunner(tokenizer, hash_script(words), num_kv_blocks=24, block_size=4)
    tight = LLMEngine(tight_runner, max_batch=8, max_num_batched_tokens=16)
    out = run_sync(tight, reqs)
    assert tight.stats().preemptions > 0
    assert max(tight_runner.batch_sizes) > 1
    for r in reqs:
        assert ids_of(out[r.request_id]) == ids_of(roomy[r.request_id])
        assert text_of(out[r.request_id]) == text_of(roomy[r.request_id])
    assert tight.stats().free_kv_blocks == 24


class SoftRunner(ScriptedRunner):
    """Batch-invariant logits with real spread: N(0, 2) over the vocabulary, seeded by the prefix."""

    def __init__(self, tokenizer: Any, **kw: Any) -> None:
        super().__init__(tokenizer, lambda prefix: 0, **kw)

    def logits(self, steps: list[SeqStep]) -> torch.Tensor:
        super().logits(steps)  # paging checks and batch bookkeeping
        rows = []
        for step in steps:
            if step.want_logits:
                bs, table, end = self.block_size, step.block_table, step.start_pos + len(step.token_ids)
                prefix = [self.slots[table[p // bs] * bs + p % bs] for p in range(end)]
                seed = int.from_bytes(hashlib.blake2b(repr(prefix).encode(), digest_size=8).digest(), "big")
                rows.append(torch.randn(self.vocab, generator=torch.Generator().manual_seed(seed)) * 2)
        return torch.stack(rows) if rows else torch.empty(0, self.vocab)


def test_seeded_sampling_is_exact_alone_in_a_batch_of_16_and_after_preemption(tokenizer: Any) -> None:
    mine = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=200, seed=77, ignore_eos=True)
    target = EngineRequest("mine", mine, prompt="Write a short poem about the sea:")
    alone = run_sync(LLMEngine(SoftRunner(tokenizer)), [target])["mine"]
    others = [
        EngineRequest(
            f"o{i}",
            SamplingParams(
                max_tokens=5 + i,
                temperature=[0.0, 0.7, 1.2, 1.0][i % 4],
                top_k=[0, 10, 0, 3][i % 4],
                top_p=[1.0, 1.0, 0.8, 0.5][i % 4],
                seed=i if i % 2 else None,
                ignore_eos=True,
            ),
            prompt=PROMPTS[i % len(PROMPTS)],
        )
        for i in range(15)
    ]
    tight = SoftRunner(tokenizer, num_kv_blocks=40, block_size=4)
    engine = LLMEngine(tight, max_batch=16, max_num_batched_tokens=32)
    batched = run_sync(engine, [*others[:7], target, *others[7:]])
    assert max(tight.batch_sizes) >= 8 and engine.stats().preemptions > 0
    assert ids_of(batched["mine"]) == ids_of(alone)
    assert text_of(batched["mine"]) == text_of(alone)
    assert len(set(ids_of(alone))) > 5  # it really sampled


def test_scripted_multibyte_completion_streams_valid_utf8(tokenizer: Any) -> None:
    target = tokenizer.encode(MULTIBYTE)
    prompt = tokenizer.encode("Say it:")
    script = follow(target, lambda prefix: len(prompt), int(tokenizer.eos_token_id))
    engine = LLMEngine(ScriptedRunner(tokenizer, script))
    out = run_sync(engine, [EngineRequest("m", greedy(64), prompt="Say it:")])["m"]
    assert text_of(out) == MULTIBYTE
    assert all("\ufffd" not in d.text for d in out)
    assert len(out) > 5  # streamed in pieces
    assert out[-1].finish_reason == "stop"
    assert out[-1].completion_tokens == len(target) + 1  # EOS counted
    assert ids_of(out) == [*target, int(tokenizer.eos_token_id)]


def test_runner_failure_ends_only_the_guilty_request(tokenizer: Any, words: list[int]) -> None:
    scripted = ScriptedRunner(tokenizer, hash_script(words))
    engine = LLMEngine(scripted)
    poison = tokenizer.encode(" zebra")[0]
    scripted.fail_if = lambda step: poison in step.token_ids
    reqs = [
        EngineRequest("good1", greedy(6, ignore_eos=True), prompt="A fine prompt"),
        EngineRequest("bad", greedy(6, ignore_eos=True), prompt="A zebra prompt"),
        EngineRequest("good2", greedy(6, ignore_eos=True), prompt="Another fine one"),
    ]
    out = run_sync(engine, reqs)
    assert out["bad"][-1].finish_reason == "error" and out["bad"][-1].error
    assert out["good1"][-1].finish_reason == out["good2"][-1].finish_reason == "length"
    assert out["good1"][-1].completion_tokens == 6
    assert engine.stats().free_kv_blocks == scripted.num_kv_blocks


def test_bad_logits_end_only_that_request(tokenizer: Any, words: list[int]) -> None:
    class NaNFor(ScriptedRunner):
        def logits(self, steps: list[SeqStep]) -> torch.Tensor:
            out = super().logits(steps)  # NaN logits: the runner's sampling raises
            rows = [s for s in steps if s.want_logits]
            for r, step in enumerate(rows):
                if step.seq_id == 1:
                    out[r, 5] = float("nan")
            return out

    scripted = NaNFor(tokenizer, hash_script(words))
    engine = LLMEngine(scripted)
    reqs = [
        EngineRequest(
            f"n{i}", SamplingParams(max_tokens=4, temperature=t, seed=1, ignore_eos=True), prompt="Hi"
        )
        for i, t in enumerate([0.0, 0.0, 0.8])
    ]
    out = run_sync(engine, reqs)
    assert out["n1"][-1].finish_reason == "error"
    assert out["n0"][-1].finish_reason == out["n2"][-1].finish_reason == "length"
    assert engine.stats().free_kv_blocks == scripted.num_kv_blocks


class _FlakyDecoder:
    """A tokenizer whose decode fails on one token id (a detokenizer bug for one request)."""

    def __init__(self, inner: Any, bad_id: int) -> None:
        self.inner, self.bad_id = inner, bad_id

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.bad_id in ids:
            raise RuntimeError("injected decode failure")
        return str(self.inner.decode(ids, skip_special_tokens=skip_special_tokens))


def test_detokenizer_failure_ends_only_that_request(tokenizer: Any) -> None:
    bad_tok = tokenizer.encode(" zebra")[0]
    fine = tokenizer.encode(" fine words here")

    def script(prefix: list[int]) -> int:
        if tokenizer.encode("Tell zebra")[-1] in prefix[:4]:
            return int(bad_tok)
        return int(fine[len(prefix) % len(fine)])

    scripted = ScriptedRunner(tokenizer, script)
    engine = LLMEngine(scripted, decode_tokenizer=_FlakyDecoder(tokenizer, bad_tok))
    out = run_sync(
        engine,
        [
            EngineRequest("ok", greedy(5, ignore_eos=True), prompt="Tell me"),
            EngineRequest("boom", greedy(5, ignore_eos=True), prompt="Tell zebra"),
        ],
    )
    assert out["boom"][-1].finish_reason == "error"
    assert out["boom"][-1].text == ""
    assert out["ok"][-1].finish_reason == "length" and text_of(out["ok"])
    assert engine.stats().free_kv_blocks == scripted.num_kv_blocks


def test_many_coroutines_are_batched_continuously(tokenizer: Any, words: list[int]) -> None:
    scripted = ScriptedRunner(tokenizer, hash_script(words))

    async def main() -> list[list[Delta]]:
        engine = AsyncEngine(scripted, max_batch=16)
        await engine.start()
        try:
            reqs = [
                EngineRequest(f"b{i}", greedy(10, ignore_eos=True), prompt=PROMPTS[i % 8]) for i in range(20)
            ]
            return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))
        finally:
            await engine.stop()

    results = asyncio.run(main())
    assert all(r[-1].finish_reason == "length" and r[-1].completion_tokens == 10 for r in results)
    assert max(scripted.batch_sizes) >= 8


def test_event_loop_stays_responsive_while_the_model_runs(tokenizer: Any, words: list[int]) -> None:
    scripted = ScriptedRunner(tokenizer, hash_script(words))

    async def main() -> None:
        engine = AsyncEngine(scripted)
        scripted.gate = threading.Event()  # the model "runs" until the gate opens
        await engine.start()
        try:
            stream = engine.generate(EngineRequest("slow", greedy(3, ignore_eos=True), prompt="Hello"))
            pending = asyncio.ensure_future(anext(stream))
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert loop.time() - t0 < 1.0  # ticks while the step is blocked in the worker
            assert not pending.done()
            scripted.gate.set()
            first = await pending
            rest = [d async for d in stream]
            assert [first, *rest][-1].finish_reason == "length"
        finally:
            scripted.gate.set()
            await engine.stop()

    asyncio.run(main())


def test_queue_full_and_stopped_engine_raise(tokenizer: Any, words: list[int]) -> None:
    scripted = ScriptedRunner(tokenizer, hash_script(words))

    async def main() -> None:
        engine = AsyncEngine(scripted, max_batch=1, max_waiting=2)
        with pytest.raises(EngineStoppedError):
            await anext(engine.generate(EngineRequest("early", greedy(2), prompt="hi")))
        scripted.gate = threading.Event()
        await engine.start()
        try:
            streams = [engine.generate(EngineRequest("q0", greedy(2), prompt="hi"))]
            await asyncio.sleep(0.05)  # q0 runs (blocked in the model)
            streams += [engine.generate(EngineRequest(f"q{i}", greedy(2), prompt="hi")) for i in (1, 2)]
            assert engine.stats().waiting == 2  # q1 and q2 wait: the queue is full
            with pytest.raises(EngineOverloadedError):
                await anext(engine.generate(EngineRequest("q3", greedy(2), prompt="hi")))
            with pytest.raises(InvalidRequestError):
                await anext(engine.generate(EngineRequest("q1", greedy(2), prompt="hi")))  # duplicate id
            scripted.gate.set()
            for s in streams:
                assert [d async for d in s][-1].finish_reason in ("stop", "length")
        finally:
            scripted.gate.set()
            await engine.stop()
        with pytest.raises(EngineStoppedError):
            await anext(engine.generate(EngineRequest("late", greedy(2), prompt="hi")))

    asyncio.run(main())


def test_closing_or_dropping_the_stream_cancels_the_request(tokenizer: Any, words: list[int]) -> None:
    scripted = ScriptedRunner(tokenizer, hash_script(words))

    async def main() -> None:
        engine = AsyncEngine(scripted)
        await engine.start()
        try:
            long = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0.0)
            # 1. aclose()
            s1 = engine.generate(EngineRequest("s1", long, prompt="one"))
            await anext(s1)
            await s1.aclose()  # type: ignore[attr-defined]
            # 2. the consuming task is cancelled (client went away)
            task = asyncio.ensure_future(collect(engine, EngineRequest("s2", long, prompt="two")))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # 3. a stream dropped without being closed
            s3 = engine.generate(EngineRequest("s3", long, prompt="three"))
            await anext(s3)
            del s3
            gc.collect()
            for _ in range(200):
                await asyncio.sleep(0.01)
                stats = engine.stats()
                if stats.running == stats.waiting == 0:
                    break
            assert stats.running == stats.waiting == 0
            assert stats.free_kv_blocks == stats.total_kv_blocks
        finally:
            await engine.stop()

    asyncio.run(main())


def test_stop_drains_then_cancels(tokenizer: Any, words: list[int]) -> None:
    scripted = ScriptedRunner(tokenizer, hash_script(words))
    scripted.delay = 0.005

    async def main() -> tuple[list[Delta], list[Delta]]:
        engine = AsyncEngine(scripted)
        await engine.start()
        short = asyncio.ensure_future(
            collect(engine, EngineRequest("short", greedy(3, ignore_eos=True), prompt="a"))
        )
        endless = asyncio.ensure_future(
            collect(engine, EngineRequest("endless", greedy(400, ignore_eos=True), prompt="b"))
        )
        await asyncio.sleep(0.01)
        await engine.stop(grace_s=0.2)
        assert engine.stats().free_kv_blocks == scripted.num_kv_blocks
        return await short, await endless

    short, endless = asyncio.run(main())
    assert short[-1].finish_reason == "length"
    assert endless[-1].finish_reason == "cancelled"


def test_engine_bug_fails_in_flight_requests_and_keeps_serving(tokenizer: Any, words: list[int]) -> None:
    class WrongShape(ScriptedRunner):
        broken = True

        def execute(self, steps: list[SeqStep]) -> list[int]:
            out = super().execute(steps)
            return out + out if self.broken else out  # breaks the runner contract

    scripted = WrongShape(tokenizer, hash_script(words))

    async def main() -> tuple[list[Delta], list[Delta]]:
        engine = AsyncEngine(scripted)
        await engine.start()
        try:
            failed = await collect(engine, EngineRequest("x", greedy(4), prompt="hello"))
            scripted.broken = False
            ok = await collect(engine, EngineRequest("y", greedy(4, ignore_eos=True), prompt="hello"))
            assert engine.stats().free_kv_blocks == scripted.num_kv_blocks
        finally:
            await engine.stop()
        return failed, ok

    failed, ok = asyncio.run(main())
    assert failed[-1].finish_reason == "error" and failed[-1].error
    assert ok[-1].finish_reason == "length" and ok[-1].completion_tokens == 4
