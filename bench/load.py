"""Load generator: N concurrent streams for a bounded time, through the SDK and through ``veil proxy``.

Each of ``--concurrency`` workers sends streamed chat requests back to back until
``--duration`` seconds are up (a request running then is allowed to finish). Per mode it prints
throughput (requests/s and completion tokens/s), time to first token and latency percentiles,
and errors by type; with ``--mode both`` (the default) the SDK run is the peer the OpenAI-client
run is compared with, in the same process on the same targets: the ratios are the proxy's cost.

* ``sdk``: :class:`veil.client.AsyncClient` (a pool when several targets are given).
* ``openai``: the official ``openai`` package's ``AsyncOpenAI`` against ``veil proxy``
  (``--proxy-url``, or a proxy this script starts in front of the targets).

Without targets it starts ``veil serve --tee simulated`` on loopback (embedded model) and trusts
its simulation root. Run: ``python bench/load.py --concurrency 8 --duration 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle in detail.",
    "Tell me about the history of tea.",
]


@dataclass
class Results:
    started: float = 0.0
    elapsed: float = 0.0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return len(self.latency)


# one streamed request: returns (ttft seconds, completion tokens)
Request = Callable[[int], Awaitable[tuple[float, int]]]


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (variant {i})"}]


def sdk_request(client: object, max_tokens: int) -> Request:
    from veil.client import AsyncClient

    assert isinstance(client, AsyncClient)

    async def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        ttft = -1.0
        stream = await client.chat.completions.create(
            messages=_messages(i), max_tokens=max_tokens, temperature=0.7, seed=i, stream=True
        )
        async with stream:
            async for chunk in stream:
                if ttft < 0 and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - t0
        usage = stream.usage
        return ttft, usage.completion_tokens if usage else 0

    return one


def openai_request(client: object, model: str, max_tokens: int) -> Request:
    import openai

    assert isinstance(client, openai.AsyncOpenAI)

    async def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        ttft = -1.0
        tokens = 0
        stream = await client.chat.completions.create(
            model=model, messages=_messages(i), max_tokens=max_tokens, temperature=0.7, seed=i,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            if ttft < 0 and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return ttft, tokens

    return one


async def drive(request: Request, *, concurrency: int, duration: float, label: str) -> Results:
    """Run ``concurrency`` workers for ``duration`` seconds, drawing a progress bar on stderr."""
    results = Results(started=time.perf_counter())
    deadline = results.started + duration
    counter = iter(range(1 << 30))

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                ttft, tokens = await request(next(counter))
            except Exception as exc:
                results.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.05)  # a failing target is not hammered in a tight loop
                continue
            results.latency.append(time.perf_counter() - t0)
            if ttft >= 0:
                results.ttft.append(ttft)
            results.tokens += tokens

    async def progress() -> None:
        width = 30
        while True:
            done = min(1.0, (time.perf_counter() - results.started) / duration)
            bar = "#" * int(done * width) + "-" * (width - int(done * width))
            sys.stderr.write(
                f"\r{label:>6} [{bar}] {done * duration:5.1f}/{duration:.0f} s  requests {results.requests}  "
                f"errors {sum(results.errors.values())}"
            )
            sys.stderr.flush()
            await asyncio.sleep(0.5)

    bar = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        bar.cancel()
        sys.stderr.write("\n")
    results.elapsed = time.perf_counter() - results.started
    return results


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report(label: str, r: Results) -> dict[str, float]:
    """Print one mode's figures; returns the ones the comparison uses."""
    rps = r.requests / r.elapsed if r.elapsed else 0.0
    tps = r.tokens / r.elapsed if r.elapsed else 0.0
    print(
        f"{label:>6}: {r.requests} requests in {r.elapsed:.1f} s = {rps:.2f} req/s, "
        f"{tps:.1f} completion tokens/s"
    )
    print(
        f"{'':>6}  TTFT ms p50 {_pct(r.ttft, 0.5):.0f}  p90 {_pct(r.ttft, 0.9):.0f}"
        f"  p99 {_pct(r.ttft, 0.99):.0f}"
        f"  |  latency ms p50 {_pct(r.latency, 0.5):.0f}  p90 {_pct(r.latency, 0.9):.0f}"
        f"  p99 {_pct(r.latency, 0.99):.0f}"
    )
    errors = ", ".join(f"{k} {v}" for k, v in r.errors.most_common()) or "none"
    print(f"{'':>6}  errors: {errors}")
    return {"tps": tps, "ttft": statistics.median(r.ttft) if r.ttft else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("targets", nargs="*", help="enclave replicas host:port (default: start one locally)")
    parser.add_argument("--trust-simulated", metavar="PEM", help="simulation root to trust (with targets)")
    parser.add_argument("--policy", metavar="FILE", help="appraisal policy (TOML) for the targets")
    parser.add_argument("--mode", choices=["sdk", "openai", "both"], default="both")
    parser.add_argument(
        "--proxy-url", help="an already running veil proxy (openai mode), e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent streams (default 8)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per mode (default 20)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.max_tokens < 1:
        parser.error("--concurrency, --duration and --max-tokens must be positive")

    from veil.attestation.policy import Policy

    with ExitStack() as stack:
        targets = list(args.targets)
        trust = args.trust_simulated
        if not targets:
            from veil.enclave.local_server import LocalServer

            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="veil-load-")))
            print("starting veil serve --tee simulated on loopback ...", file=sys.stderr)
            server = stack.enter_context(LocalServer(base / "state", log_dir=base / "logs"))
            targets, trust = [server.address], str(server.root_pem)
        policy = (
            Policy.simulated(trust) if trust else Policy.from_file(args.policy) if args.policy else Policy()
        )
        proxy_url = args.proxy_url
        if args.mode != "sdk" and proxy_url is None:
            from veil.client.proxy.local import LocalProxy

            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="veil-load-proxy-")))
            trust_args = (
                ["--trust-simulated", trust] if trust else ["--policy", args.policy] if args.policy else []
            )
            proxy = stack.enter_context(LocalProxy(targets, log_dir=logs, args=trust_args))
            proxy_url = proxy.base_url
        print(
            f"load: {args.concurrency} concurrent streams, {args.duration:.0f} s per mode, "
            f"{args.max_tokens} tokens per answer, targets {', '.join(targets)}",
            flush=True,
        )
        figures = asyncio.run(_run(args, targets, policy, proxy_url))
    if "sdk" in figures and "openai" in figures:
        sdk, oai = figures["sdk"], figures["openai"]
        print(
            f" ratio: openai-via-proxy / sdk  throughput {oai['tps'] / sdk['tps']:.3f}x"
            f"  TTFT p50 {oai['ttft'] / sdk['ttft']:.3f}x"
            if sdk["tps"] and sdk["ttft"]
            else " ratio: not computable (the SDK run served nothing)"
        )
    return 0


async def _run(
    args: argparse.Namespace, targets: list[str], policy: object, proxy_url: str | None
) -> dict[str, dict[str, float]]:
    from veil.client import AsyncClient, Policy

    assert isinstance(policy, Policy)
    figures: dict[str, dict[str, float]] = {}
    if args.mode in ("sdk", "both"):
        async with AsyncClient(targets, policy=policy) as client:
            warm = sdk_request(client, args.max_tokens)
            await warm(0)  # attest and warm up outside the timed window
            results = await drive(warm, concurrency=args.concurrency, duration=args.duration, label="sdk")
        figures["sdk"] = report("sdk", results)
    if args.mode in ("openai", "both"):
        import openai

        async with openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="unused", max_retries=0) as oai:
            model = (await oai.models.list()).data[0].id
            one = openai_request(oai, model, args.max_tokens)
            await one(0)
            results = await drive(one, concurrency=args.concurrency, duration=args.duration, label="openai")
        figures["openai"] = report("openai", results)
    return figures


if __name__ == "__main__":
    sys.exit(main())
