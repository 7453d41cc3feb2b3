"""What the host sees of ``Generate`` (issue #12): message counts and sizes, and replays.

A real server on loopback with the real model, reached through the recording relay
(:class:`veil.demo.relay.Relay`, the untrusted host). The wire must show elapsed time and
bucketed sizes only, never the token count; a captured request sent again must be refused
before any model work.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from veil.attestation.channel.hpke import seal_request
from veil.attestation.channel.stream import HEADER_SIZE, StreamDecryptor
from veil.demo.relay import Relay
from veil.enclave.keys import build_digest, create_identity, measurement_from_build_digest
from veil.enclave.server import EnclaveServer, ServerOptions
from veil.enclave.servicers import REFUSED_MESSAGE
from veil.enclave.tee.simulated import SimulatedTeeProvider, load_or_create_simulation
from veil.proto.v1 import generate_pb2, service_pb2, service_pb2_grpc

T = TypeVar("T")
GENERATE = "/veil.v1.InferenceService/Generate"
ESSAY = "Write a long essay about the sea."


class Enclave:
    """One engine on a background event loop, a server over it and the relay in front."""

    def __init__(self, model: Any, state_dir: Any, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine: Any = self.run(self._engine(model), 180)
        self.steps = 0
        core = self.engine._engine
        step = core.step

        def counted() -> Any:  # every model step the engine runs, counted
            self.steps += 1
            return step()

        core.step = counted
        digest = build_digest()
        self.identity = create_identity(
            model_digest=self.engine.model_digest,
            engine_version=self.engine.engine_version,
            data_policy_digest=bytes(32),
            server_build_digest=digest,
            simulated=True,
        )
        provider = SimulatedTeeProvider(
            load_or_create_simulation(state_dir), measurement_from_build_digest(digest)
        )
        self.server = EnclaveServer(
            self.engine, self.identity, provider, ServerOptions(host="127.0.0.1", port=0, **options)
        )
        self.run(self.server.start())
        self.relay = Relay(("127.0.0.1", self.server.port)).start()

    async def _engine(self, model: Any) -> Any:
        from veil.enclave.engine.async_engine import AsyncEngine
        from veil.enclave.engine.block_manager import blocks_for_budget
        from veil.enclave.runner.cpu import CpuRunner

        blocks = blocks_for_budget(32 * 2**20, model.config.kv_bytes_per_token, 16)
        engine = AsyncEngine(CpuRunner(model, blocks, 16), max_batch=4)
        await engine.start()
        return engine

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def generate(self, request: generate_pb2.GenerateRequest) -> tuple[list[bytes], float]:
        """Send ``request`` through the relay; the payloads and the seconds it took."""
        return self.send(seal_request(request, self.identity.public_key))

    def send(self, sealed: service_pb2.EncryptedRequest) -> tuple[list[bytes], float]:
        started = time.monotonic()
        with grpc.insecure_channel(self.relay.address) as channel:
            call = service_pb2_grpc.InferenceServiceStub(channel).Generate(sealed, timeout=120)
            payloads = [m.payload for m in call]
        return payloads, time.monotonic() - started

    def wire(self) -> list[tuple[str, int]]:
        """(direction, size) of every gRPC message of ``Generate`` the relay saw, then forgets them."""
        shape = [(m.direction, len(m.data)) for m in self.relay.messages if m.path == GENERATE]
        self.relay.clear()
        return shape

    def close(self) -> None:
        self.relay.close()
        self.run(self.server.drain(1.0), 30)
        self.run(self.engine.stop(1.0), 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def enclave(loaded_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Enclave]:
    e = Enclave(loaded_model, tmp_path_factory.mktemp("state"), frame_interval_s=0.1)
    yield e
    e.close()


def _request(max_tokens: int, *, stream: bool = False, **kw: Any) -> generate_pb2.GenerateRequest:
    params = generate_pb2.SamplingParams(
        max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0
    )
    fields: dict[str, Any] = {"issued_at_ms": int(time.time() * 1000), **kw}
    return generate_pb2.GenerateRequest(
        request_id=secrets.token_bytes(16),
        response_key=secrets.token_bytes(32),
        prompt=ESSAY,
        params=params,
        stream=stream,
        **fields,
    )


def _answer(req: generate_pb2.GenerateRequest, payloads: list[bytes]) -> list[generate_pb2.ResponseChunk]:
    dec = StreamDecryptor(req.response_key, req.request_id, payloads[0])
    chunks = [dec.decrypt(p)[0] for p in payloads[1:]]
    dec.close()
    return chunks


def test_non_streamed_answers_hide_their_token_count(enclave: Enclave) -> None:
    shapes = []
    for n in (2, 100):  # 50x the tokens, one size bucket
        req = _request(n)
        payloads, _ = enclave.generate(req)
        chunks = _answer(req, payloads)
        assert chunks[-1].usage.completion_tokens == n
        assert len(chunks) == 1  # the whole answer in one frame
        shapes.append(enclave.wire())
    assert shapes[0] == shapes[1], shapes
    s2c = [size for direction, size in shapes[0] if direction == "s2c"]
    assert len(s2c) == 2 and s2c[1] > 1024  # the header, then one padded 1 KiB frame


def test_streamed_answers_of_equal_duration_have_one_shape(loaded_model: Any, tmp_path: Any) -> None:
    # A cadence longer than either answer takes: both end on the first tick after they start, so
    # equal duration in ticks, whatever their token counts. The server's one cadence ticks every
    # 3 s from its start; each request here starts just after a tick (the first at the start).
    slow = Enclave(loaded_model, tmp_path, frame_interval_s=3.0)
    try:
        shapes = []
        for n in (2, 24):
            req = _request(n, stream=True)
            payloads, took = slow.generate(req)
            assert 2.5 <= took < 6.0, took
            assert _answer(req, payloads)[-1].usage.completion_tokens == n
            shapes.append(slow.wire())
        assert shapes[0] == shapes[1], shapes
    finally:
        slow.close()


def test_streamed_frames_are_equal_and_follow_time(enclave: Enclave) -> None:
    req = _request(48, stream=True)
    payloads, took = enclave.generate(req)
    chunks = _answer(req, payloads)
    assert chunks[-1].usage.completion_tokens == 48
    s2c = [size for direction, size in enclave.wire() if direction == "s2c"]
    assert s2c[0] == HEADER_SIZE + 2  # the header message (payload field tag + length)
    assert len(set(s2c[1:])) == 1, s2c  # every frame, the FINAL one included, one size
    frames = len(s2c) - 1
    assert frames <= took / 0.1 + 1  # one frame per 100 ms tick, never one per token
    assert sum(1 for c in chunks if c.text_delta) < 48  # frames carry many tokens, or none


def test_a_replayed_request_is_refused_before_any_model_work(enclave: Enclave) -> None:
    req = _request(3)
    payloads, _ = enclave.generate(req)
    assert _answer(req, payloads)[-1].usage.completion_tokens == 3
    # what the host captured: the sealed request exactly as it crossed the wire
    sent = [m.data for m in enclave.relay.messages if m.path == GENERATE and m.direction == "c2s"]
    assert len(sent) == 1
    captured = service_pb2.EncryptedRequest.FromString(sent[0])
    time.sleep(0.5)  # the engine is idle
    steps, started = enclave.steps, enclave.server.metrics.requests_started
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as info:
            enclave.send(captured)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == REFUSED_MESSAGE
    assert enclave.steps == steps  # no model step ran
    assert enclave.server.metrics.requests_started == started
    enclave.relay.clear()


@pytest.mark.parametrize("offset_s", [-360, 360, None])
def test_stale_future_or_undated_requests_are_refused(enclave: Enclave, offset_s: int | None) -> None:
    issued = 0 if offset_s is None else int((time.time() + offset_s) * 1000)
    steps = enclave.steps
    with pytest.raises(grpc.RpcError) as info:
        enclave.generate(_request(3, issued_at_ms=issued))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == REFUSED_MESSAGE
    assert enclave.steps == steps
    enclave.relay.clear()


def test_the_request_log_line_has_no_exact_counts(enclave: Enclave, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="veil.enclave.server")
    req = _request(5)
    enclave.generate(req)
    enclave.relay.clear()
    done = [r for r in caplog.records if r.getMessage() == "request.done"]
    assert done
    fields = done[-1].veil_fields  # type: ignore[attr-defined]
    assert not {"prompt_tokens", "completion_tokens", "ttft_ms"} & set(fields), fields
    assert fields["completion_tokens_bucket"] == 256  # 5 tokens: only "at most 256"
    assert fields["duration_ms"] % 100 == 0  # coarse
    assert fields["status"] == "ok" and fields["streamed"] is False
