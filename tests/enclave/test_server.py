"""``veil serve`` over loopback with the real model: evidence, the encrypted stream, status codes,
backpressure, cancellation, deadlines and the SIGTERM drain.

The servers run in one background event loop (one engine for the module, over the session's model);
the tests talk to them with the synchronous gRPC client over 127.0.0.1, like a user would.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import Harness

from veil.attestation.binding import Claims, gpu_nonce, report_data
from veil.attestation.channel.hpke import PublicKey, seal_request
from veil.attestation.channel.stream import StreamDecryptor
from veil.attestation.nvidia.report import parse_gpu_report
from veil.attestation.nvidia.verify import verify_gpu
from veil.attestation.options import VerifyOptions
from veil.attestation.snp.report import parse_snp_report
from veil.attestation.snp.verify import verify_snp
from veil.attestation.stapled import stapled_nvidia
from veil.enclave.keys import measurement_from_build_digest
from veil.enclave.local_server import LocalServer
from veil.enclave.server import EnclaveServer
from veil.enclave.servicers import EVIDENCE_RATE_LIMITED_MESSAGE, STALE_KEY_MESSAGE, UNDECRYPTABLE_MESSAGE
from veil.enclave.tee.simulated import SIMULATION_ROOT_FILE
from veil.enclave.transport import REQUEST_TOO_LARGE_MESSAGE, RETRY_AFTER_KEY
from veil.proto.v1 import evidence_pb2, generate_pb2, service_pb2, service_pb2_grpc

T = TypeVar("T")
PROMPT = "Name one colour."
# ignore_eos: runs to max_tokens whatever the sampled trajectory.
LONG = {"prompt": "Write a long essay about the sea.", "temperature": 1.0, "seed": 7, "ignore_eos": True}


@pytest.fixture(scope="module")
def harness(loaded_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(loaded_model, tmp_path_factory.mktemp("state"))
    yield h
    h.close()


@pytest.fixture(scope="module")
def server(harness: Harness) -> Iterator[EnclaveServer]:
    # A short metrics period so the tests that wait on a counter need not wait 10 s.
    srv = harness.start_server(metrics_period_s=0.05)
    yield srv
    harness.stop_server(srv)


@pytest.fixture
def channel(server: EnclaveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def _request(
    *, prompt: str = PROMPT, max_tokens: int = 3, stream: bool = False, **params: Any
) -> generate_pb2.GenerateRequest:
    # Issue #12: a request carries the time it was sealed (the replay window) and says whether
    # it streams (equal-size frames on the cadence) or not (one frame holding the whole answer).
    return generate_pb2.GenerateRequest(
        request_id=secrets.token_bytes(16),
        response_key=secrets.token_bytes(32),
        prompt=prompt,
        params=generate_pb2.SamplingParams(max_tokens=max_tokens, **params),
        stream=stream,
        issued_at_ms=int(time.time() * 1000),
    )


def _decrypt(req: generate_pb2.GenerateRequest, messages: Iterator[Any]) -> list[generate_pb2.ResponseChunk]:
    header = next(messages).payload
    dec = StreamDecryptor(req.response_key, req.request_id, header)
    chunks = []
    for msg in messages:
        chunk, _final = dec.decrypt(msg.payload)
        chunks.append(chunk)
    dec.close()  # raises unless the FINAL chunk arrived
    return chunks


def _status(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _idle(engine: Any) -> bool:
    s = engine.stats()
    return bool(s.running == 0 and s.waiting == 0 and s.free_kv_blocks == s.total_kv_blocks)


# --- health, evidence -------------------------------------------------------------------------


def test_health_serving(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "veil.v1.AttestationService", "veil.v1.InferenceService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_get_evidence_requires_a_32_byte_nonce(channel: grpc.Channel, size: int) -> None:
    stub = service_pb2_grpc.AttestationServiceStub(channel)
    err = _status(lambda: stub.GetEvidence(service_pb2.GetEvidenceRequest(nonce=bytes(size)), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_evidence_is_fresh_bound_and_verifies(harness: Harness, channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.AttestationServiceStub(channel)
    nonces = [secrets.token_bytes(32), secrets.token_bytes(32)]
    evidence = [stub.GetEvidence(service_pb2.GetEvidenceRequest(nonce=n), timeout=10) for n in nonces]
    again = stub.GetEvidence(service_pb2.GetEvidenceRequest(nonce=nonces[0]), timeout=10)
    assert evidence[0].cpu_report != evidence[1].cpu_report
    assert again.cpu_report != evidence[0].cpu_report  # fresh report even for a repeated nonce
    roots = x509.load_pem_x509_certificates((harness.state_dir / SIMULATION_ROOT_FILE).read_bytes())
    now = dt.datetime.now(dt.UTC)
    for nonce, ev in zip(nonces, evidence, strict=True):
        assert ev.nonce == nonce
        assert ev.simulated and ev.platform == evidence_pb2.PLATFORM_SIMULATED_SEV_SNP
        claims = Claims.from_bytes(ev.claims)
        assert claims.simulated
        key = PublicKey.from_proto(ev.enclave_key)
        assert claims.enclave_public_key == key.to_bytes() == harness.identity.public_key.to_bytes()
        assert claims.server_build_digest == harness.digest
        report = parse_snp_report(ev.cpu_report)
        assert report.measurement == measurement_from_build_digest(harness.digest)
        assert report.report_data == report_data(nonce, ev.claims, ev.gpus)
        snp = verify_snp(
            report,
            x509.load_pem_x509_certificates(ev.cpu_cert_chain),
            VerifyOptions(now=now, trusted_roots=tuple(roots)),
        )
        assert snp.ok, snp.table()
        assert len(ev.gpus) == 1
        gnonce = gpu_nonce(nonce, key.to_bytes())
        gpu = ev.gpus[0]
        assert parse_gpu_report(gpu.report).nonce == gnonce
        chain = x509.load_pem_x509_certificates(gpu.cert_chain)
        # Issue #11: GPUs need RIMs and OCSP by default: the evidence staples them.
        stapled = stapled_nvidia(ev.collateral)
        options = VerifyOptions(now=now, trusted_roots=(roots[1],), ocsp_post=stapled.ocsp_post)
        gv = verify_gpu(gpu.report, chain, options, nonce=gnonce, rims=stapled.rims, rim_roots=(roots[2],))
        assert gv.ok, gv.table()
        assert ev.collateral.amd.crl  # the AMD CRL is stapled too


def test_get_evidence_is_rate_limited(harness: Harness) -> None:
    srv = harness.start_server(evidence_rate=0.01, evidence_burst=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = service_pb2_grpc.AttestationServiceStub(ch)
            req = service_pb2.GetEvidenceRequest(nonce=secrets.token_bytes(32))
            stub.GetEvidence(req, timeout=10)
            stub.GetEvidence(req, timeout=10)
            err = _status(lambda: stub.GetEvidence(req, timeout=10))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.details() == EVIDENCE_RATE_LIMITED_MESSAGE
            assert int(dict(err.trailing_metadata())[RETRY_AFTER_KEY]) > 0  # issue #12: a retry hint
            assert srv.metrics.evidence_rate_limited == 1
    finally:
        harness.stop_server(srv)


# --- the encrypted stream ---------------------------------------------------------------------


def test_generate_round_trip(harness: Harness, channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    req = _request(max_tokens=4, temperature=0.0)
    call = stub.Generate(seal_request(req, harness.identity.public_key), timeout=60)
    chunks = _decrypt(req, iter(call))
    assert call.code() == grpc.StatusCode.OK
    final = chunks[-1]
    assert final.finish_reason in (generate_pb2.FINISH_REASON_LENGTH, generate_pb2.FINISH_REASON_STOP)
    assert 1 <= final.usage.completion_tokens <= 4
    assert final.usage.prompt_tokens > 0
    assert all(not c.HasField("error") for c in chunks)
    assert "".join(c.text_delta for c in chunks).strip()
    assert all(c.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])

    # chat messages take the chat-template path and give the same shape of answer
    chat = generate_pb2.GenerateRequest(
        request_id=secrets.token_bytes(16),
        response_key=secrets.token_bytes(32),
        chat=generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user", content=PROMPT)]),
        params=generate_pb2.SamplingParams(max_tokens=2, temperature=0.0),
        issued_at_ms=int(time.time() * 1000),
    )
    chunks = _decrypt(chat, iter(stub.Generate(seal_request(chat, harness.identity.public_key), timeout=60)))
    assert chunks[-1].usage.completion_tokens <= 2
    assert _wait_for(lambda: _idle(harness.engine))


def test_stale_key_is_failed_precondition(harness: Harness, channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    other = harness.new_identity()  # what a restarted enclave would hold
    err = _status(lambda: list(stub.Generate(seal_request(_request(), other.public_key), timeout=10)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == STALE_KEY_MESSAGE


def test_undecryptable_requests_are_invalid_argument_with_a_generic_message(
    harness: Harness, channel: grpc.Channel
) -> None:
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    good = seal_request(_request(), harness.identity.public_key)
    flipped = bytearray(good.ciphertext)
    flipped[-5] ^= 0x01
    for ciphertext in (secrets.token_bytes(1200), bytes(flipped), good.ciphertext[:40], b""):
        sealed = service_pb2.EncryptedRequest(key_id=good.key_id, ciphertext=ciphertext)
        err = _status(lambda s=sealed: list(stub.Generate(s, timeout=10)))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == UNDECRYPTABLE_MESSAGE


def test_plaintext_errors_travel_encrypted(harness: Harness, channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    canary = f"CANARY{secrets.token_hex(6)}"
    cases = [
        (_request(prompt=f"{canary} hi", temperature=-1.0), generate_pb2.ChunkError.CODE_INVALID_REQUEST),
        (_request(prompt=f"{canary} hi", top_p=0.0), generate_pb2.ChunkError.CODE_INVALID_REQUEST),
        (_request(prompt=""), generate_pb2.ChunkError.CODE_INVALID_REQUEST),
        (
            _request(prompt=f"{canary} " + "word " * (harness.engine.max_context + 16)),
            generate_pb2.ChunkError.CODE_PROMPT_TOO_LONG,
        ),
    ]
    for req, code in cases:
        call = stub.Generate(seal_request(req, harness.identity.public_key), timeout=30)
        raw = list(call)
        assert call.code() == grpc.StatusCode.OK  # the transport succeeded; the error is inside
        assert call.details() in (None, "")
        assert all(canary.encode() not in m.payload for m in raw)
        chunks = _decrypt(req, iter(raw))
        assert len(chunks) == 1
        assert chunks[0].error.code == code, chunks[0]
        assert chunks[0].finish_reason == generate_pb2.FINISH_REASON_ERROR
        assert canary not in chunks[0].error.message


def test_oversized_request_is_refused_by_the_transport(harness: Harness, channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    sealed = service_pb2.EncryptedRequest(key_id=harness.identity.key_id, ciphertext=bytes(2 * 1024 * 1024))
    err = _status(lambda: list(stub.Generate(sealed, timeout=10)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == REQUEST_TOO_LARGE_MESSAGE  # issue #12: Veil's fixed string, not gRPC's


# --- backpressure, cancellation, deadlines --------------------------------------------------------


def test_overload_is_resource_exhausted(harness: Harness) -> None:
    srv = harness.start_server(max_inflight=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = service_pb2_grpc.InferenceServiceStub(ch)
            first_req = _request(max_tokens=256, stream=True, **LONG)
            first = stub.Generate(seal_request(first_req, harness.identity.public_key), timeout=60)
            next(first)  # the header: the first request is admitted and running
            err = _status(lambda: list(stub.Generate(seal_request(_request(), harness.identity.public_key))))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            first.cancel()
        assert _wait_for(lambda: _idle(harness.engine))
    finally:
        harness.stop_server(srv)


def test_client_disconnect_cancels_and_frees_kv_blocks(harness: Harness, channel: grpc.Channel) -> None:
    engine = harness.engine
    assert _wait_for(lambda: _idle(engine))
    total = engine.stats().total_kv_blocks
    cancelled_before = harness_server_metrics(channel).requests_cancelled
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    req = _request(max_tokens=400, stream=True, **LONG)
    call = stub.Generate(seal_request(req, harness.identity.public_key), timeout=60)
    messages = iter(call)
    next(messages)  # header (issue #12: with the first frame, on the first tick of the cadence)
    next(messages)  # first frame
    assert _wait_for(lambda: engine.stats().free_kv_blocks < total)  # the request holds blocks
    call.cancel()
    assert _wait_for(lambda: _idle(engine)), engine.stats()
    assert _wait_for(lambda: harness_server_metrics(channel).requests_cancelled == cancelled_before + 1)


def test_deadline_is_honoured_and_frees_kv_blocks(harness: Harness, channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    req = _request(max_tokens=400, **LONG)
    started = time.monotonic()
    err = _status(lambda: list(stub.Generate(seal_request(req, harness.identity.public_key), timeout=0.5)))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert _wait_for(lambda: _idle(harness.engine)), harness.engine.stats()


def harness_server_metrics(channel: grpc.Channel) -> service_pb2.Metrics:
    return service_pb2_grpc.MetricsServiceStub(channel).GetMetrics(service_pb2.GetMetricsRequest(), timeout=5)


# Issue #12: the published metrics carry no token counts and no live KV occupancy.
PUBLISHED_METRICS = {
    "simulated",
    "draining",
    "uptime_s",
    "requests_started",
    "requests_completed",
    "requests_rejected",
    "requests_cancelled",
    "requests_active",
    "evidence_served",
    "evidence_rate_limited",
    "total_kv_blocks",
    "period_s",
}


def test_metrics_are_metadata_only(channel: grpc.Channel) -> None:
    m = harness_server_metrics(channel)
    assert m.simulated and not m.draining
    assert m.total_kv_blocks > 0
    assert m.requests_started >= m.requests_completed
    fields = {f.name for f in m.DESCRIPTOR.fields}
    assert all(f.type not in (f.TYPE_STRING, f.TYPE_BYTES) for f in m.DESCRIPTOR.fields), fields
    assert fields == PUBLISHED_METRICS  # no token totals, no free_kv_blocks, no engine queue gauges


def _metrics_after_the_period(channel: grpc.Channel) -> service_pb2.Metrics:
    time.sleep(0.1)  # two periods of the fixture's server
    return harness_server_metrics(channel)


def _counts(m: service_pb2.Metrics) -> dict[str, float]:
    return {f.name: v for f, v in m.ListFields() if f.name != "uptime_s"}


def test_metrics_before_and_after_one_request_do_not_reveal_its_length(
    harness: Harness, channel: grpc.Channel
) -> None:
    stub = service_pb2_grpc.InferenceServiceStub(channel)
    deltas = []
    for words in (1, 300):  # prompts of ~5 and ~1500 tokens
        assert _wait_for(lambda: _idle(harness.engine))
        before = _counts(_metrics_after_the_period(channel))
        req = _request(prompt=" ".join(["sea"] * words), max_tokens=2, temperature=0.0)
        list(stub.Generate(seal_request(req, harness.identity.public_key), timeout=60))
        assert _wait_for(lambda: _idle(harness.engine))
        after = _counts(_metrics_after_the_period(channel))
        deltas.append({k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()})
    assert deltas[0] == deltas[1]  # the same one-request step, whatever the prompt's length
    assert deltas[0]["requests_started"] == deltas[0]["requests_completed"] == 1


def test_metrics_are_a_snapshot_taken_once_per_period(harness: Harness) -> None:
    srv = harness.start_server(metrics_period_s=3600)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            first = harness_server_metrics(ch)
            err = _status(
                lambda: list(
                    service_pb2_grpc.InferenceServiceStub(ch).Generate(
                        service_pb2.EncryptedRequest(key_id=bytes(16), ciphertext=b"x"), timeout=5
                    )
                )
            )
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert srv.metrics.requests_rejected == 1  # counted inside the enclave ...
            assert harness_server_metrics(ch) == first  # ... published at the next period
            assert first.period_s == 3600
    finally:
        harness.stop_server(srv)


def test_prometheus_exposes_the_same_safe_aggregates(harness: Harness) -> None:
    import urllib.request

    srv = harness.start_server(metrics_period_s=0.05, metrics_port=0)
    try:
        assert srv.prometheus is not None and srv.prometheus.host == "127.0.0.1"  # loopback by default
        url = f"http://127.0.0.1:{srv.prometheus.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        samples = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            m = harness_server_metrics(ch)
        assert samples['veil_requests_total{outcome="started"}'] == m.requests_started
        assert samples["veil_kv_cache_blocks"] == m.total_kv_blocks > 0
        assert samples["veil_metrics_period_seconds"] == 0.05
        names = {name.split("{")[0] for name in samples}
        assert names == {
            "veil_requests_total",
            "veil_evidence_total",
            "veil_requests_active",
            "veil_kv_cache_blocks",
            "veil_uptime_seconds",
            "veil_draining",
            "veil_simulated_tee",
            "veil_metrics_period_seconds",
        }, names  # only Veil's own registry: no process collector, nothing about tokens
    finally:
        harness.stop_server(srv)
    assert srv.prometheus is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


# --- graceful drain (a real `veil serve` process) ----------------------------------------------------


def _refused(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            service_pb2_grpc.AttestationServiceStub(ch).GetEvidence(
                service_pb2.GetEvidenceRequest(nonce=secrets.token_bytes(32)), timeout=2
            )
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


@pytest.mark.slow  # starts `veil serve` in a subprocess, which loads the model
def test_sigterm_drains_in_flight_streams_then_exits_zero(tmp_path: Path) -> None:
    srv = LocalServer(tmp_path / "state", extra_args=["--grace", "20", "--kv-cache-mb", "32"])
    with srv:
        out = srv.stdout_path.read_text()
        assert f"simulation root: {srv.root_pem}" in out
        assert "SIMULATED" in out
        with grpc.insecure_channel(srv.address) as ch:
            ev = service_pb2_grpc.AttestationServiceStub(ch).GetEvidence(
                service_pb2.GetEvidenceRequest(nonce=secrets.token_bytes(32)), timeout=10
            )
            key = PublicKey.from_proto(ev.enclave_key)
            stub = service_pb2_grpc.InferenceServiceStub(ch)
            canary = f"CANARY{secrets.token_hex(8)}"
            req = _request(max_tokens=48, **{**LONG, "prompt": f"{LONG['prompt']} Code word {canary}."})
            call = stub.Generate(seal_request(req, key), timeout=60)
            messages = iter(call)
            header = next(messages)
            assert srv.process is not None
            os.kill(srv.process.pid, signal.SIGTERM)
            # new calls are refused while the in-flight stream drains
            assert _wait_for(lambda: _refused(srv.address), timeout=10)
            # the in-flight stream still completes, FINAL included
            chunks = _decrypt(req, iter([header, *messages]))
            assert chunks[-1].finish_reason in (
                generate_pb2.FINISH_REASON_LENGTH,
                generate_pb2.FINISH_REASON_STOP,
            )
            assert srv.process.wait(30) == 0
        err_text = srv.stderr_path.read_text()
        lines = [line for line in err_text.splitlines() if line.strip()]
        assert lines and all("[SIMULATED TEE]" in line for line in lines), err_text[-2000:]
        assert "server.draining" in err_text
        assert list((tmp_path / "state" / "tmp").iterdir()) == []  # temp dir removed at exit
        # the prompt left no trace in the output or in any file the server wrote
        assert canary not in srv.output()
        for path in (tmp_path / "state").rglob("*"):
            assert not path.is_file() or canary.encode() not in path.read_bytes(), path
