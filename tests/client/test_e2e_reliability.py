"""Issue #12, end to end: both clients against the real ``veil serve --tee simulated`` on loopback.

The same scenarios for ``Client`` and ``AsyncClient``: a server SIGKILLed and restarted
(the next call succeeds after one transparent re-attestation), a deadline, the evidence
rate limit (one retry, then the status by name), and a client closed mid-stream. Traffic
goes through the recording relay (``veil.demo.relay``), which plays the untrusted host.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from veil.client import AsyncClient, Client, ClientClosedError, Policy, ServerError
from veil.demo.relay import Relay
from veil.enclave.local_server import LocalServer

pytestmark = pytest.mark.slow

GET_EVIDENCE = "/veil.v1.AttestationService/GetEvidence"
GENERATE = "/veil.v1.InferenceService/Generate"
QUESTION = [{"role": "user", "content": "Name three colours."}]
ESSAY = [{"role": "user", "content": "Write a very long essay about the sea."}]
KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    base = tmp_path_factory.mktemp("e2e-reliability")
    with LocalServer(base / "state", log_dir=base / "logs") as srv:
        yield srv


@pytest.fixture(scope="module")
def policy(server: LocalServer) -> Policy:
    return Policy.simulated(server.root_pem)


@pytest.fixture
def relay(server: LocalServer) -> Iterator[Relay]:
    with Relay((server.host, server.port)) as r:
        yield r
    assert not r.errors, r.errors


class Sdk:
    """One ``Client`` or ``AsyncClient`` (on its own event loop) behind one synchronous surface."""

    def __init__(self, kind: str, address: str, policy: Policy) -> None:
        self.kind = kind
        if kind == "sync":
            self.client: Any = Client(address, policy=policy)
        else:
            self.loop = asyncio.new_event_loop()

            async def make() -> AsyncClient:  # grpc.aio channels belong to the loop they are made on
                return AsyncClient(address, policy=policy)

            self.client = self.loop.run_until_complete(make())

    def run(self, value: Any) -> Any:
        return value if self.kind == "sync" else self.loop.run_until_complete(value)

    def ask(self, messages: list[dict[str, str]] = QUESTION, max_tokens: int = 8) -> str:
        create = self.client.chat.completions.create
        reply = self.run(create(messages=messages, max_tokens=max_tokens, temperature=0.0))
        return str(reply.choices[0].message.content)

    def attest(self) -> Any:
        return self.run(self.client.attest())

    def stream(self, messages: list[dict[str, str]], max_tokens: int) -> Any:
        return self.run(
            self.client.chat.completions.create(messages=messages, max_tokens=max_tokens, stream=True)
        )

    def chunks(self, stream: Any) -> Any:
        """One iterator over ``stream``, to read from in several steps."""
        return iter(stream) if self.kind == "sync" else aiter(stream)

    def read(self, chunks: Any, count: int) -> list[Any]:
        """Read ``count`` chunks from ``chunks`` (all that are left with ``count < 0``)."""
        if self.kind == "sync":
            return list(chunks) if count < 0 else [next(chunks) for _ in range(count)]

        async def collect() -> list[Any]:
            out = []
            while count < 0 or len(out) < count:
                try:
                    out.append(await anext(chunks))
                except StopAsyncIteration:
                    break
            return out

        return self.run(collect())

    def close(self) -> None:
        self.run(self.client.close())
        if self.kind == "async":
            self.loop.close()


def _sent(relay: Relay, path: str) -> int:
    return sum(m.path == path for m in relay.messages if m.direction == "c2s")


@KINDS
def test_deadline_is_deadline_exceeded(kind: str, relay: Relay, policy: Policy) -> None:
    sdk = Sdk(kind, relay.address, policy)
    try:
        sdk.attest()
        sdk.client.timeout = 0.5
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            sdk.ask(ESSAY, max_tokens=400)
        assert info.value.code == "DEADLINE_EXCEEDED"  # the async client said UNKNOWN
        assert time.monotonic() - started < 5
    finally:
        sdk.close()


@KINDS
def test_closing_the_client_mid_stream_is_typed(kind: str, relay: Relay, policy: Policy) -> None:
    sdk = Sdk(kind, relay.address, policy)
    chunks = sdk.chunks(sdk.stream(ESSAY, max_tokens=400))
    assert sdk.read(chunks, 2)
    sdk.run(sdk.client.close())
    with pytest.raises(ClientClosedError):  # the async client raised a bare CancelledError
        sdk.read(chunks, -1)
    with pytest.raises(ClientClosedError):
        sdk.ask()
    if kind == "async":
        sdk.loop.close()


@KINDS
def test_sigkill_and_restart_reattests_once(
    kind: str, server: LocalServer, relay: Relay, policy: Policy
) -> None:
    """The enclave dies hard (SIGKILL) and comes back with a new key: the next call just works."""
    sdk = Sdk(kind, relay.address, policy)
    try:
        assert sdk.ask().strip()
        old_key = sdk.client.claims.enclave_public_key
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        server.start()  # same state dir: same simulation root, a fresh enclave key, a new port
        relay.retarget((server.host, server.port))
        assert sdk.ask().strip()
        assert sdk.client.claims.enclave_public_key != old_key
    finally:
        sdk.close()
    assert _sent(relay, GENERATE) == 3  # before the kill, the stale attempt, the retry
    assert _sent(relay, GET_EVIDENCE) == 2  # one transparent re-attestation
    assert [h for d, _, h in relay.headers if d == "s2c" and ("grpc-status", "9") in h]  # FAILED_PRECONDITION


def test_evidence_rate_limit_one_retry_then_its_status(tmp_path: Path) -> None:
    """Both clients retry a rate-limited ``GetEvidence`` once, then fail with RESOURCE_EXHAUSTED by name."""
    slow = ["--evidence-rate", "0.05"]  # a burst of one, then one every 20 s
    with (
        LocalServer(tmp_path / "state", log_dir=tmp_path / "logs", extra_args=slow) as srv,
        Relay((srv.host, srv.port)) as relay,
    ):
        policy = Policy.simulated(srv.root_pem)
        first = Sdk("sync", relay.address, policy)
        first.attest()  # takes the only token
        first.close()
        for kind in ("sync", "async"):
            before = _sent(relay, GET_EVIDENCE)
            sdk = Sdk(kind, relay.address, policy)
            started = time.monotonic()
            try:
                with pytest.raises(ServerError) as info:
                    sdk.ask()
            finally:
                sdk.close()
            assert info.value.code == "RESOURCE_EXHAUSTED", kind
            assert _sent(relay, GET_EVIDENCE) - before == 2, kind  # one retry, no more
            assert time.monotonic() - started < 10
            assert _sent(relay, GENERATE) == 0
        assert not relay.errors, relay.errors
