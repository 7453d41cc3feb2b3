"""Structured-output benchmark: aggregate tokens/s of 16 concurrent requests with and without schemas.

Veil runs through the asyncio engine (``AsyncEngine``, what ``veil serve`` uses) on the embedded
model, in one process, three ways over the same 16 chat prompts:

* **constrained**: every request carries a JSON Schema (four schemas, greedy);
* **unconstrained**: the same prompts without a schema, each made to generate exactly as many
  tokens as its constrained twin did (``ignore_eos``, ``max_tokens`` = that count), so the two
  runs have the same batch shape step by step and the ratio isolates the grammar's cost;
* **mix**: 8 constrained and 8 unconstrained requests together.

Also printed: grammar compile time, cold and from the digest cache. The peer is llama.cpp
(llama-cpp-python, same GGUF, same thread count) with the equivalent grammar
(``LlamaGrammar.from_json_schema``), one request at a time as its Python server serves them,
with and without the grammar. Target (issue #17): constrained >= 0.8x unconstrained.

    python bench/structured.py            # the full run (a few minutes on 2 cores)
    python bench/structured.py --quick    # 8 requests, 4 schemas
    python bench/structured.py --no-llamacpp

Needs the ``bench`` extra for the llama.cpp peer; a missing peer is reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "enclave"))  # the prompts and schemas the tests validate
from structured_cases import PROMPTS, SCHEMAS, schema_text  # noqa: E402

MAX_TOKENS = 80


async def _collect(engine: Any, req: Any) -> int:
    n = 0
    async for delta in engine.generate(req):
        n += len(delta.token_ids)
    return n


async def _batch(engine: Any, reqs: list[Any]) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(_collect(engine, r) for r in reqs))
    return time.perf_counter() - t0, list(counts)


def _veil(n: int, threads: int) -> dict[str, Any]:
    from veil.enclave.engine.async_engine import AsyncEngine, EngineRequest
    from veil.enclave.engine.response_format import ResponseFormat
    from veil.enclave.engine.sampling import SamplingParams

    engine = AsyncEngine.from_model(max_batch=16, threads=threads, kv_cache_mb=256)
    names = list(SCHEMAS)

    def fmt(i: int) -> ResponseFormat:
        return ResponseFormat("json_schema", schema_text(names[i % len(names)]))

    def req(i: int, tag: str, params: SamplingParams) -> Any:
        return EngineRequest(
            f"{tag}{i}", params, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        )

    def constrained(i: int, tag: str) -> Any:
        return req(i, tag, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, response_format=fmt(i)))

    def free(i: int, tag: str, tokens: int) -> Any:
        return req(i, tag, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))

    async def main() -> dict[str, Any]:
        await engine.start()
        try:
            grammar = engine._engine.grammar
            t0 = time.perf_counter()
            grammar.tokenizer()
            tokenizer_s = time.perf_counter() - t0
            compile_s = []
            for i in range(len(names)):
                t0 = time.perf_counter()
                grammar.check(fmt(i))
                compile_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            grammar.check(fmt(0))
            cached_s = time.perf_counter() - t0
            await _batch(engine, [constrained(i, "warm") for i in range(2)])  # warm-up
            wall_c, lens = await _batch(engine, [constrained(i, "c") for i in range(n)])
            wall_u, lens_u = await _batch(engine, [free(i, "u", lens[i]) for i in range(n)])
            mix = [constrained(i, "mc") if i % 2 else free(i, "mu", lens[i]) for i in range(n)]
            wall_m, lens_m = await _batch(engine, mix)
        finally:
            await engine.stop()
        return {
            "constrained": sum(lens) / wall_c,
            "unconstrained": sum(lens_u) / wall_u,
            "mix": sum(lens_m) / wall_m,
            "tokens": sum(lens),
            "lengths": lens,
            "tokenizer_s": tokenizer_s,
            "compile_s": compile_s,
            "cached_s": cached_s,
        }

    return asyncio.run(main())


def _llamacpp(n: int, threads: int, lengths: list[int]) -> dict[str, Any]:
    from llama_cpp import Llama, LlamaGrammar

    from veil.enclave.model.loader import default_model_path

    llm = Llama(model_path=str(default_model_path()), n_ctx=1024, n_threads=threads, verbose=False)
    names = list(SCHEMAS)
    grammars = {s: LlamaGrammar.from_json_schema(schema_text(s), verbose=False) for s in names}

    def run(i: int, grammar: Any, max_tokens: int) -> int:
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        out = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, grammar=grammar)
        return int(out["usage"]["completion_tokens"])  # type: ignore[index]

    run(0, None, 4)  # warm-up
    t0 = time.perf_counter()
    tok_c = sum(run(i, grammars[names[i % len(names)]], MAX_TOKENS) for i in range(n))
    wall_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok_u = sum(run(i, None, lengths[i]) for i in range(n))
    wall_u = time.perf_counter() - t0
    return {"constrained": tok_c / wall_c, "unconstrained": tok_u / wall_u, "tokens": tok_c}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 requests instead of 16")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    n = 8 if args.quick else 16
    print(f"structured output, {n} concurrent requests, embedded SmolLM2-135M, {args.threads} threads")
    veil = _veil(n, args.threads)
    print(f"  llguidance tokenizer built in {veil['tokenizer_s'] * 1000:.0f} ms (once per engine)")
    compile_ms = ", ".join(f"{s * 1000:.1f}" for s in veil["compile_s"])
    print(
        f"  grammar compile, cold: {compile_ms} ms; from the digest cache: {veil['cached_s'] * 1000:.3f} ms"
    )
    print(f"  constrained answers: {veil['tokens']} tokens, lengths {veil['lengths']}")
    print(f"{'':28}{'tokens/s':>10}{'vs unconstrained':>20}")
    for key in ("unconstrained", "constrained", "mix"):
        print(f"  veil {key:22}{veil[key]:10.1f}{veil[key] / veil['unconstrained']:19.2f}x")
    ratio = veil["constrained"] / veil["unconstrained"]
    print(
        f"  target: constrained >= 0.80x unconstrained: {'met' if ratio >= 0.8 else 'NOT met'} ({ratio:.2f}x)"
    )
    if args.no_llamacpp:
        return 0
    try:
        peer = _llamacpp(n, args.threads, veil["lengths"])
    except ImportError as exc:
        print(f"  llama.cpp peer not run: {exc} (install the bench extra)")
        return 0
    for key in ("unconstrained", "constrained"):
        print(f"  llama.cpp {key:17}{peer[key]:10.1f}{peer[key] / peer['unconstrained']:19.2f}x")
    print(
        f"  veil / llama.cpp, constrained: {veil['constrained'] / peer['constrained']:.2f}x "
        f"(veil batches 16 at once; llama.cpp serves one at a time)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
