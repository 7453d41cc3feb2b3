"""The server holds under abuse (issue #12, item 5): half-open streams, a peer looping
``GetEvidence`` or ``Generate``, malformed and oversized requests.

A real server on loopback with the real model. The abusive client speaks raw HTTP/2 (``h2``) from
127.0.0.2, so it can do what no gRPC client does (open 320 streams and never send a request) and
is a different peer from the well-behaved gRPC client on 127.0.0.1.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import Harness

from veil.attestation.channel.hpke import seal_request
from veil.attestation.channel.stream import StreamDecryptor
from veil.enclave.servicers import EVIDENCE_RATE_LIMITED_MESSAGE, GENERATE_RATE_LIMITED_MESSAGE
from veil.enclave.transport import (
    MALFORMED_REQUEST_MESSAGE,
    PEER_BUSY_MESSAGE,
    REQUEST_TIMEOUT_MESSAGE,
    REQUEST_TOO_LARGE_MESSAGE,
    RETRY_AFTER_KEY,
    UNKNOWN_METHOD_MESSAGE,
)
from veil.proto.v1 import generate_pb2, service_pb2, service_pb2_grpc

T = TypeVar("T")
ABUSER = "127.0.0.2"  # all of 127.0.0.0/8 is loopback; the server sees a different peer
EVIDENCE = "/veil.v1.AttestationService/GetEvidence"
GENERATE = "/veil.v1.InferenceService/Generate"
HEALTH = "/grpc.health.v1.Health/Check"
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 3, 4, 8


@pytest.fixture(scope="module")
def harness(loaded_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(loaded_model, tmp_path_factory.mktemp("state"), kv_cache_mb=32, max_batch=4)
    yield h
    h.close()


@dataclass
class Stream:
    """What came back on one raw HTTP/2 stream."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    reset: int | None = None
    ended: bool = False

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    @property
    def status(self) -> int | None:
        return int(self.headers["grpc-status"]) if "grpc-status" in self.headers else None

    @property
    def message(self) -> str:
        return unquote(self.headers.get("grpc-message", ""))


class RawH2:
    """A gRPC caller in raw HTTP/2 over one TCP connection from ``source``."""

    def __init__(self, port: int, source: str = ABUSER) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        self.streams: dict[int, Stream] = {}
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def open(self, path: str, message: bytes | None = None, *, end: bool = True, flush: bool = True) -> int:
        """Start a call; ``message=None`` sends headers only (``end=False``: a half-open call)."""
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self.conn.send_headers(sid, headers, end_stream=message is None and end)
        if message is not None:
            self.conn.send_data(sid, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=end)
        self.streams[sid] = Stream()
        if flush:
            self.flush()
        return sid

    def call(self, path: str, message: bytes, timeout: float = 10) -> Stream:
        sid = self.open(path, message)
        self.pump(lambda: self.streams[sid].done, timeout)
        return self.streams[sid]

    def pump(self, until: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                raw = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not raw:
                break
            for event in self.conn.receive_data(raw):
                self._on(event)
            self.flush()

    def _on(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = self.streams.get(sid) if sid is not None else None
        if stream is None:
            return
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            stream.headers.update({str(k): str(v) for k, v in event.headers or []})
        elif isinstance(event, h2.events.DataReceived):
            stream.data += event.data or b""
            self.conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
        elif isinstance(event, h2.events.StreamEnded):
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset):
            stream.reset = int(event.error_code or 0)

    def close(self) -> None:
        self.sock.close()


def _nonce_request() -> bytes:
    return service_pb2.GetEvidenceRequest(nonce=secrets.token_bytes(32)).SerializeToString()


def _chat(harness: Harness, channel: grpc.Channel) -> list[generate_pb2.ResponseChunk]:
    """A whole encrypted Generate round trip; returns the decrypted chunks."""
    req = generate_pb2.GenerateRequest(
        request_id=secrets.token_bytes(16),
        response_key=secrets.token_bytes(32),
        prompt="Name one colour.",
        params=generate_pb2.SamplingParams(max_tokens=2, temperature=0.0),
        issued_at_ms=int(time.time() * 1000),  # inside the replay window
    )
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    messages = iter(stub.Generate(seal_request(req, harness.identity.public_key), timeout=60))
    dec = StreamDecryptor(req.response_key, req.request_id, next(messages).payload)
    chunks = [dec.decrypt(m.payload)[0] for m in messages]
    dec.close()  # raises unless FINAL arrived
    return chunks


def _attest(channel: grpc.Channel) -> None:
    nonce = secrets.token_bytes(32)
    stub = service_pb2_grpc.AttestationServiceStub(channel)
    assert stub.GetEvidence(service_pb2.GetEvidenceRequest(nonce=nonce), timeout=10).nonce == nonce


def _healthy(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _retry_after_ms(err: grpc.RpcError) -> int:
    return int(dict(err.trailing_metadata() or ())[RETRY_AFTER_KEY])  # type: ignore[attr-defined]


# --- half-open streams -------------------------------------------------------------------------


def test_320_half_open_generate_streams_on_one_connection_lock_nobody_out(harness: Harness) -> None:
    srv = harness.start_server(request_timeout_s=3.0)
    abuser = RawH2(srv.port)
    try:
        for _ in range(320):  # headers only, never a request: sent before the server's SETTINGS is read
            abuser.open(GENERATE, None, end=False, flush=False)
        abuser.flush()
        abuser.pump(lambda: False, 0.5)
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            assert _healthy(ch)
            _attest(ch)
            chunks = _chat(harness, ch)
            assert chunks[-1].finish_reason in (
                generate_pb2.FINISH_REASON_LENGTH,
                generate_pb2.FINISH_REASON_STOP,
            )
            assert _healthy(ch)
        # The server held at most one connection's worth of them, and ends those at the request deadline.
        assert srv.guard.gate.in_flight(ABUSER) <= srv.options.max_streams_per_connection
        abuser.pump(lambda: all(s.done for s in abuser.streams.values()), 15)
        streams = list(abuser.streams.values())
        assert all(s.done for s in streams)
        timed_out = [s for s in streams if s.status == DEADLINE_EXCEEDED]
        assert 1 <= len(timed_out) <= srv.options.max_streams_per_connection
        assert all(s.message == REQUEST_TIMEOUT_MESSAGE for s in timed_out)
        others = [s for s in streams if s.status != DEADLINE_EXCEEDED]
        assert all(s.reset is not None or s.status == RESOURCE_EXHAUSTED for s in others), others[:3]
        assert _wait_for(lambda: srv.guard.gate.total == 0)
    finally:
        abuser.close()
        harness.stop_server(srv, grace=0.5)


def test_one_peer_holds_at_most_its_share_of_calls(harness: Harness) -> None:
    srv = harness.start_server(max_calls_per_peer=4, request_timeout_s=5.0)
    abuser = RawH2(srv.port)
    try:
        sids = [abuser.open(GENERATE, None, end=False) for _ in range(6)]
        abuser.pump(lambda: sum(abuser.streams[s].done for s in sids) >= 2, 5)
        refused = [abuser.streams[s] for s in sids if abuser.streams[s].done]
        assert len(refused) == 2
        for s in refused:
            assert (s.status, s.message) == (RESOURCE_EXHAUSTED, PEER_BUSY_MESSAGE)
            assert int(s.headers[RETRY_AFTER_KEY]) > 0
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:  # another peer is not affected
            _attest(ch)
            assert _healthy(ch)
    finally:
        abuser.close()
        harness.stop_server(srv, grace=0.5)


# --- per-peer rate limits --------------------------------------------------------------------------


def test_one_peer_looping_get_evidence_does_not_stop_another_from_attesting(harness: Harness) -> None:
    srv = harness.start_server(peer_evidence_rate=0.2, peer_evidence_burst=3)
    abuser = RawH2(srv.port)
    try:
        answers = [abuser.call(EVIDENCE, _nonce_request()) for _ in range(12)]
        assert [a.status for a in answers[:3]] == [OK] * 3
        for a in answers[3:]:
            assert (a.status, a.message) == (RESOURCE_EXHAUSTED, EVIDENCE_RATE_LIMITED_MESSAGE)
            assert 0 < int(a.headers[RETRY_AFTER_KEY]) <= 5000
        again = RawH2(srv.port)  # a new connection from the same address is the same peer
        try:
            assert again.call(EVIDENCE, _nonce_request()).status == RESOURCE_EXHAUSTED
        finally:
            again.close()
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            for _ in range(3):
                _attest(ch)
            with pytest.raises(grpc.RpcError) as info:
                _attest(ch)
            err = info.value
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert err.details() == EVIDENCE_RATE_LIMITED_MESSAGE  # type: ignore[attr-defined]
            assert _retry_after_ms(err) > 0
        assert srv.metrics.evidence_rate_limited == 9 + 1 + 1
    finally:
        abuser.close()
        harness.stop_server(srv, grace=0.5)


def test_one_peer_looping_generate_does_not_stop_another_from_chatting(harness: Harness) -> None:
    srv = harness.start_server(peer_generate_rate=0.2, peer_generate_burst=2)
    abuser = RawH2(srv.port)
    try:
        junk = service_pb2.EncryptedRequest(key_id=harness.identity.key_id, ciphertext=bytes(64))
        answers = [abuser.call(GENERATE, junk.SerializeToString()) for _ in range(5)]
        assert [a.status for a in answers[:2]] == [INVALID_ARGUMENT] * 2  # admitted, then undecryptable
        for a in answers[2:]:
            assert (a.status, a.message) == (RESOURCE_EXHAUSTED, GENERATE_RATE_LIMITED_MESSAGE)
            assert int(a.headers[RETRY_AFTER_KEY]) > 0
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            assert not _chat(harness, ch)[-1].HasField("error")
    finally:
        abuser.close()
        harness.stop_server(srv, grace=0.5)


# --- fixed strings for transport-level refusals ----------------------------------------------------


def test_malformed_oversized_empty_and_unknown_calls_get_fixed_strings(harness: Harness) -> None:
    srv = harness.start_server()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            cases = [
                (EVIDENCE, b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_REQUEST_MESSAGE),
                (GENERATE, b"\x0a\xff", grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_REQUEST_MESSAGE),
                (HEALTH, b"\x0a\x05ab", grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_REQUEST_MESSAGE),
                (EVIDENCE, bytes(8192), grpc.StatusCode.RESOURCE_EXHAUSTED, REQUEST_TOO_LARGE_MESSAGE),
                (GENERATE, b"\x12" + bytes(2 * 1024 * 1024), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
                ("/veil.v1.Nothing/Here", b"", grpc.StatusCode.UNIMPLEMENTED, UNKNOWN_METHOD_MESSAGE),
            ]
            for path, body, code, message in cases:
                call = ch.unary_unary(path)
                with pytest.raises(grpc.RpcError) as info:
                    call(body, timeout=10)
                err = info.value
                assert err.code() == code, (path, err)  # type: ignore[attr-defined]
                assert err.details() == (message or REQUEST_TOO_LARGE_MESSAGE), (path, err)  # type: ignore[attr-defined]
            oversized = service_pb2.EncryptedRequest(
                key_id=harness.identity.key_id, ciphertext=bytes(2 * 2**20)
            )
            with pytest.raises(grpc.RpcError) as info:
                list(service_pb2_grpc.InferenceServiceStub(ch).Generate(oversized, timeout=10))
            assert info.value.details() == REQUEST_TOO_LARGE_MESSAGE  # type: ignore[attr-defined]
        raw = RawH2(srv.port)
        try:
            empty = raw.call(EVIDENCE, b"")  # a zero-length message parses: the nonce check answers
            assert empty.status == INVALID_ARGUMENT and "nonce" in empty.message
            sid = raw.open(EVIDENCE, None, end=True)  # half-closed without any message
            raw.pump(lambda: raw.streams[sid].done, 10)
            assert (raw.streams[sid].status, raw.streams[sid].message) == (
                INVALID_ARGUMENT,
                MALFORMED_REQUEST_MESSAGE,
            )
        finally:
            raw.close()
    finally:
        harness.stop_server(srv, grace=0.5)


def test_a_prompt_over_the_byte_limit_is_an_encrypted_error_without_tokenizing(harness: Harness) -> None:
    srv = harness.start_server()
    try:
        canary = f"CANARY{secrets.token_hex(6)}"
        prompt = canary + "a" * (harness.engine.max_prompt_bytes + 1)
        req = generate_pb2.GenerateRequest(
            request_id=secrets.token_bytes(16),
            response_key=secrets.token_bytes(32),
            prompt=prompt,
            params=generate_pb2.SamplingParams(max_tokens=2),
            issued_at_ms=int(time.time() * 1000),  # inside the replay window
        )
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            call = service_pb2_grpc.InferenceServiceStub(ch).Generate(
                seal_request(req, harness.identity.public_key), timeout=30
            )
            raw = list(call)
        assert call.code() == grpc.StatusCode.OK  # type: ignore[attr-defined]
        dec = StreamDecryptor(req.response_key, req.request_id, raw[0].payload)
        chunks = [dec.decrypt(m.payload)[0] for m in raw[1:]]
        dec.close()
        assert len(chunks) == 1
        assert chunks[0].error.code == generate_pb2.ChunkError.CODE_PROMPT_TOO_LONG
        assert "byte" in chunks[0].error.message and canary not in chunks[0].error.message
    finally:
        harness.stop_server(srv, grace=0.5)
