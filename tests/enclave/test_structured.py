"""Structured output (issue #17): token masks, the grammar compiler and the engine with the real model.

The real embedded model and its real tokenizer throughout; llguidance compiles every grammar.
Real-model runs stay at small ``max_tokens``; the large prompts x schemas matrix is in
``test_structured_matrix.py`` (slow).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest
import torch
from structured_cases import PROMPTS, SCHEMAS, schema_text

from veil.enclave.engine.async_engine import AsyncEngine, Delta, EngineRequest
from veil.enclave.engine.grammar import GrammarCompiler, GrammarMatcher
from veil.enclave.engine.response_format import MAX_FORMAT_BYTES, ResponseFormat
from veil.enclave.engine.sampler import Sampler, apply_token_bitmask
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.engine.sync_engine import LLMEngine
from veil.enclave.errors import EngineInternalError, InvalidRequestError, ResponseFormatError
from veil.enclave.runner.cpu import CpuRunner
from veil.enclave.runner.protocol import SeqStep

# ---------------------------------------------------------------------------- helpers


def pack(allowed: set[int], vocab: int) -> torch.Tensor:
    """A packed int32 token bitmask (xgrammar's layout) allowing exactly ``allowed``."""
    words = [0] * ((vocab + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def unpack(mask: torch.Tensor, vocab: int) -> set[int]:
    return {t for t in range(vocab) if (int(mask[t // 32]) >> (t % 32)) & 1}


def mask_of(compiler: GrammarCompiler, m: GrammarMatcher, completion: list[int]) -> torch.Tensor:
    mask = compiler.start_masks([(m, completion)]).mask(m)
    assert mask.shape[0] > 1  # a computed mask, not the one-word refusal
    return mask


def schema_format(name: str) -> ResponseFormat:
    return ResponseFormat("json_schema", schema_text(name))


def chat(rid: str, prompt: str, params: SamplingParams) -> EngineRequest:
    return EngineRequest(rid, params, messages=[{"role": "user", "content": prompt}])


def run_sync(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[Delta]]:
    for r in reqs:
        engine.add_request(r.request_id, engine.encode(r), r.params)
    out: dict[str, list[Delta]] = {r.request_id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].append(o.delta)
    return out


def ids_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.fixture(scope="module")
def runner(loaded_model: Any) -> CpuRunner:
    return CpuRunner(loaded_model, num_kv_blocks=256, block_size=16)


@pytest.fixture(scope="module")
def compiler(runner: CpuRunner) -> GrammarCompiler:
    return GrammarCompiler(runner.tokenizer, runner.eos_token_ids)


class CountingRunner:
    """The real runner, counting ``execute`` calls (to prove that no model work was done)."""

    def __init__(self, inner: CpuRunner) -> None:
        self._inner = inner
        self.executes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def execute(self, steps: list[SeqStep]) -> torch.Tensor:
        self.executes += 1
        return self._inner.execute(steps)


# ---------------------------------------------------------------------------- masks in the sampler


def test_apply_token_bitmask_masks_only_constrained_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 70)  # 70 columns: a mask of 3 words covers 96 tokens
    allowed = [pack({1, 33, 69}, 70), None, pack({0}, 70)]
    out = apply_token_bitmask(logits, allowed)
    assert torch.equal(out[1], logits[1])  # the unconstrained row is untouched
    assert {int(i) for i in torch.isfinite(out[0]).nonzero()} == {1, 33, 69}
    assert {int(i) for i in torch.isfinite(out[2]).nonzero()} == {0}
    assert torch.equal(out[0, [1, 33, 69]], logits[0, [1, 33, 69]])
    assert torch.isfinite(logits).all()  # the caller's tensor is not modified
    assert apply_token_bitmask(logits, [None, None, None]) is logits


def test_logits_wider_than_the_mask_disallow_the_padding() -> None:
    """The model's vocabulary may be padded past the tokenizer's: those columns are never picked."""
    logits = torch.zeros(1, 100)
    logits[0, 90:] = 50.0  # the padding columns would win
    out = apply_token_bitmask(logits, [pack({3, 5}, 64)])  # 2 words = 64 tokens
    assert {int(i) for i in torch.isfinite(out[0]).nonzero()} == {3, 5}
    assert Sampler().sample(
        logits, [SamplingParams(temperature=0.0)], [0], [0], allowed=[pack({3, 5}, 64)]
    ) in (
        [3],
        [5],
    )


def test_malformed_masks_are_an_internal_error() -> None:
    logits = torch.zeros(2, 64)
    with pytest.raises(EngineInternalError):
        apply_token_bitmask(logits, [pack({1}, 64).to(torch.int64), None])
    with pytest.raises(EngineInternalError):
        apply_token_bitmask(logits, [pack({1}, 64), pack({1}, 96)])
    with pytest.raises(EngineInternalError):
        Sampler().sample(logits, [SamplingParams()] * 2, [1, 2], [0, 0], allowed=[None])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=1.3, top_k=5, seed=1),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.5, seed=1),
    ],
)
def test_sampler_picks_only_allowed_tokens_and_leaves_neighbours_alone(params: SamplingParams) -> None:
    torch.manual_seed(1)
    vocab = 300
    logits = torch.randn(3, vocab) * 3
    allowed_set = {7, 100, 101, 299}
    free = [params, SamplingParams(temperature=0.9, seed=5), params]
    for step in range(40):
        seeds, steps = [step, 11, step + 1], [step, step, step]
        plain = Sampler().sample(logits, free, seeds, steps)
        masked = Sampler().sample(logits, free, seeds, steps, allowed=[pack(allowed_set, vocab), None, None])
        assert masked[0] in allowed_set
        assert masked[1:] == plain[1:]  # unconstrained rows draw exactly what they drew without it
        if params.greedy:
            assert masked[0] == max(allowed_set, key=lambda t: float(logits[0, t]))


def test_a_row_that_allows_nothing_fails() -> None:
    with pytest.raises(EngineInternalError):
        Sampler().sample(
            torch.randn(1, 64), [SamplingParams(temperature=0.0)], [0], [0], allowed=[pack(set(), 64)]
        )


# ---------------------------------------------------------------------------- ResponseFormat (pure)


@pytest.mark.parametrize(
    ("kind", "text", "match"),
    [
        ("yaml", "", "type must be one of"),
        ("json_object", "{}", "takes no schema"),
        ("json_schema", "", "empty"),
        ("json_schema", "{not json", "not valid JSON"),
        ("json_schema", "[1, 2]", "must be a JSON object"),
        ("lark_grammar", "   ", "empty"),
        ("json_schema", json.dumps({"description": "x" * MAX_FORMAT_BYTES}), "limit"),
    ],
)
def test_response_format_is_checked_when_built(kind: str, text: str, match: str) -> None:
    with pytest.raises(ResponseFormatError, match=match):
        ResponseFormat(kind, text)  # type: ignore[arg-type]


def test_response_format_digest_names_kind_and_text() -> None:
    a = ResponseFormat("json_schema", '{"type": "object"}')
    assert a.digest == ResponseFormat("json_schema", '{"type": "object"}', name="other").digest
    assert a.digest != ResponseFormat("json_schema", '{"type":"object"}').digest
    assert a.digest != ResponseFormat("lark_grammar", '{"type": "object"}').digest


def test_response_format_excludes_ignore_eos_and_min_tokens() -> None:
    fmt = ResponseFormat("json_object")
    for bad in ({"ignore_eos": True}, {"min_tokens": 2}):
        with pytest.raises(InvalidRequestError, match="ignore_eos or min_tokens"):
            SamplingParams(response_format=fmt, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="ResponseFormat"):
        SamplingParams(response_format='{"type": "object"}')  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the compiler


@pytest.mark.parametrize(
    ("kind", "text", "problem"),
    [
        ("json_schema", '{"type": "foo"}', "Invalid type: foo"),
        ("json_schema", '{"type": "array", "uniqueItems": true}', "uniqueItems"),
        (
            "json_schema",
            '{"type": "integer", "minimum": 5, "maximum": 1}',
            "minimum (5) is greater than maximum",
        ),
        ("json_schema", '{"type": "string", "pattern": "(["}', "regex parse error"),
        ("json_schema", '{"type": "string", "format": "no-such-format"}', "Unknown format: no-such-format"),
        ("json_schema", '{"$ref": "https://example.com/s.json"}', "does not fetch"),  # never the network
        ("lark_grammar", "start: undefined_rule", 'unknown name: "undefined_rule"'),
    ],
)
def test_invalid_or_unsupported_formats_name_the_problem(
    compiler: GrammarCompiler, kind: str, text: str, problem: str
) -> None:
    with pytest.raises(ResponseFormatError) as info:
        compiler.check(ResponseFormat(kind, text))  # type: ignore[arg-type]
    assert problem in str(info.value)
    assert str(info.value).startswith("response_format: invalid or unsupported")


def test_compiled_grammars_are_cached_by_digest(runner: CpuRunner) -> None:
    compiler = GrammarCompiler(runner.tokenizer, runner.eos_token_ids, cache_size=2)
    person, rating, tags = (schema_format(n) for n in ("person", "rating", "tags"))
    compiler.check(person)
    compiler.check(ResponseFormat("json_schema", person.text, name="renamed"))
    assert compiler.compiles == 1 and compiler.cached(person)
    compiler.check(rating)
    compiler.check(tags)  # evicts the least recently used: person
    assert compiler.compiles == 3 and not compiler.cached(person) and compiler.cached(tags)
    compiler.matcher(person)
    assert compiler.compiles == 4


def test_eos_is_allowed_only_where_the_grammar_accepts(runner: CpuRunner, compiler: GrammarCompiler) -> None:
    (eos,) = runner.eos_token_ids
    vocab = len(runner.tokenizer)
    fmt = ResponseFormat("json_schema", json.dumps({"enum": ["alpha beta gamma"]}))
    m = compiler.matcher(fmt)
    seen: list[int] = []
    for token in runner.tokenizer.encode('"alpha beta gamma"', add_special_tokens=False):
        allowed = unpack(mask_of(compiler, m, seen), vocab)
        assert eos not in allowed and not m.is_accepting
        assert token in allowed
        assert m.accept(token)
        seen.append(token)
    allowed = unpack(mask_of(compiler, m, seen), vocab)
    assert m.is_accepting and eos in allowed
    assert m.accept(eos)


def test_matcher_replays_when_it_does_not_follow_the_completion(
    runner: CpuRunner, compiler: GrammarCompiler
) -> None:
    fmt = schema_format("person")
    tokens = runner.tokenizer.encode('{"name": "Al', add_special_tokens=False)
    a, b = compiler.matcher(fmt), compiler.matcher(fmt)
    for t in tokens:
        assert a.accept(t)
    assert b.consumed == 0  # matchers from one cached grammar share no state
    assert not b.accept(runner.tokenizer.encode("x", add_special_tokens=False)[0])  # refused, not '{'
    # rolled back to a prefix (as a recompute that drops tokens would): reset and replay
    fresh = compiler.matcher(fmt)
    for t in tokens[:2]:
        fresh.accept(t)
    ma, mf = mask_of(compiler, a, tokens[:2]), mask_of(compiler, fresh, tokens[:2])
    assert a.consumed == 2 and torch.equal(ma, mf)


# ---------------------------------------------------------------------------- the engine, real model


def test_invalid_schema_is_refused_before_any_model_work(runner: CpuRunner) -> None:
    counting = CountingRunner(runner)
    engine = LLMEngine(counting)  # type: ignore[arg-type]
    bad = SamplingParams(response_format=ResponseFormat("json_schema", '{"type": "object", "not": {}}'))
    with pytest.raises(ResponseFormatError, match="Unimplemented keys"):
        engine.encode(chat("bad", "hi", bad))
    assert counting.executes == 0 and not engine.has_unfinished()

    async def via_async_engine() -> None:
        aengine = AsyncEngine(counting)  # type: ignore[arg-type]
        await aengine.start()
        try:
            with pytest.raises(ResponseFormatError, match="Unimplemented keys"):
                [d async for d in aengine.generate(chat("bad", "hi", bad))]
        finally:
            await aengine.stop()

    asyncio.run(via_async_engine())
    assert counting.executes == 0


def test_a_schema_forcing_a_long_answer_stops_at_max_tokens(runner: CpuRunner) -> None:
    long = {"type": "array", "items": {"type": "string", "minLength": 20}, "minItems": 40}
    params = SamplingParams(
        max_tokens=12, temperature=0.0, response_format=ResponseFormat("json_schema", json.dumps(long))
    )
    out = run_sync(LLMEngine(runner), [chat("long", "List some words.", params)])["long"]
    assert out[-1].finish_reason == "length" and out[-1].completion_tokens == 12
    text = text_of(out)
    assert text.startswith('["')  # a prefix of the forced answer: incomplete JSON, as documented
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def mixed_batch(runner: CpuRunner) -> tuple[list[EngineRequest], list[EngineRequest]]:
    constrained = [
        chat(
            f"{name}-{t}", PROMPTS[i], SamplingParams(max_tokens=72, temperature=t, seed=i, response_format=f)
        )
        for i, (name, f) in enumerate(
            [*((n, schema_format(n)) for n in SCHEMAS), ("obj", ResponseFormat("json_object"))]
        )
        for t in (0.0, 0.8)
    ]
    free = [
        chat("free-greedy", PROMPTS[5], SamplingParams(max_tokens=16, temperature=0.0)),
        chat("free-seeded", PROMPTS[6], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99)),
        EngineRequest(
            "free-prompt", SamplingParams(max_tokens=16, temperature=1.1, top_k=40, seed=7), prompt="The sea"
        ),
    ]
    return constrained, free


def test_mixed_batch_answers_validate_and_neighbours_keep_their_tokens(runner: CpuRunner) -> None:
    constrained, free = mixed_batch(runner)
    alone = {r.request_id: ids_of(run_sync(LLMEngine(runner), [r])[r.request_id]) for r in free}
    engine = LLMEngine(runner, max_batch=16)
    out = run_sync(engine, [*constrained[:5], *free, *constrained[5:]])
    for r in free:  # the constrained requests in the batch changed none of their tokens
        assert ids_of(out[r.request_id]) == alone[r.request_id], r.request_id
    for r in constrained:
        deltas = out[r.request_id]
        assert deltas[-1].finish_reason == "stop", (r.request_id, text_of(deltas))
        value = json.loads(text_of(deltas))
        name = r.request_id.split("-")[0]
        if name == "obj":
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, SCHEMAS[name])
    assert engine.stats().free_kv_blocks == runner.num_kv_blocks


def test_constrained_seeded_request_is_the_same_alone_and_in_a_batch(runner: CpuRunner) -> None:
    mine = chat(
        "mine",
        PROMPTS[3],
        SamplingParams(max_tokens=64, temperature=0.9, seed=4, response_format=schema_format("place")),
    )
    alone = run_sync(LLMEngine(runner), [mine])["mine"]
    others = [
        chat(
            f"o{i}",
            PROMPTS[i],
            SamplingParams(max_tokens=10, temperature=[0.0, 1.0][i % 2], seed=i, response_format=f),
        )
        for i, f in enumerate([None, schema_format("person"), None, ResponseFormat("json_object")])
    ]
    batched = run_sync(LLMEngine(runner, max_batch=8), [*others[:2], mine, *others[2:]])["mine"]
    assert ids_of(batched) == ids_of(alone)
    jsonschema.validate(json.loads(text_of(alone)), SCHEMAS["place"])


def test_lark_grammar_constrains_the_answer(runner: CpuRunner) -> None:
    grammar = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    params = SamplingParams(
        max_tokens=16, temperature=1.0, seed=3, response_format=ResponseFormat("lark_grammar", grammar)
    )
    out = run_sync(LLMEngine(runner), [chat("g", "Is the sky blue?", params)])["g"]
    assert text_of(out) in ("The answer is yes.", "The answer is no.")
    assert out[-1].finish_reason == "stop"


def test_preempted_constrained_requests_still_validate(loaded_model: Any) -> None:
    tiny = CpuRunner(
        loaded_model, num_kv_blocks=8, block_size=16
    )  # 128 tokens: four requests of ~25 + ~25 tokens
    engine = LLMEngine(tiny, max_batch=4, max_num_batched_tokens=64)
    names = list(SCHEMAS)
    reqs = [
        EngineRequest(
            f"p{i}",
            SamplingParams(max_tokens=56, temperature=0.0, response_format=schema_format(n)),
            prompt=f"{PROMPTS[i]} Answer in JSON, and be brief and precise in every one of the fields:",
        )
        for i, n in enumerate(names)
    ]
    out = run_sync(engine, reqs)
    assert engine.stats().preemptions > 0
    for r, n in zip(reqs, names, strict=True):
        jsonschema.validate(json.loads(text_of(out[r.request_id])), SCHEMAS[n])


def test_a_failing_mask_fails_only_its_request(runner: CpuRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: a constrained row without a mask ends with an error, never unconstrained."""
    from veil.enclave.engine import grammar

    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("mask computation failed")

    monkeypatch.setattr(grammar, "_fill_masks", broken)
    free = chat("free", PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0))
    bound = chat(
        "bound",
        PROMPTS[1],
        SamplingParams(max_tokens=4, temperature=0.0, response_format=schema_format("person")),
    )
    out = run_sync(LLMEngine(runner), [free, bound])
    assert out["bound"][-1].finish_reason == "error" and text_of(out["bound"]) == ""
    assert out["free"][-1].finish_reason == "length" and len(ids_of(out["free"])) == 4
