"""End to end over loopback: the real ``veil serve --tee simulated`` with the embedded model.

Traffic goes through ``tests/relay.py``, which plays the untrusted host: it records
every byte and, in the attack tests, tampers with gRPC messages.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import pytest

from veil.client import (
    AsyncClient,
    AttestationError,
    ChannelError,
    Client,
    Policy,
)
from veil.demo.relay import Relay
from veil.enclave.keys import create_identity
from veil.enclave.local_server import LocalServer
from veil.proto.v1 import evidence_pb2, service_pb2

pytestmark = pytest.mark.slow

GET_EVIDENCE = "/veil.v1.AttestationService/GetEvidence"
GENERATE = "/veil.v1.InferenceService/Generate"
QUESTION = [{"role": "user", "content": "Name three colours."}]
TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    base = tmp_path_factory.mktemp("e2e")
    with LocalServer(base / "state", log_dir=base / "logs", extra_args=["--metrics-period", "1"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def policy(server: LocalServer) -> Policy:
    return Policy.simulated(server.root_pem)


@pytest.fixture
def relay(server: LocalServer) -> Iterator[Relay]:
    with Relay((server.host, server.port)) as r:
        yield r
    assert not r.errors, r.errors


class PassThrough:
    def on_message(self, path: str, index: int, data: bytes) -> list[bytes]:
        return [data]

    def on_end(self, path: str) -> list[bytes]:
        return []


class TamperChunk(PassThrough):
    """Flip one bit in the ``index``-th message of every Generate stream."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_message(self, path: str, index: int, data: bytes) -> list[bytes]:
        if path == GENERATE and index == self.index:
            data = data[:-1] + bytes([data[-1] ^ 0x01])
        return [data]


class DropFinal(PassThrough):
    """Hold back each Generate message until the next one arrives; drop the last (FINAL) one."""

    def __init__(self) -> None:
        self.held: bytes | None = None
        self.dropped = 0

    def on_message(self, path: str, index: int, data: bytes) -> list[bytes]:
        if path != GENERATE:
            return [data]
        out = [] if self.held is None else [self.held]
        self.held = data
        return out

    def on_end(self, path: str) -> list[bytes]:
        if path == GENERATE and self.held is not None:
            self.held = None
            self.dropped += 1
        return []


class SwapKey(PassThrough):
    """Replace the enclave key in Evidence (and, optionally, the claims) with an attacker's."""

    def __init__(self, with_claims: bool) -> None:
        self.with_claims = with_claims
        self.attacker = create_identity(
            model_digest=bytes(32),
            engine_version="attacker",
            data_policy_digest=bytes(32),
            server_build_digest=bytes(32),
            simulated=True,
        )

    def on_message(self, path: str, index: int, data: bytes) -> list[bytes]:
        if path != GET_EVIDENCE:
            return [data]
        ev = evidence_pb2.Evidence.FromString(data)
        ev.enclave_key.CopyFrom(self.attacker.public_key.to_proto())
        if self.with_claims:
            claims = self.attacker.claims.__class__.from_bytes(ev.claims)
            forged = claims.__class__(
                **{**{f: getattr(claims, f) for f in claims.__dataclass_fields__},
                   "enclave_public_key": self.attacker.public_key.to_bytes()}
            )  # fmt: skip
            ev.claims = forged.canonical_bytes()
        out = ev.SerializeToString()
        assert len(out) == len(data)  # same size, so HTTP/2 flow control is undisturbed
        return [out]


class Replay(PassThrough):
    """Answer every GetEvidence with the first evidence seen (for an old nonce)."""

    def __init__(self) -> None:
        self.first: bytes | None = None

    def on_message(self, path: str, index: int, data: bytes) -> list[bytes]:
        if path != GET_EVIDENCE:
            return [data]
        if self.first is None:
            self.first = data
            return [data]
        assert len(self.first) == len(data)
        return [self.first]


def _ask(client: Client, **kwargs: object) -> str:
    reply = client.chat.completions.create(messages=QUESTION, max_tokens=TOKENS, temperature=0.0, **kwargs)  # type: ignore[arg-type]
    return reply.choices[0].message.content


def test_chat_non_streaming_and_streaming(relay: Relay, policy: Policy) -> None:
    with Client(relay.address, policy=policy) as client:
        reply = client.chat.completions.create(messages=QUESTION, max_tokens=TOKENS, temperature=0.0)
        text = reply.choices[0].message.content
        assert text.strip()
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= TOKENS
        assert reply.usage.prompt_tokens > 3
        verdict = client.attestation
        assert verdict is not None and verdict.ok
        assert verdict.get("binding.report_data").status.value == "pass"  # type: ignore[union-attr]
        stream = client.chat.completions.create(
            messages=QUESTION, max_tokens=TOKENS, temperature=0.0, stream=True
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text  # greedy: same answer
        assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
        assert stream.usage is not None
        assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (
            reply.usage.prompt_tokens,
            reply.usage.completion_tokens,
        )
        # one client instance is one tenant: the second ask reuses the first's cached prompt blocks
        assert stream.usage.cached_tokens > 0
    paths = [m.path for m in relay.messages if m.direction == "c2s"]
    assert paths.count(GET_EVIDENCE) == 1 and paths.count(GENERATE) == 2
    # what the host saw: no plaintext of the question or the answer
    wire = relay.all_bytes() + relay.header_text().encode()
    assert b"three colours" not in wire
    for piece in {text[i : i + 10] for i in range(0, max(1, len(text) - 9), 3)}:
        if len(piece.strip()) >= 8:
            assert piece.encode() not in wire


def test_sixteen_concurrent_clients(relay: Relay, policy: Policy) -> None:
    def one(i: int) -> str:
        with Client(relay.address, policy=policy) as client:
            return (
                client.chat.completions.create(
                    messages=[{"role": "user", "content": f"Count to {i + 2}."}], max_tokens=TOKENS, seed=i
                )
                .choices[0]
                .message.content
            )

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert len(answers) == 16 and all(a.strip() for a in answers)
    assert sum(m.path == GET_EVIDENCE for m in relay.messages if m.direction == "c2s") == 16


def test_async_clients_share_one_attestation(relay: Relay, policy: Policy) -> None:
    async def main() -> list[str]:
        async with AsyncClient(relay.address, policy=policy) as client:
            replies = await asyncio.gather(
                *(client.chat.completions.create(messages=QUESTION, max_tokens=4, seed=i) for i in range(4))
            )
            return [r.choices[0].message.content for r in replies]

    answers = asyncio.run(main())
    assert len(answers) == 4
    assert sum(m.path == GET_EVIDENCE for m in relay.messages if m.direction == "c2s") == 1


def test_tampered_chunk_is_channel_error(relay: Relay, policy: Policy) -> None:
    # issue #12: a non-streamed answer is the header and ONE frame; tamper with that frame
    relay.rewriter = TamperChunk(index=1)
    with Client(relay.address, policy=policy) as client, pytest.raises(ChannelError, match="authentication"):
        _ask(client)


def test_dropped_final_is_channel_error(relay: Relay, policy: Policy) -> None:
    rewriter = DropFinal()
    relay.rewriter = rewriter
    with Client(relay.address, policy=policy) as client:
        with pytest.raises(ChannelError, match="FINAL"):
            _ask(client)
        stream = client.chat.completions.create(messages=QUESTION, max_tokens=TOKENS, stream=True)
        received = []
        with pytest.raises(ChannelError):
            for chunk in stream:
                received.append(chunk)
    assert rewriter.dropped == 2
    # whatever text arrived before the dropped FINAL (the shared cadence may pack all of a short
    # answer into the last frame), no chunk ever claimed the answer had finished
    assert all(c.choices[0].finish_reason is None for c in received)


@pytest.mark.parametrize(
    ("with_claims", "check"), [(False, "binding.enclave_key"), (True, "binding.report_data")]
)
def test_swapped_enclave_key_is_rejected(relay: Relay, policy: Policy, with_claims: bool, check: str) -> None:
    relay.rewriter = SwapKey(with_claims)
    with Client(relay.address, policy=policy) as client, pytest.raises(AttestationError) as info:
        _ask(client)
    assert check in info.value.failed_checks
    assert not any(m.path == GENERATE for m in relay.messages)  # nothing was sent to the forged key


def test_replayed_evidence_is_rejected(relay: Relay, policy: Policy) -> None:
    relay.rewriter = Replay()
    with Client(relay.address, policy=policy) as first:
        first.attest()
    with Client(relay.address, policy=policy) as second, pytest.raises(AttestationError) as info:
        second.attest()
    assert {"binding.nonce", "binding.report_data"} <= set(info.value.failed_checks)


def test_default_policy_rejects_simulated_evidence(relay: Relay) -> None:
    with Client(relay.address) as client, pytest.raises(AttestationError) as info:
        _ask(client)
    assert {"policy.simulated", "policy.platform"} <= set(info.value.failed_checks)
    assert not any(m.path == GENERATE for m in relay.messages)


def _veil(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "veil", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_cli_chat(server: LocalServer) -> None:
    sim = ("--trust-simulated", str(server.root_pem), "--max-tokens", "6")
    ok = _veil("chat", server.address, "Say hi.", *sim, "--temperature", "0")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()
    assert "attested SIMULATED_SEV_SNP enclave" in ok.stderr and "SIMULATED TEE" in ok.stderr

    js = _veil("chat", server.address, "Say hi.", *sim, "--json", "--seed", "1", "--top-p", "0.9")
    assert js.returncode == 0, js.stderr
    import json

    doc = json.loads(js.stdout)
    assert doc["attestation"]["ok"] is True and doc["choices"][0]["message"]["content"]

    bad = _veil("chat", server.address, "Say hi.")  # default policy: hardware only
    assert bad.returncode == 3
    assert bad.stderr.startswith("veil chat: attestation failed:")
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    down = _veil("chat", "127.0.0.1:1", "hi", "--trust-simulated", str(server.root_pem), "--timeout", "2")
    assert down.returncode == 5 and "UNAVAILABLE" in down.stderr and "Traceback" not in down.stderr

    policy_file = server.log_dir / "policy.toml"
    sim_policy = (
        f'platforms = ["SIMULATED_SEV_SNP"]\ngpu_count = 1\n[roots]\nsimulation = "{server.root_pem}"\n'
    )
    policy_file.write_text(sim_policy)
    # Issue #11: a policy file that pins no code identity is refused (was: accepted) ...
    unpinned = _veil("chat", server.address, "Say hi.", "--policy", str(policy_file), "--max-tokens", "4")
    assert unpinned.returncode == 3 and "policy.measurement" in unpinned.stderr
    # ... and accepted with the loud opt-out (pinning the simulator: --trust-simulated, above).
    policy_file.write_text("allow_any_measurement = true\n" + sim_policy)
    from_file = _veil("chat", server.address, "Say hi.", "--policy", str(policy_file), "--max-tokens", "4")
    assert from_file.returncode == 0, from_file.stderr
    policy_file.write_text("gpu_count = 2\n")  # hardware only, and 2 GPUs: refused
    refused = _veil("chat", server.address, "Say hi.", "--policy", str(policy_file), "--max-tokens", "4")
    assert refused.returncode == 3 and "policy.gpu_count" in refused.stderr

    missing = _veil("chat", server.address, "hi", "--trust-simulated", "/nonexistent.pem")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_unknown_key_is_failed_precondition(server: LocalServer) -> None:
    """A request for a key this enclave does not hold: FAILED_PRECONDITION (the client's re-attest signal)."""
    import grpc

    with grpc.insecure_channel(server.address) as channel:
        generate = channel.unary_stream(
            GENERATE,
            request_serializer=service_pb2.EncryptedRequest.SerializeToString,
            response_deserializer=service_pb2.EncryptedChunk.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(generate(service_pb2.EncryptedRequest(key_id=bytes(16), ciphertext=b"x" * 64), timeout=10))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]


def _metrics(server: LocalServer) -> service_pb2.Metrics:
    import grpc

    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            "/veil.v1.MetricsService/GetMetrics",
            request_serializer=service_pb2.GetMetricsRequest.SerializeToString,
            response_deserializer=service_pb2.Metrics.FromString,
        )
        return call(service_pb2.GetMetricsRequest(), timeout=10)  # type: ignore[no-any-return]


def test_closing_a_stream_cancels_it_and_frees_kv_blocks(
    server: LocalServer, relay: Relay, policy: Policy
) -> None:
    import time

    before = _metrics(server)
    with Client(relay.address, policy=policy) as client:
        stream = client.chat.completions.create(
            messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
            max_tokens=400,
            stream=True,
        )
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()  # the client walks away mid-answer
    # Issue #12: the server no longer publishes KV occupancy or token totals (before and after one
    # request they gave its length away), so this checks what the host may see: the call was
    # cancelled and nothing is in flight. That the engine frees the blocks and stops decoding is
    # asserted in-process (tests/enclave/test_engine.py::test_cancel_frees_blocks,
    # ::test_closing_or_dropping_the_stream_cancels_the_request).
    deadline = time.monotonic() + 30
    while True:
        after = _metrics(server)  # a snapshot at most --metrics-period (1 s here) old
        if after.requests_active == 0 and after.requests_cancelled == before.requests_cancelled + 1:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.2)
    assert after.requests_completed == before.requests_completed


def test_server_restart_mid_session(server: LocalServer, relay: Relay, policy: Policy) -> None:
    """The enclave restarts (new key): the client's next request gets 'stale key', it re-attests once.

    Runs last in this module: it restarts the module's server.
    """
    client = Client(relay.address, policy=policy)
    try:
        _ask(client)
        old_key = client.claims.enclave_public_key if client.claims else b""
        server.stop()
        server.start()  # same state dir: same simulation root, fresh enclave key, new port
        relay.retarget((server.host, server.port))
        assert _ask(client).strip()
        assert client.claims is not None and client.claims.enclave_public_key != old_key
    finally:
        client.close()
    generates = [m for m in relay.messages if m.direction == "c2s" and m.path == GENERATE]
    assert len(generates) == 3  # before the restart, the stale attempt, the retry
    assert sum(m.path == GET_EVIDENCE for m in relay.messages if m.direction == "c2s") == 2
    stale = [h for d, _, h in relay.headers if d == "s2c" and ("grpc-status", "9") in h]
    assert stale, "the server answered FAILED_PRECONDITION to the stale key"


def test_restart_under_another_data_policy_is_refused(
    server: LocalServer, relay: Relay, policy: Policy, tmp_path: Path
) -> None:
    """The enclave comes back with another data-handling policy: the re-attestation is refused.

    The policy here leaves the data-policy digest unpinned (the loud explorer's opt-out; the
    release manifest would refuse the switch on its own), so only key pinning refuses it.
    Runs after ``test_server_restart_mid_session``: it restarts the module's server (and puts it back).
    """
    changed = tmp_path / "data_policy.toml"
    default = resources.files("veil.enclave").joinpath("data_policy.toml").read_bytes()
    changed.write_bytes(default + b"\n# another release\n")
    unpinned = policy.replace(data_policy_digest=None, allow_any_measurement=True)
    client = Client(relay.address, policy=unpinned)
    extra = list(server.extra_args)
    try:
        _ask(client)
        pinned = client.identity
        server.stop()
        server.extra_args = [*extra, "--data-policy", str(changed)]
        server.start()
        relay.retarget((server.host, server.port))
        with pytest.raises(AttestationError) as info:
            _ask(client)
        assert info.value.failed_checks == ("pin.data_policy_digest",)
        assert client.identity == pinned
    finally:
        client.close()
        server.stop()
        server.extra_args = extra
        server.start()
        relay.retarget((server.host, server.port))
    generates = [m for m in relay.messages if m.direction == "c2s" and m.path == GENERATE]
    assert len(generates) == 2  # the first request, the stale attempt; nothing to the new key
