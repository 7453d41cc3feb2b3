"""The confidentiality tax: Veil's full encrypted path vs the same engine in process.

Two figures, measured on this machine in one run:

1. **Aggregate tokens/s at N concurrent streams** (default 16): the same greedy requests
   (a) through ``veil serve --tee simulated`` on loopback — attested client, HPKE-sealed
   requests, secretstream-encrypted chunks, gRPC — and (b) driven directly on an
   in-process :class:`~veil.enclave.engine.AsyncEngine` with the same model and batch size.
   Rounds alternate (in-process, served, in-process, …) after a warm-up of each; the
   median of the per-round ratios counts. Target: served ≥ 0.97 × in-process. CPU time per
   token (client + server processes vs the in-process engine) is printed too: on a shared,
   busy machine wall-clock rounds are noisy, CPU time much less so.
2. **Bandwidth of response framing** (issue #12): one streamed and one non-streamed round
   through the recording relay; the bytes of ``Generate`` responses on the wire against the
   text they carry, per stream-second, and against what one padded chunk per token (the rule
   before framing) would have sent. Streamed answers leave as one 1 KiB frame per tick
   (``--frame-interval-ms``, the server's default unless given), so the figure follows time.
3. **Attestation handshake**: ``GetEvidence`` (simulated SEV-SNP report + 1 GPU report,
   fresh per nonce) plus full client verification (chains, signatures, binding, policy),
   as ``Client.attest()`` does it. Target: p50 ≤ 50 ms.

Run: ``python bench/channel.py`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle in detail.",
    "List some facts about the Moon.",
    "Tell me about the history of tea.",
    "How do airplanes stay in the air?",
    "Write a poem about autumn leaves.",
    "What makes a good cup of coffee?",
]


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (variant {i})"}]


async def _in_process_round(engine: object, streams: int, max_tokens: int) -> tuple[int, float]:
    from veil.enclave.engine.async_engine import AsyncEngine, EngineRequest, SamplingParams

    assert isinstance(engine, AsyncEngine)

    async def one(i: int) -> int:
        request = EngineRequest(
            request_id=uuid.uuid4().hex,
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
            messages=_messages(i),
        )
        tokens = 0
        async for delta in engine.generate(request):
            if delta.finish_reason is not None:
                tokens = delta.completion_tokens
        return tokens

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts), time.perf_counter() - t0


async def _served_round(
    client: object, streams: int, max_tokens: int, text: list[str] | None = None, *, stream: bool = True
) -> tuple[int, float]:
    from veil.client import AsyncClient

    assert isinstance(client, AsyncClient)

    async def one(i: int) -> int:
        if not stream:
            reply = await client.chat.completions.create(
                messages=_messages(i), max_tokens=max_tokens, temperature=0.0
            )
            if text is not None:
                text.append(reply.choices[0].message.content or "")
            return reply.usage.completion_tokens if reply.usage else 0
        answer = await client.chat.completions.create(
            messages=_messages(i), max_tokens=max_tokens, temperature=0.0, stream=True
        )
        async for chunk in answer:
            if text is not None:
                text.append(chunk.choices[0].delta.content or "")
        return answer.usage.completion_tokens if answer.usage else 0

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts), time.perf_counter() - t0


async def _bandwidth(address: str, root: Path, streams: int, max_tokens: int) -> list[str]:
    """Framing overhead: bytes of Generate responses on the wire vs the text they carry."""
    from veil.attestation.channel.padding import chunk_bucket
    from veil.client import AsyncClient, Policy
    from veil.demo.relay import Relay

    host, port = address.rsplit(":", 1)
    lines = []
    for stream in (True, False):
        relay = Relay((host, int(port))).start()
        try:
            client = AsyncClient(relay.address, policy=Policy.simulated(root), timeout=600)
            await client.attest()
            relay.clear()
            text: list[str] = []
            tokens, seconds = await _served_round(client, streams, max_tokens, text, stream=stream)
            await client.close()
            sizes = [len(m.data) + 5 for m in relay.messages if m.direction == "s2c" and "Generate" in m.path]
        finally:
            relay.close()
        wire, plain = sum(sizes), len("".join(text).encode())
        # before framing: the header, then one chunk per token (~4 bytes of text, padded to 128)
        per_token = streams * (24 + 2 + 5) + tokens * (chunk_bucket(12) + 17 + 3 + 5)
        lines.append(
            f"framing {'streamed    ' if stream else 'non-streamed'} {len(sizes)} messages, {wire} B on the "
            f"wire for {plain} B of text ({tokens} tok): {wire / max(plain, 1):.1f}x the text, "
            f"{wire / seconds / streams / 1024:.1f} KiB/s per stream; one chunk per token: ~{per_token} B"
        )
    return lines


def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (or of ``pid``, from /proc)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _handshakes(address: str, root: Path, n: int) -> tuple[list[float], list[float]]:
    """(total ms, verification-only ms) per handshake."""
    from veil.client import Client, GrpcTransport, Policy
    from veil.client._core import ClientCore

    policy = Policy.simulated(root)
    totals, verify = [], []
    transport = GrpcTransport(address)
    core = ClientCore(policy, clock=lambda: datetime.now(UTC), random_bytes=secrets.token_bytes)
    client = Client(transport=transport, policy=policy)
    client.attest()  # warm the channel and the caches
    for _ in range(n):
        t0 = time.perf_counter()
        client.attest()
        totals.append((time.perf_counter() - t0) * 1000)
        nonce = core.new_nonce()
        evidence = transport.get_evidence(nonce, 10)
        t1 = time.perf_counter()
        core.accept(evidence, nonce)
        verify.append((time.perf_counter() - t1) * 1000)
    client.close()
    return totals, verify


async def main(args: argparse.Namespace) -> int:
    import logging

    from veil.client import AsyncClient, Policy
    from veil.enclave.engine.async_engine import AsyncEngine
    from veil.enclave.local_server import LocalServer

    logging.getLogger("veil.attestation.policy").setLevel(logging.ERROR)  # the simulated-root warning
    interval = f"{args.frame_interval_ms:g} ms" if args.frame_interval_ms else "the server default"
    print(
        f"bench/channel.py: {args.streams} concurrent streams x {args.max_tokens} tokens, greedy; "
        f"streamed frames every {interval}"
    )
    cadence = ["--frame-interval-ms", str(args.frame_interval_ms)] if args.frame_interval_ms else []
    engine = AsyncEngine.from_model(max_batch=args.max_batch)
    await engine.start()
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        server = LocalServer(
            Path(tmp) / "state",
            log_dir=Path(tmp) / "logs",
            extra_args=[
                "--max-batch",
                str(args.max_batch),
                "--evidence-rate",
                "10000",
                "--peer-evidence-rate",
                "10000",
                "--peer-generate-rate",
                "10000",
                "--peer-generate-burst",
                "10000",
                *cadence,
            ],
        )
        server.start()
        try:
            client = AsyncClient(server.address, policy=Policy.simulated(server.root_pem), timeout=600)
            await client.attest()
            # warm-up both paths
            await _in_process_round(engine, args.streams, 8)
            await _served_round(client, args.streams, 8)
            pid = server.process.pid if server.process else None
            local, served, ratios, cpu_local, cpu_served, cpu_client = [], [], [], [], [], []
            for r in range(args.rounds):
                c0 = _cpu_seconds()
                tok, dt = await _in_process_round(engine, args.streams, args.max_tokens)
                c1, s1 = _cpu_seconds(), _cpu_seconds(pid)
                tok2, dt2 = await _served_round(client, args.streams, args.max_tokens)
                c2, s2 = _cpu_seconds(), _cpu_seconds(pid)
                local.append(tok / dt)
                served.append(tok2 / dt2)
                ratios.append((tok2 / dt2) / (tok / dt))
                cpu_local.append((c1 - c0) / tok * 1000)
                cpu_served.append(((c2 - c1) + (s2 - s1)) / tok2 * 1000)
                cpu_client.append((c2 - c1) / tok2 * 1000)
                print(
                    f"  round {r + 1}: in-process {tok} tok in {dt:.2f} s = {tok / dt:7.1f} tok/s | "
                    f"encrypted gRPC {tok2} tok in {dt2:.2f} s = {tok2 / dt2:7.1f} tok/s | "
                    f"ratio {ratios[-1]:.3f} | CPU ms/token {cpu_local[-1]:.2f} vs {cpu_served[-1]:.2f}"
                )
            await client.close()
            await engine.stop(1.0)
            bandwidth = await _bandwidth(server.address, server.root_pem, args.streams, args.max_tokens)
            totals, verify = await asyncio.to_thread(
                _handshakes, server.address, server.root_pem, args.handshakes
            )
        finally:
            server.stop()
    lm, sm = statistics.median(local), statistics.median(served)
    ratio = statistics.median(ratios)
    q = statistics.quantiles(totals, n=10)
    print(
        f"aggregate tok/s  in-process {lm:.1f}  encrypted gRPC {sm:.1f}  "
        f"median paired ratio {ratio:.3f} (target >= 0.97)"
    )
    cl, cs = statistics.median(cpu_local), statistics.median(cpu_served)
    print(
        f"CPU per token    in-process {cl:.2f} ms  encrypted gRPC {cs:.2f} ms (client + server)  "
        f"ratio {cl / cs:.3f}; client share {statistics.median(cpu_client):.2f} ms"
    )
    for line in bandwidth:
        print(line)
    print(
        f"handshake        p50 {statistics.median(totals):.1f} ms  p90 {q[-1]:.1f} ms  "
        f"(verification alone p50 {statistics.median(verify):.1f} ms; target p50 <= 50 ms)"
    )
    ok = ratio >= 0.97 and statistics.median(totals) <= 50
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--handshakes", type=int, default=50)
    parser.add_argument("--frame-interval-ms", type=float, default=None, help="veil serve's cadence")
    sys.exit(asyncio.run(main(parser.parse_args())))
