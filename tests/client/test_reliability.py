"""Issue #12: both clients keep gRPC status names, retry evidence once, and fail typed.

Against the in-process fake enclave (both clients) and a tiny in-process gRPC server that
answers with chosen statuses (both real transports: ``grpc`` and ``grpc.aio``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from fake_enclave import FakeAsyncTransport, FakeEnclave, FakeTransport

from veil.client import (
    AsyncClient,
    AsyncGrpcTransport,
    Client,
    ClientClosedError,
    ConfigurationError,
    GrpcTransport,
    Policy,
    ServerError,
)
from veil.client._base import EVIDENCE_RETRY_MAX, evidence_backoff
from veil.proto.v1 import service_pb2

USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture
def enclave(state_dir: Path) -> FakeEnclave:
    return FakeEnclave(state_dir)


@pytest.fixture
def policy(enclave: FakeEnclave) -> Policy:
    return Policy.simulated(enclave.root_pem)


class Both:
    """Drive the sync or the async client through one synchronous surface."""

    def __init__(self, kind: str, enclave: FakeEnclave, policy: Policy) -> None:
        self.kind = kind
        self.slept: list[float] = []
        if kind == "sync":
            self.client: Any = Client(transport=FakeTransport(enclave), policy=policy)
            self.client._sleep = self.slept.append
        else:
            self.client = AsyncClient(transport=FakeAsyncTransport(enclave), policy=policy)

            async def sleep(seconds: float) -> None:
                self.slept.append(seconds)

            self.client._sleep = sleep
            self.loop = asyncio.new_event_loop()

    def run(self, value: Any) -> Any:
        return value if self.kind == "sync" else self.loop.run_until_complete(value)

    def attest(self) -> Any:
        return self.run(self.client.attest())

    def create(self, **kwargs: Any) -> Any:
        return self.run(self.client.chat.completions.create(**kwargs))

    def drain(self, stream: Any) -> list[Any]:
        if self.kind == "sync":
            return list(stream)

        async def collect() -> list[Any]:
            return [c async for c in stream]

        return self.run(collect())

    def close(self) -> None:
        self.run(self.client.close())

    def __enter__(self) -> Both:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "async":
            self.loop.close()


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


# --- the one evidence retry ----------------------------------------------------------------------


@KINDS
def test_evidence_overload_is_retried_once_after_the_hint(
    kind: str, enclave: FakeEnclave, policy: Policy
) -> None:
    enclave.evidence_errors = [ServerError("RESOURCE_EXHAUSTED", "evidence rate limit", retry_after=0.3)]
    with Both(kind, enclave, policy) as both:
        assert both.create(messages=USER).choices[0].message.content == "Hello, world."
        assert both.slept == [0.3]
        assert len(enclave.evidence_calls) == 2
        assert enclave.evidence_calls[0] != enclave.evidence_calls[1]  # a fresh nonce for the retry


@KINDS
def test_evidence_overload_twice_fails_with_its_status(
    kind: str, enclave: FakeEnclave, policy: Policy
) -> None:
    enclave.evidence_errors = [ServerError("RESOURCE_EXHAUSTED", "limit", retry_after=60.0) for _ in range(3)]
    with Both(kind, enclave, policy) as both:
        with pytest.raises(ServerError) as info:
            both.attest()
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert both.slept == [EVIDENCE_RETRY_MAX]  # the server's hint, bounded
        assert len(enclave.evidence_calls) == 2  # one retry, no more
        assert not enclave.requests


@KINDS
def test_other_statuses_are_not_retried(kind: str, enclave: FakeEnclave, policy: Policy) -> None:
    enclave.evidence_errors = [ServerError("UNAVAILABLE", "connection refused")]
    with Both(kind, enclave, policy) as both:
        with pytest.raises(ServerError) as info:
            both.create(messages=USER)
        assert info.value.code == "UNAVAILABLE"
        assert both.slept == [] and len(enclave.evidence_calls) == 1


def test_evidence_backoff_without_a_hint_is_short_and_jittered() -> None:
    assert evidence_backoff(ServerError("UNAVAILABLE", "x")) is None
    assert evidence_backoff(ServerError("RESOURCE_EXHAUSTED", "x", retry_after=0.0)) == 0.0
    delays = {evidence_backoff(ServerError("RESOURCE_EXHAUSTED", "x")) for _ in range(20)}
    assert all(d is not None and 0.25 <= d <= 0.75 for d in delays) and len(delays) > 1


# --- typed errors: closed clients, unencodable text ------------------------------------------------


@KINDS
def test_closed_client_ends_streams_and_refuses_requests(
    kind: str, enclave: FakeEnclave, policy: Policy
) -> None:
    with Both(kind, enclave, policy) as both:
        stream = both.create(messages=USER, stream=True)
        both.close()
        assert both.client.closed
        with pytest.raises(ClientClosedError):
            both.drain(stream)
        sent = len(enclave.requests)
        with pytest.raises(ClientClosedError):
            both.create(messages=USER)
        with pytest.raises(ClientClosedError):
            both.attest()
        assert len(enclave.requests) == sent and len(enclave.evidence_calls) == 1
    assert issubclass(ClientClosedError, ConfigurationError)


@KINDS
@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"messages": [*USER, {"role": "user", "content": "ok \ud800 then"}]}, r"messages\[1\]\.content"),
        ({"messages": USER, "stop": ["fine", "\udc00"]}, r"stop\[1\]"),
    ],
)
def test_lone_surrogate_is_a_configuration_error(
    kind: str, enclave: FakeEnclave, policy: Policy, kwargs: dict[str, Any], where: str
) -> None:
    with Both(kind, enclave, policy) as both:
        with pytest.raises(ConfigurationError, match=where) as info:
            both.create(**kwargs)
        assert "surrogate" in str(info.value) and "\\ud800" not in str(info.value)
        assert not enclave.requests


# --- the real transports against a tiny gRPC server ------------------------------------------------

STATUSES = ["DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "INTERNAL"]


class StatusServer:
    """GetEvidence answers ``status`` (``retry-after-ms: 1500``); Generate sends one message, waits."""

    def __init__(self) -> None:
        self.status = grpc.StatusCode.UNAVAILABLE
        self.release = threading.Event()
        self.server = grpc.server(ThreadPoolExecutor(4))
        handlers = {
            "GetEvidence": grpc.unary_unary_rpc_method_handler(self._evidence),
        }
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("veil.v1.AttestationService", handlers),
                grpc.method_handlers_generic_handler(
                    "veil.v1.InferenceService",
                    {"Generate": grpc.unary_stream_rpc_method_handler(self._generate)},
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _evidence(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("retry-after-ms", "1500"),))
        context.abort(self.status, f"refused with {self.status.name}")
        return b""  # pragma: no cover

    def _generate(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield service_pb2.EncryptedChunk(payload=b"header").SerializeToString()
        self.release.wait(10)

    def stop(self) -> None:
        self.release.set()
        self.server.stop(None)


@pytest.fixture(scope="module")
def status_server() -> Iterator[StatusServer]:
    srv = StatusServer()
    yield srv
    srv.stop()


@pytest.mark.parametrize("name", STATUSES)
def test_both_transports_keep_the_status_and_the_retry_hint(status_server: StatusServer, name: str) -> None:
    status_server.status = grpc.StatusCode[name]
    address = f"127.0.0.1:{status_server.port}"
    sync = GrpcTransport(address)
    with pytest.raises(ServerError) as sync_info:
        sync.get_evidence(bytes(32), 5)
    sync.close()

    async def main() -> ServerError:
        transport = AsyncGrpcTransport(address)
        try:
            with pytest.raises(ServerError) as info:
                await transport.get_evidence(bytes(32), 5)
        finally:
            await transport.close()
        return info.value

    async_error = asyncio.run(main())
    for error in (sync_info.value, async_error):
        assert error.code == name  # was "UNKNOWN" for every grpc.aio error
        assert error.message == f"refused with {name}"
        assert error.retry_after == 1.5


def test_closing_the_async_transport_mid_stream_is_typed(status_server: StatusServer) -> None:
    async def main() -> None:
        transport = AsyncGrpcTransport(f"127.0.0.1:{status_server.port}")
        payloads = aiter(transport.generate(service_pb2.EncryptedRequest(key_id=bytes(16)), 10))
        assert await anext(payloads) == b"header"
        await transport.close()
        with pytest.raises(ClientClosedError):  # was a bare asyncio.CancelledError
            await anext(payloads)
        with pytest.raises(ClientClosedError):
            await transport.get_evidence(bytes(32), 5)

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 5


def test_closing_the_sync_transport_mid_stream_is_typed(status_server: StatusServer) -> None:
    transport = GrpcTransport(f"127.0.0.1:{status_server.port}")
    payloads = iter(transport.generate(service_pb2.EncryptedRequest(key_id=bytes(16)), 10))
    assert next(payloads) == b"header"
    transport.close()
    with pytest.raises(ClientClosedError):
        next(payloads)
