"""Engine benchmark: Veil vs llama.cpp (llama-cpp-python) vs HF transformers, same GGUF, same cores.

Measures, for each system, in one run:

(a) single-stream decode tokens/s (after the first token) and the implied weight bandwidth
    (bytes of weights read per token × tokens/s, the gpt-fast habit),
(b) aggregate tokens/s with 1, 4, 16 and 64 concurrent requests (128 new tokens each, prompts of
    20–200 tokens, EOS ignored so every request makes the same number of tokens),
(c) time to first token p50 / p95 over the concurrent runs (queueing included: that is what a
    client sees),
(d) peak RSS of the process serving them.

Each system runs in its own subprocess (so peak RSS is its own) pinned to the same cores with the
same thread count. llama.cpp serves one request at a time, as its Python server does; HF
transformers runs ``generate`` on the dequantized fp32 model, batching concurrent requests with
left padding. Veil goes through the asyncio engine (``veil.enclave.engine.AsyncEngine``).

    python bench/engine.py                 # the full comparison (several minutes on 2 cores)
    python bench/engine.py --quick         # a smoke run: 32 new tokens, concurrency 1 and 4
    python bench/engine.py --only veil     # one system
    python bench/engine.py --device cuda   # on a GPU: Veil's CUDA runner vs HF transformers on the GPU
                                           # (and vLLM, given --vllm-python; llama.cpp stays on the CPU)

``--device cuda`` runs Veil with ``--device cuda`` (Triton kernels, CUDA graphs, sampling on the
device) and HF transformers in bf16 on the GPU; ``--vllm-python PATH`` adds vLLM, run by that
interpreter (a separate venv: vLLM pins its own torch), on the same GGUF file.

Needs the ``bench`` extra (``llama-cpp-python``, ``psutil``); a missing peer is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SYSTEMS = ("veil", "llamacpp", "hf", "vllm")
DEFAULT_SYSTEMS = ("veil", "llamacpp", "hf")  # vllm only when asked (--vllm-python / --only vllm)
_WORDS = [
    "the",
    "a",
    "model",
    "token",
    "cache",
    "secure",
    "enclave",
    "river",
    "mountain",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "attestation",
    "report",
    "key",
    "proof",
    "kernel",
    "memory",
    "block",
    "number",
    "seven",
    "twenty",
    "apple",
    "orange",
    "city",
    "history",
    "science",
    "because",
    "however",
    "therefore",
    "while",
    "during",
    "before",
    "after",
    "under",
    "between",
]


def _prompts(n: int, tokenizer: Any, seed: int = 1234) -> list[list[int]]:
    """``n`` prompts whose lengths are spread evenly over 20–200 tokens, deterministic."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        target = 20 + (180 * i) // max(1, n - 1) if n > 1 else 100
        words = [rng.choice(_WORDS) for _ in range(target * 2)]
        ids = list(tokenizer(" ".join(words)).input_ids)[:target]
        out.append(ids)
    rng.shuffle(out)
    return out


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------- veil


def _run_veil(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from veil.enclave.engine.async_engine import AsyncEngine
    from veil.enclave.engine.sampling import SamplingParams
    from veil.enclave.engine.sync_engine import EngineRequest

    max_c = max(args.concurrency)
    need_tokens = max_c * (200 + args.new_tokens + 16)
    kv_mb = args.kv_mb or max(64, need_tokens * 48 * 1024 // 2**20 + 16)  # SmolLM2: 45 KiB/token
    engine = AsyncEngine.from_model(
        args.model, kv_cache_mb=kv_mb, max_batch=max(64, max_c), threads=args.threads, device=args.device
    )
    runner = engine._engine.runner
    tok = runner.tokenizer
    w = runner.weights if args.device == "cuda" else runner.model.weights
    weight_bytes = w.nbytes - w.embed.nbytes  # bytes read per decoded token (the lookup reads one row)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    async def one(rid: str, ids: list[int], t0: float) -> tuple[float, float, float, int]:
        text = tok.decode(ids)
        first = last = float("nan")
        n = 0
        async for d in engine.generate(EngineRequest(rid, params, prompt=text)):
            if d.token_ids:
                now = time.perf_counter()
                if n == 0:
                    first = now
                last = now
                n += len(d.token_ids)
        return first - t0, first, last, n

    async def main() -> dict[str, Any]:
        await engine.start()
        res: dict[str, Any] = {"weight_bytes": weight_bytes}
        await one("warm", _prompts(1, tok)[0][:32], time.perf_counter())  # warm-up
        _ttft, first, last, n = await one("single", _prompts(1, tok, seed=7)[0], time.perf_counter())
        res["single_tok_s"] = (n - 1) / (last - first)
        res["agg"], res["rss"] = {}, {}
        ttfts: list[float] = []
        for c in args.concurrency:
            prompts = _prompts(c, tok, seed=c)
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(one(f"c{c}-{i}", p, t0) for i, p in enumerate(prompts)))
            wall = time.perf_counter() - t0
            total = sum(o[3] for o in outs)
            res["agg"][str(c)] = total / wall
            res["rss"][str(c)] = _peak_rss_mb()
            ttfts.extend(o[0] for o in outs)
        res["ttft_p50"], res["ttft_p95"] = _pct(ttfts, 50), _pct(ttfts, 95)
        await engine.stop()
        return res

    out = asyncio.run(main())
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


# ------------------------------------------------------------------------------------ llama.cpp


def _run_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(args.model),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=1024,
        verbose=False,
    )

    class _Tok:
        def __call__(self, text: str) -> Any:
            class R:
                input_ids = llm.tokenize(text.encode(), add_bos=False)

            return R()

    tok = _Tok()

    def one(ids: list[int]) -> tuple[float, float, float, int]:
        llm.reset()
        t0 = time.perf_counter()
        first = last = float("nan")
        n = 0
        for _t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            now = time.perf_counter()
            if n == 0:
                first = now
            last = now
            n += 1
            if n >= args.new_tokens:
                break
        return t0, first, last, n

    res: dict[str, Any] = {"weight_bytes": Path(args.model).stat().st_size}
    one(_prompts(1, tok)[0][:32])
    _t0, first, last, n = one(_prompts(1, tok, seed=7)[0])
    res["single_tok_s"] = (n - 1) / (last - first)
    res["agg"] = {}
    ttfts: list[float] = []
    for c in args.concurrency:
        prompts = _prompts(c, tok, seed=c)
        start = time.perf_counter()
        total = 0
        for p in prompts:  # one request at a time; the others wait in the queue
            _t0, first, _last, n = one(p)
            ttfts.append(first - start)
            total += n
        res["agg"][str(c)] = total / (time.perf_counter() - start)
        res.setdefault("rss", {})[str(c)] = _peak_rss_mb()
    res["ttft_p50"], res["ttft_p95"] = _pct(ttfts, 50), _pct(ttfts, 95)
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


# ----------------------------------------------------------------------------------------- HF


def _run_hf(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    p = Path(args.model)
    device = "cuda" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(p.parent), gguf_file=p.name, dtype=dtype, local_files_only=True
    )
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())

    def batch(prompts: list[list[int]]) -> tuple[float, float, int]:
        """Generate for all prompts in one padded batch; (time to first token, wall, tokens)."""
        width = max(len(x) for x in prompts)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=pad)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        wall = time.perf_counter() - t0
        return ttft, wall, (out.shape[1] - width) * len(prompts)

    res: dict[str, Any] = {"weight_bytes": weight_bytes}
    batch(_prompts(1, tok)[:1])
    ttft, wall, n = batch(_prompts(1, tok, seed=7))
    res["single_tok_s"] = (n - 1) / max(1e-9, wall - ttft)
    res["agg"] = {}
    ttfts: list[float] = []
    for c in args.concurrency:
        if c > args.hf_max_concurrency:
            continue
        ttft, wall, n = batch(_prompts(c, tok, seed=c))
        res["agg"][str(c)] = n / wall
        res.setdefault("rss", {})[str(c)] = _peak_rss_mb()
        ttfts.extend([ttft] * c)
    res["ttft_p50"], res["ttft_p95"] = _pct(ttfts, 50), _pct(ttfts, 95)
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


# ---------------------------------------------------------------------------------------- vLLM


def _run_vllm(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's offline engine on the same GGUF (its GGUF loader). Concurrent requests are one
    ``generate`` call, which vLLM batches continuously; TTFT is not separable there."""
    from vllm import LLM, SamplingParams

    p = Path(args.model)
    llm = LLM(model=str(p), tokenizer=args.vllm_tokenizer or str(p), gpu_memory_utilization=0.5)
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def run(prompts: list[list[int]]) -> tuple[float, int]:
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": x} for x in prompts], params, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    run(_prompts(1, tok)[:1])
    wall, n = run(_prompts(1, tok, seed=7))
    res: dict[str, Any] = {"weight_bytes": p.stat().st_size, "single_tok_s": n / wall, "agg": {}}
    for c in args.concurrency:
        wall, n = run(_prompts(c, tok, seed=c))
        res["agg"][str(c)] = n / wall
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


# ------------------------------------------------------------------------------------- driver


def _worker(args: argparse.Namespace) -> None:
    fn = {"veil": _run_veil, "llamacpp": _run_llamacpp, "hf": _run_hf, "vllm": _run_vllm}[args.worker]
    t0 = time.process_time()
    res = fn(args)
    res["cpu_s"] = time.process_time() - t0
    print("RESULT " + json.dumps(res), flush=True)


def _spawn(system: str, args: argparse.Namespace) -> dict[str, Any] | str:
    python = args.vllm_python if system == "vllm" and args.vllm_python else sys.executable
    cmd = [
        python,
        __file__,
        "--worker",
        system,
        "--model",
        str(args.model),
        "--threads",
        str(args.threads),
    ]
    cmd += ["--new-tokens", str(args.new_tokens), "--hf-max-concurrency", str(args.hf_max_concurrency)]
    cmd += ["--concurrency", *map(str, args.concurrency)]
    if args.kv_mb:
        cmd += ["--kv-mb", str(args.kv_mb)]
    cmd += ["--device", args.device]
    if args.vllm_tokenizer:
        cmd += ["--vllm-tokenizer", args.vllm_tokenizer]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cores = sorted(os.sched_getaffinity(0))[: args.threads] if hasattr(os, "sched_getaffinity") else []
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=preexec, check=False)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res: dict[str, Any] = json.loads(line[7:])
            res["wall_s"] = time.perf_counter() - t0
            return res
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return f"failed (exit {p.returncode}): {' | '.join(tail)}"


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None or math.isnan(x) else format(x, spec)


def _report(results: dict[str, dict[str, Any] | str], args: argparse.Namespace) -> None:
    ok = {k: v for k, v in results.items() if isinstance(v, dict)}
    for k, v in results.items():
        if isinstance(v, str):
            print(f"{k}: {v}")
    cols = [s for s in SYSTEMS if s in ok]
    has_ratio = "veil" in ok and "llamacpp" in ok
    head = f"{'metric':34}" + "".join(f"{c:>12}" for c in cols) + ("  veil/llama.cpp" if has_ratio else "")
    print(head)
    print("-" * len(head))

    def row(name: str, get: Any, spec: str = ".1f", higher_better: bool = True) -> None:
        vals = {c: get(ok[c]) for c in cols}
        line = f"{name:34}" + "".join(f"{_fmt(vals[c], spec):>12}" for c in cols)
        if has_ratio and vals.get("veil") and vals.get("llamacpp"):
            line += f"  {vals['veil'] / vals['llamacpp']:.2f}×"
        print(line)

    row("single-stream decode tok/s", lambda r: r.get("single_tok_s"))
    row("  weight bandwidth GB/s", lambda r: r["single_tok_s"] * r["weight_bytes"] / 1e9, ".2f")
    for c in args.concurrency:
        row(f"aggregate tok/s, {c} concurrent", lambda r, c=c: r["agg"].get(str(c)))
    row("TTFT p50 s", lambda r: r.get("ttft_p50"), ".3f")
    row("TTFT p95 s", lambda r: r.get("ttft_p95"), ".3f")
    for c in args.concurrency:
        row(f"peak RSS MB up to {c} concurrent", lambda r, c=c: r.get("rss", {}).get(str(c)), ".0f")
    row("peak RSS MB (whole run)", lambda r: r.get("peak_rss_mb"), ".0f")
    row("process CPU s (whole run)", lambda r: r.get("cpu_s"), ".1f")
    if has_ratio and "16" in ok["veil"]["agg"]:
        seq = ok["llamacpp"]["agg"].get("1") or ok["llamacpp"]["single_tok_s"]
        print(
            f"\nVeil aggregate at 16 concurrent / llama.cpp sequential: {ok['veil']['agg']['16'] / seq:.2f}×"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={args.device} threads={args.threads} new_tokens={args.new_tokens} "
        f"load average (1 min) at the end: {load:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--hf-max-concurrency", type=int, default=16, help="skip HF above this (slow)")
    ap.add_argument("--kv-mb", type=int, default=0, help="Veil KV-cache budget (default: enough for all)")
    ap.add_argument("--only", choices=SYSTEMS, action="append")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, concurrency 1 and 4")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="cpu",
        help="where Veil (veil serve --device) and HF transformers run; llama.cpp always on the CPU",
    )
    ap.add_argument("--vllm-python", help="a Python with vLLM installed: adds vLLM to the systems")
    ap.add_argument("--vllm-tokenizer", help="tokenizer for vLLM (default: read from the GGUF)")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        from veil.enclave.model.loader import default_model_path

        args.model = default_model_path()
    if args.worker:
        _worker(args)
        return 0
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.new_tokens, args.concurrency = 32, [1, 4]
    systems = args.only or [*DEFAULT_SYSTEMS, *(["vllm"] if args.vllm_python else [])]
    results = {s: _spawn(s, args) for s in systems}
    _report(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
