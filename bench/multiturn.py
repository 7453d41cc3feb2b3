"""Multi-turn chat benchmark: time to first token and throughput with Veil's per-tenant prefix cache
on vs off, and vs llama.cpp with its own prompt cache (llama-cpp-python ``LlamaRAMCache``).

Workload: ``--conversations`` chats (default 8) of ``--turns`` turns (default 6). Each chat has its
own context (a system prompt of about ``--context-tokens`` tokens) and its own tenant secret, as
when every chat runs in its own ``veil.Client`` (the default: one tenant per client instance).
Veil's two runs (cache on, cache off) take turns turn by turn in one process, so a shared
machine's changing load weighs on both alike. Every turn resends the whole conversation (system,
the user turns, the assistant's earlier answers) and asks for ``--new-tokens`` greedy tokens (EOS
ignored). Turn ``t`` of all chats is
sent together: Veil serves them concurrently through the asyncio engine; llama.cpp serves one
request at a time, as its Python server does (so its TTFT includes no queueing behind other chats,
Veil's does).

Printed: TTFT p50 / p95 at turn 1 and at turns >= 2, completion tokens/s over the whole run, and
the ratios cache on / cache off and Veil / llama.cpp. The machine may be shared: compare ratios
measured in one run, not figures across runs.

    python bench/multiturn.py                  # 8 conversations x 6 turns, Veil on/off and llama.cpp
    python bench/multiturn.py --quick          # 4 x 3, 16 new tokens
    python bench/multiturn.py --no-llamacpp    # Veil only
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import random
import time
from pathlib import Path
from typing import Any

_WORDS = [
    "the",
    "river",
    "city",
    "bakery",
    "report",
    "kernel",
    "memory",
    "block",
    "history",
    "science",
    "because",
    "however",
    "morning",
    "village",
    "market",
    "winter",
    "summer",
    "garden",
    "letter",
    "station",
    "bridge",
    "harbor",
    "window",
    "mountain",
    "lantern",
    "copper",
    "silver",
    "orange",
    "apple",
    "twenty",
    "seven",
    "number",
    "proof",
    "key",
    "cache",
    "secure",
    "model",
    "token",
    "quiet",
]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words)).capitalize() + "."


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class Chat:
    """One conversation: its tenant secret, its messages so far, and the user turns to come."""

    def __init__(self, i: int, args: argparse.Namespace) -> None:
        rng = random.Random(1000 + i)
        self.tenant = hashlib.sha256(b"bench-tenant-%d" % i).digest()
        context = _text(rng, int(args.context_tokens * 0.75))
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": f"You answer questions about this notebook. {context}"}
        ]
        self.questions = [_text(rng, 16) + " What does it say?" for _ in range(args.turns)]


# ---------------------------------------------------------------------------------------- veil


def run_veil(args: argparse.Namespace) -> dict[bool, dict[str, Any]]:
    """Cache on and cache off, one engine each, taking turns: turn ``t`` runs on one engine, then
    on the other, so a machine whose load changes during the run weighs on both alike."""
    from veil.enclave.engine.async_engine import AsyncEngine
    from veil.enclave.engine.sampling import SamplingParams
    from veil.enclave.engine.sync_engine import EngineRequest

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    engines = {
        on: AsyncEngine.from_model(
            args.model,
            kv_cache_mb=args.kv_mb,
            max_batch=max(8, args.conversations),
            threads=args.threads,
            prefix_caching=on,
        )
        for on in (True, False)
    }
    chats = {on: [Chat(i, args) for i in range(args.conversations)] for on in engines}
    res: dict[bool, dict[str, Any]] = {
        on: {"ttft": {}, "cached": {}, "busy": 0.0, "tokens": 0} for on in engines
    }

    async def turn(on: bool, chat: Chat, t: int, t0: float) -> int:
        chat.messages.append({"role": "user", "content": chat.questions[t]})
        req = EngineRequest(
            f"c{id(chat)}-{t}", params, messages=list(chat.messages), tenant_secret=chat.tenant
        )
        parts: list[str] = []
        first = float("nan")
        n = 0
        async for d in engines[on].generate(req):
            if d.token_ids and n == 0:
                first = time.perf_counter()
            n += len(d.token_ids)
            parts.append(d.text)
            if d.finish_reason is not None:
                res[on]["cached"].setdefault(t, []).append(d.cached_tokens)
        res[on]["ttft"].setdefault(t, []).append(first - t0)
        chat.messages.append({"role": "assistant", "content": "".join(parts)})
        return n

    async def main() -> None:
        for engine in engines.values():
            await engine.start()
            warm = EngineRequest("warm", SamplingParams(max_tokens=2, temperature=0.0), prompt="Hello")
            async for _ in engine.generate(warm):
                pass
        for t in range(args.turns):
            for on in (t % 2 == 0, t % 2 != 0):  # alternate which engine goes first
                t0 = time.perf_counter()
                res[on]["tokens"] += sum(await asyncio.gather(*(turn(on, c, t, t0) for c in chats[on])))
                res[on]["busy"] += time.perf_counter() - t0
        for engine in engines.values():
            await engine.stop()

    asyncio.run(main())
    for r in res.values():
        r["tok_s"], r["wall_s"] = r["tokens"] / r["busy"], r["busy"]
    return res


# ------------------------------------------------------------------------------------ llama.cpp


def run_llamacpp(args: argparse.Namespace, *, cache: bool) -> dict[str, Any]:
    from llama_cpp import Llama, LlamaRAMCache

    from veil.enclave.engine.sampling import SamplingParams
    from veil.enclave.engine.sync_engine import EngineRequest, LLMEngine
    from veil.enclave.model.loader import default_model_path, load_model
    from veil.enclave.runner.cpu import CpuRunner

    path = args.model or default_model_path()
    # Veil's tokenizer and chat template render the prompts, so both systems read the same ids.
    templater = LLMEngine(CpuRunner(load_model(path), 256, 16, threads=1))  # encode() only: no KV used
    llm = Llama(
        model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048, verbose=False
    )
    if cache:
        llm.set_cache(LlamaRAMCache(capacity_bytes=args.kv_mb * 2**20))
    eos = llm.token_eos()
    chats = [Chat(i, args) for i in range(args.conversations)]
    ttft: dict[int, list[float]] = {}
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    llm.create_completion(prompt=[1, 2, 3], max_tokens=2, temperature=0.0)  # warm-up
    total = 0
    t_start = time.perf_counter()
    for t in range(args.turns):
        t0 = time.perf_counter()  # the turn's requests arrive together and are served in order
        for chat in chats:
            chat.messages.append({"role": "user", "content": chat.questions[t]})
            ids = templater.encode(EngineRequest("x", params, messages=list(chat.messages)))
            first = float("nan")
            parts: list[str] = []
            for n, piece in enumerate(
                llm.create_completion(
                    prompt=ids,
                    max_tokens=args.new_tokens,
                    temperature=0.0,
                    top_k=1,
                    logit_bias={eos: -1e9},
                    stream=True,
                )
            ):
                if n == 0:
                    first = time.perf_counter()
                parts.append(piece["choices"][0]["text"])  # type: ignore[index]
                total += 1
            ttft.setdefault(t, []).append(first - t0)
            chat.messages.append({"role": "assistant", "content": "".join(parts)})
    wall = time.perf_counter() - t_start
    return {"ttft": ttft, "tok_s": total / wall, "wall_s": wall}


# ---------------------------------------------------------------------------------------- report


def _summary(res: dict[str, Any]) -> dict[str, float]:
    ttft = res["ttft"]
    later = [x for t, xs in ttft.items() if t >= 1 for x in xs]
    return {
        "t1_p50": _pct(ttft.get(0, []), 50),
        "t1_p95": _pct(ttft.get(0, []), 95),
        "t2_p50": _pct(later, 50),
        "t2_p95": _pct(later, 95),
        "tok_s": res["tok_s"],
        "wall_s": res["wall_s"],
    }


def _table(runs: dict[str, dict[str, float]]) -> None:
    print(f"{'system':22} {'TTFT t1 p50':>12} {'p95':>8} {'TTFT t>=2 p50':>14} {'p95':>8} {'tok/s':>8}")
    for name, s in runs.items():
        print(
            f"{name:22} {_fmt(s['t1_p50'] * 1e3, '.0f'):>10}ms {_fmt(s['t1_p95'] * 1e3, '.0f'):>6}ms "
            f"{_fmt(s['t2_p50'] * 1e3, '.0f'):>12}ms {_fmt(s['t2_p95'] * 1e3, '.0f'):>6}ms {s['tok_s']:8.1f}",
            flush=True,
        )


def _fmt(x: float, spec: str) -> str:
    return "—" if math.isnan(x) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--context-tokens", type=int, default=160, help="about this many system-prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-mb", type=int, default=256, help="Veil KV cache and llama.cpp RAM cache budget")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--quick", action="store_true", help="4 conversations x 3 turns, 16 new tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.conversations, args.turns, args.new_tokens = 4, 3, 16

    runs: dict[str, dict[str, float]] = {}
    print(
        f"{args.conversations} conversations x {args.turns} turns, {args.new_tokens} new tokens, "
        f"{args.threads} threads"
    )
    veil = run_veil(args)
    runs["veil cache on"] = _summary(veil[True])
    hit = [c for t, cs in veil[True]["cached"].items() if t >= 1 for c in cs]
    print(
        f"veil cache on: prompt tokens from the cache at turns >= 2, mean {sum(hit) / max(1, len(hit)):.0f}"
    )
    runs["veil cache off"] = _summary(veil[False])
    _table(runs)
    if not args.no_llamacpp:
        try:
            runs["llama.cpp RAM cache"] = _summary(run_llamacpp(args, cache=True))
            runs["llama.cpp no cache"] = _summary(run_llamacpp(args, cache=False))
        except ImportError as exc:
            print(f"llama.cpp: not installed ({exc.name}); pip install the bench extra")

    if len(runs) > 2:
        _table(runs)
    v_on, v_off = runs["veil cache on"], runs["veil cache off"]
    print(
        f"veil cache on / off: TTFT p50 at turns >= 2 {v_off['t2_p50'] / v_on['t2_p50']:.2f}x faster "
        f"(target >= 3x), throughput {v_on['tok_s'] / v_off['tok_s']:.2f}x"
    )
    if "llama.cpp RAM cache" in runs:
        lc = runs["llama.cpp RAM cache"]
        print(
            "veil cache on / llama.cpp RAM cache: TTFT p50 at turns >= 2 "
            f"{lc['t2_p50'] / v_on['t2_p50']:.2f}x faster, throughput {v_on['tok_s'] / lc['tok_s']:.2f}x "
            "(llama.cpp serves one request at a time)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
