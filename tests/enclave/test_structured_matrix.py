"""Structured output over the whole matrix: >= 10 prompts x 4 schemas, greedy and sampled, in one
mixed batch with unconstrained neighbours, and a subset alone; every answer parses and validates."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from structured_cases import PROMPTS, SCHEMAS, schema_text

from veil.enclave.engine.async_engine import Delta, EngineRequest
from veil.enclave.engine.response_format import ResponseFormat
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.engine.sync_engine import LLMEngine
from veil.enclave.runner.cpu import CpuRunner

pytestmark = pytest.mark.slow

MAX_TOKENS = 80  # every schema's answers complete well within it (strings and arrays are bounded)


def _run(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[Delta]]:
    for r in reqs:
        engine.add_request(r.request_id, engine.encode(r), r.params)
    out: dict[str, list[Delta]] = {r.request_id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].append(o.delta)
    return out


def _request(schema: str | None, i: int, temperature: float) -> EngineRequest:
    fmt = ResponseFormat("json_schema", schema_text(schema), name=schema) if schema else None
    params = SamplingParams(
        max_tokens=MAX_TOKENS if fmt else 24, temperature=temperature, seed=1000 + i, response_format=fmt
    )
    rid = f"{schema or 'free'}/{i}/{temperature}"
    return EngineRequest(rid, params, messages=[{"role": "user", "content": PROMPTS[i]}])


def test_every_prompt_and_schema_validates_greedy_and_sampled_in_a_mixed_batch(loaded_model: Any) -> None:
    runner = CpuRunner(loaded_model, num_kv_blocks=1024, block_size=16)
    constrained = [_request(s, i, t) for s in SCHEMAS for i in range(10) for t in (0.0, 0.8)]
    free = [_request(None, i, t) for i in (10, 11) for t in (0.0, 0.8)]
    batch = constrained[:40] + free + constrained[40:]
    out = _run(LLMEngine(runner, max_batch=len(batch)), batch)
    failures = []
    for r in constrained:
        schema = r.request_id.split("/")[0]
        text = "".join(d.text for d in out[r.request_id])
        try:
            assert out[r.request_id][-1].finish_reason == "stop"
            jsonschema.validate(json.loads(text), SCHEMAS[schema])
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{r.request_id}: {text!r}: {exc}")
    assert not failures, "\n".join(failures)

    # alone: one prompt per schema, greedy and sampled, gives exactly the batched tokens
    for r in [c for c in constrained if c.request_id.split("/")[1] == "0"]:
        alone = _run(LLMEngine(runner), [r])[r.request_id]
        assert [t for d in alone for t in d.token_ids] == [t for d in out[r.request_id] for t in d.token_ids]
    for r in free:
        assert out[r.request_id][-1].completion_tokens > 0
