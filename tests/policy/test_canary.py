"""Data-handling policy: a canary prompt never leaves the enclave process in the clear.

The real ``veil serve --tee simulated`` runs in a subprocess with its own state dir and
``TMPDIR``; all client traffic goes through ``tests/relay.py``, which records every byte
on the wire and HPACK-decodes every header block. Requests carry a random marker in
the system and user messages (and ask the model to repeat it, so the completion tends
to carry it too). Afterwards the marker, and pieces of the decrypted completion, are
searched for in: every gRPC frame in both directions (raw and decoded headers), the
server's stdout / stderr / log files, every file under the state dir and the server's
temp dir, the metrics and health responses, and every error status the client got.

Issue #12: the server runs with a fresh, empty ``HOME`` (the prebuilt kernels are named through
``VEIL_KERNEL_CACHE``, read only): nothing may appear there or in its ``TMPDIR``; every file
modified during the run anywhere under the real home (``~/.cache`` included) or ``/tmp`` is
searched for the canary; and stderr, log files and metrics must not reveal the exact token counts
of the requests (the client learns them from the encrypted usage).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from veil.attestation.bundle import verify_evidence
from veil.attestation.channel.hpke import PublicKey, seal_request
from veil.attestation.channel.stream import StreamDecryptor
from veil.attestation.options import VerifyOptions
from veil.client import Client, Policy
from veil.demo.relay import Relay
from veil.enclave.local_server import LocalServer
from veil.proto.v1 import generate_pb2, service_pb2

pytestmark = pytest.mark.slow

GET_EVIDENCE = "/veil.v1.AttestationService/GetEvidence"
GENERATE = "/veil.v1.InferenceService/Generate"
GET_METRICS = "/veil.v1.MetricsService/GetMetrics"


@dataclass
class Run:
    marker: str
    server: LocalServer
    relay: Relay
    tmpdir: Path
    completions: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # code + details of every error status
    side_channels: list[bytes] = field(default_factory=list)  # metrics / health responses
    encrypted_errors: list[generate_pb2.ChunkError] = field(default_factory=list)
    files_while_running: dict[str, bytes] = field(default_factory=dict)
    control_wire: bytes = b""
    home: Path = Path()
    started: float = 0.0
    usages: list[tuple[int, int]] = field(default_factory=list)  # (prompt, completion) tokens


def _snapshot(*roots: Path) -> dict[str, bytes]:
    out = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                try:
                    out[str(path)] = path.read_bytes()
                except OSError:  # removed meanwhile
                    continue
    return out


def _raw_generate(address: str, request: generate_pb2.GenerateRequest, key: PublicKey) -> list[bytes]:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(
            GENERATE,
            request_serializer=service_pb2.EncryptedRequest.SerializeToString,
            response_deserializer=service_pb2.EncryptedChunk.FromString,
        )
        return [c.payload for c in call(seal_request(request, key), timeout=60)]


def _decrypt(
    payloads: list[bytes], request: generate_pb2.GenerateRequest
) -> list[generate_pb2.ResponseChunk]:
    dec = StreamDecryptor(request.response_key, request.request_id, payloads[0])
    chunks = [dec.decrypt(p)[0] for p in payloads[1:]]
    dec.close()  # FINAL was there
    return chunks


def _request(
    marker: str, params: generate_pb2.SamplingParams, prompt_repeat: int = 1
) -> generate_pb2.GenerateRequest:
    text = " ".join([f"Please repeat the code word {marker} exactly."] * prompt_repeat)
    return generate_pb2.GenerateRequest(
        request_id=secrets.token_bytes(16),
        response_key=secrets.token_bytes(32),
        chat=generate_pb2.ChatMessages(
            messages=[
                generate_pb2.ChatMessage(role="system", content=f"The secret code word is {marker}."),
                generate_pb2.ChatMessage(role="user", content=text),
            ]
        ),
        params=params,
        issued_at_ms=int(time.time() * 1000),  # issue #12: outside the replay window it is refused
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("canary")
    tmpdir = base / "server-tmp"
    tmpdir.mkdir()
    home = base / "home"
    home.mkdir()
    kernels = os.environ.get("VEIL_KERNEL_CACHE") or str(Path.home() / ".cache" / "veil" / "kernels")
    marker = f"CANARY{secrets.token_hex(8).upper()}"
    started = time.time()
    env = {"TMPDIR": str(tmpdir), "HOME": str(home), "VEIL_KERNEL_CACHE": kernels}
    server = LocalServer(base / "state", log_dir=base / "logs", env=env).start()
    relay = Relay((server.host, server.port)).start()
    r = Run(marker, server, relay, tmpdir, home=home, started=started)
    try:
        _exercise(r)
        r.files_while_running = _snapshot(r.server.state_dir, tmpdir, r.server.log_dir)
    finally:
        relay.close()
        r.server.stop()
    assert not relay.errors, relay.errors
    yield r


def _exercise(r: Run) -> None:
    policy = Policy.simulated(r.server.root_pem)
    messages = [
        {"role": "system", "content": f"The secret code word is {r.marker}."},
        {"role": "user", "content": f"Repeat the code word {r.marker} three times."},
    ]
    with Client(r.relay.address, policy=policy) as client:
        reply = client.chat.completions.create(messages=messages, max_tokens=16, temperature=0.0)
        r.completions.append(reply.choices[0].message.content)
        assert reply.usage is not None
        r.usages.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))
        stream = client.chat.completions.create(messages=messages, max_tokens=16, seed=7, stream=True)
        r.completions.append("".join(c.choices[0].delta.content or "" for c in stream))

    # Requests whose plaintext is invalid: the error must come back inside the encrypted stream.
    with grpc.insecure_channel(r.relay.address) as channel:
        nonce = secrets.token_bytes(32)
        evidence = channel.unary_unary(
            GET_EVIDENCE,
            request_serializer=service_pb2.GetEvidenceRequest.SerializeToString,
            response_deserializer=lambda b: b,
        )(service_pb2.GetEvidenceRequest(nonce=nonce), timeout=30)
    verified = verify_evidence(evidence, VerifyOptions(now=datetime.now(UTC)), policy=policy, nonce=nonce)
    assert verified.ok and verified.public_key is not None
    key = verified.public_key
    invalid = [
        _request(r.marker, generate_pb2.SamplingParams(max_tokens=8, temperature=-3.0)),
        _request(r.marker, generate_pb2.SamplingParams(max_tokens=8, top_p=7.0)),
        _request(r.marker, generate_pb2.SamplingParams(max_tokens=8), prompt_repeat=2500),  # too long
    ]
    for request in invalid:
        payloads = _raw_generate(r.relay.address, request, key)  # gRPC status OK: nothing in clear
        chunks = _decrypt(payloads, request)
        assert len(chunks) == 1 and chunks[0].HasField("error"), chunks
        assert chunks[0].finish_reason == generate_pb2.FINISH_REASON_ERROR
        r.encrypted_errors.append(chunks[0].error)

    # Transport-level errors: their statuses are searched too.
    for sealed in (
        service_pb2.EncryptedRequest(key_id=bytes(16), ciphertext=secrets.token_bytes(200)),  # stale key
        service_pb2.EncryptedRequest(key_id=key.key_id, ciphertext=secrets.token_bytes(200)),  # undecryptable
    ):
        with grpc.insecure_channel(r.relay.address) as channel:
            call = channel.unary_stream(
                GENERATE,
                request_serializer=service_pb2.EncryptedRequest.SerializeToString,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as info:
                list(call(sealed, timeout=30))
            err = info.value
            r.statuses.append(f"{err.code().name} {err.details()}")  # type: ignore[attr-defined]
    # A deliberately clear-text marker (as a malformed nonce), through a second relay: the
    # positive control that recording and searching would catch a leak.
    control = Relay((r.server.host, r.server.port)).start()
    with grpc.insecure_channel(control.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(
                GET_EVIDENCE,
                request_serializer=service_pb2.GetEvidenceRequest.SerializeToString,
                response_deserializer=lambda b: b,
            )(service_pb2.GetEvidenceRequest(nonce=r.marker.encode()), timeout=30)
        r.statuses.append(f"{info.value.code().name} {info.value.details()}")  # type: ignore[attr-defined]
    control.close()
    r.control_wire = control.all_bytes()
    with grpc.insecure_channel(r.relay.address) as channel:
        metrics = channel.unary_unary(
            GET_METRICS,
            request_serializer=service_pb2.GetMetricsRequest.SerializeToString,
            response_deserializer=lambda b: b,
        )(service_pb2.GetMetricsRequest(), timeout=30)
        r.side_channels.append(metrics)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        r.side_channels.append(health.SerializeToString())
        parsed = service_pb2.Metrics.FromString(metrics)
        assert parsed.requests_completed >= 5 and parsed.simulated


def _needles(r: Run) -> list[bytes]:
    """The marker in every encoding we can think of, plus distinctive pieces of the completions."""
    token = r.marker.removeprefix("CANARY")
    out = set()
    for text in (r.marker, token, token.lower()):
        out |= {text.encode(), text.encode("utf-16-le"), text.encode().hex().encode()}
    for completion in r.completions:
        words = completion.replace(r.marker, " ").strip()
        for i in range(0, max(0, len(words) - 15), 5):
            piece = words[i : i + 16]
            if len(set(piece)) > 6:
                out.add(piece.encode())
    return sorted(out)


def _assert_clean(where: str, blob: bytes, needles: list[bytes]) -> None:
    found = [n for n in needles if n in blob]
    assert not found, f"plaintext {found[:3]!r} found in {where}"


def test_the_search_would_catch_a_leak(run: Run) -> None:
    # Positive control: the marker sent in clear (as a bad nonce) is found on that relay's wire.
    assert run.marker.encode() in run.control_wire
    assert all(c.strip() for c in run.completions)  # and the encrypted requests were answered
    assert run.relay.all_bytes()


def test_no_plaintext_on_the_wire(run: Run) -> None:
    needles = _needles(run)
    _assert_clean("client->server bytes", bytes(run.relay.raw["c2s"]), needles)
    _assert_clean("server->client bytes", bytes(run.relay.raw["s2c"]), needles)
    _assert_clean("decoded HTTP/2 headers", run.relay.header_text().encode(), needles)
    for message in run.relay.messages:
        _assert_clean(f"gRPC message on {message.path}", message.data, needles)
    assert any(m.path == GENERATE for m in run.relay.messages)


def test_no_plaintext_in_server_output_or_files(run: Run) -> None:
    needles = _needles(run)
    _assert_clean("server stdout", run.server.stdout_path.read_bytes(), needles)
    _assert_clean("server stderr", run.server.stderr_path.read_bytes(), needles)
    after = _snapshot(run.server.state_dir, run.tmpdir, run.server.log_dir)
    for files, when in ((run.files_while_running, "while running"), (after, "after shutdown")):
        for path, data in files.items():
            _assert_clean(f"{path} ({when})", data, needles)
    assert len(after) >= 3  # logs and the simulation chain at least


def test_no_plaintext_in_metrics_health_or_statuses(run: Run) -> None:
    needles = _needles(run)
    for blob in run.side_channels:
        _assert_clean("metrics/health response", blob, needles)
    assert len(run.statuses) == 3
    for status in run.statuses:
        _assert_clean(f"status {status!r}", status.encode(), needles)
    assert run.statuses[0].startswith("FAILED_PRECONDITION")
    assert run.statuses[1].startswith("INVALID_ARGUMENT")
    assert run.statuses[2].startswith("INVALID_ARGUMENT")


def test_invalid_plaintext_is_answered_inside_the_stream(run: Run) -> None:
    codes = [e.code for e in run.encrypted_errors]
    assert codes == [
        generate_pb2.ChunkError.CODE_INVALID_REQUEST,
        generate_pb2.ChunkError.CODE_INVALID_REQUEST,
        generate_pb2.ChunkError.CODE_PROMPT_TOO_LONG,
    ]
    for error in run.encrypted_errors:
        assert run.marker not in error.message  # even the encrypted error names fields, not text
    # and the wire carried no clear-text error for them: every Generate that got an encrypted
    # error ended with grpc-status 0
    trailers = [h for d, _, h in run.relay.headers if d == "s2c" and any(k == "grpc-status" for k, _ in h)]
    assert sum(("grpc-status", "0") in h for h in trailers) >= 5


def _modified_since(roots: list[Path], since: float, skip: list[Path]) -> Iterator[Path]:
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if Path(folder, d) not in skip]
            for name in files:
                path = Path(folder, name)
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if (
                    path.is_file()
                    and not path.is_symlink()
                    and st.st_mtime >= since
                    and st.st_size < 64 << 20
                ):
                    yield path


def test_nothing_is_written_outside_the_state_dir(run: Run) -> None:
    assert run.started and run.home.is_dir()
    assert [str(p.relative_to(run.home)) for p in run.home.rglob("*")] == []  # not even ~/.cache
    assert list(run.tmpdir.iterdir()) == []  # temp files went to STATE_DIR/tmp, removed at exit
    # the kernels and the tokenizer were cached in the state dir
    assert any((run.server.state_dir / "kernels").glob("veil_cpu_*/veil_cpu_*.json"))
    assert any((run.server.state_dir / "cache" / "tokenizers").glob("*/veil-tokenizer.json"))


def test_no_canary_in_any_file_of_home_cache_or_temp(run: Run) -> None:
    needles = _needles(run)
    roots = [Path.home(), Path(os.environ.get("TMPDIR", "/tmp")), Path("/tmp"), run.home, run.tmpdir]
    searched = 0
    for path in _modified_since(roots, run.started, skip=[]):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        searched += 1
        _assert_clean(str(path), data, needles)
    assert searched > 0  # the walk works: the server's state and log files were new, and searched


_KV = re.compile(r"\b([a-z_]+)=(\S+)")


def test_logs_and_metrics_hold_no_exact_token_count(run: Run) -> None:
    prompt_tokens, completion_tokens = run.usages[0]
    assert prompt_tokens > 20  # a chat prompt with the system message: far from a small count
    text = run.server.stderr_path.read_text() + "".join(
        p.read_text(errors="replace") for p in run.server.log_dir.iterdir() if p.is_file()
    )
    assert "request.done" in text
    for key in ("prompt_tokens", "completion_tokens", "free_kv_blocks"):
        assert f"{key}=" not in text, key
    coarse = {"ttft_ms", "queue_ms", "duration_ms", "request_bucket", "response_bucket", "port"}
    for key, value in _KV.findall(text):
        if key not in coarse:
            assert value not in (str(prompt_tokens), str(completion_tokens)), (key, value)
    metrics = service_pb2.Metrics.FromString(run.side_channels[0])
    names = {f.name for f, _ in metrics.ListFields()}
    assert not names & {"prompt_tokens_total", "completion_tokens_total", "free_kv_blocks"}
    counts = {prompt_tokens, completion_tokens, sum(p for p, _ in run.usages)}
    for f, value in metrics.ListFields():
        if not f.name.startswith(("requests_", "evidence_")):  # RPC counts, known to the host
            assert value not in counts, (f.name, value)
