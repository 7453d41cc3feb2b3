"""An in-process enclave for SDK unit tests: the real key, claims, simulated TEE and channel crypto.

Only the model is fake: it answers with canned text. It implements the client's
``Transport`` and ``AsyncTransport`` interfaces, so the SDK runs exactly as it does
over gRPC, and it can misbehave on request (restart with a new key, tamper with or
drop chunks, reject a request inside the encrypted stream, refuse evidence with a gRPC status).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from veil.attestation.channel.hpke import open_request
from veil.attestation.channel.stream import StreamEncryptor
from veil.attestation.errors import StaleKeyError
from veil.client.errors import ServerError
from veil.enclave.keys import create_identity, measurement_from_build_digest
from veil.enclave.sim_release import write_simulation_release
from veil.enclave.tee.simulated import SimulatedTeeProvider, load_or_create_simulation
from veil.proto.v1 import evidence_pb2, generate_pb2, service_pb2

BUILD = hashlib.sha256(b"fake build").digest()
MODEL = hashlib.sha256(b"fake model").digest()
DATA_POLICY = hashlib.sha256(b"fake data policy").digest()


class FakeEnclave:
    def __init__(self, state_dir: Path, answer: tuple[str, ...] = ("Hello", ", ", "world", ".")) -> None:
        self.authority = load_or_create_simulation(state_dir)
        # Its signed release manifest, as `veil serve --tee simulated` writes it (Policy.simulated reads it).
        write_simulation_release(
            state_dir, build_digest=BUILD, model_digest=MODEL, data_policy_digest=DATA_POLICY, gpu_count=1,
            tcb=self.authority.tcb,
        )  # fmt: skip
        self.root_pem = state_dir / "simulation-root.pem"
        self.answer = answer
        self.restart()
        self.evidence_calls: list[bytes] = []
        self.requests: list[generate_pb2.GenerateRequest] = []
        self.tamper_chunk: int | None = None
        self.drop_final = False
        self.reject: tuple[int, str] | None = None
        self.evidence_errors: list[ServerError] = []  # raised by the next GetEvidence calls, in order
        self.closed = False

    def restart(self, model_digest: bytes = MODEL, build_digest: bytes = BUILD) -> None:
        """A new enclave key, as after a server restart (optionally another model or build)."""
        self.provider = SimulatedTeeProvider(self.authority, measurement_from_build_digest(build_digest))
        self.identity = create_identity(
            model_digest=model_digest,
            engine_version="fake-0",
            data_policy_digest=DATA_POLICY,
            server_build_digest=build_digest,
            simulated=True,
        )

    # ---- the wire protocol, in process
    def evidence_bytes(self, nonce: bytes) -> bytes:
        ident = self.identity
        parts = self.provider.evidence(nonce, ident.claims_bytes, ident.public_key.to_bytes())
        return evidence_pb2.Evidence(
            format_version=2,
            platform=parts.platform,
            cpu_report=parts.cpu.report,
            cpu_cert_chain=parts.cpu.cert_chain,
            gpus=[g.to_proto() for g in parts.gpus],
            enclave_key=ident.public_key.to_proto(),
            claims=ident.claims_bytes,
            nonce=nonce,
            simulated=True,
            collateral=parts.collateral,  # stapled, as the real servicer does (issue #11)
        ).SerializeToString()

    def payloads(self, sealed: service_pb2.EncryptedRequest) -> list[bytes]:
        try:
            request = open_request(sealed, self.identity.private_key)
        except StaleKeyError:
            raise ServerError("FAILED_PRECONDITION", "stale key: re-attest") from None
        self.requests.append(request)
        enc = StreamEncryptor(request.response_key, request.request_id)
        out = [enc.header]
        if self.reject is not None:
            code, message = self.reject
            chunk = generate_pb2.ResponseChunk(
                error=generate_pb2.ChunkError(code=code, message=message),
                finish_reason=generate_pb2.FINISH_REASON_ERROR,
            )
            return [*out, enc.encrypt(chunk, final=True)]
        limit = request.params.max_tokens or len(self.answer)
        deltas = list(self.answer[:limit])
        for delta in deltas:
            out.append(enc.encrypt(generate_pb2.ResponseChunk(text_delta=delta)))
        final = generate_pb2.ResponseChunk(
            finish_reason=generate_pb2.FINISH_REASON_LENGTH
            if limit < len(self.answer)
            else generate_pb2.FINISH_REASON_STOP,
            usage=generate_pb2.Usage(prompt_tokens=7, completion_tokens=len(deltas)),
        )
        out.append(enc.encrypt(final, final=True))
        if self.tamper_chunk is not None:
            i = self.tamper_chunk
            out[i] = out[i][:-1] + bytes([out[i][-1] ^ 1])
        if self.drop_final:
            out.pop()
        return out


class _Stream:
    def __init__(self, payloads: list[bytes]) -> None:
        self._payloads = payloads
        self.cancelled = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._payloads

    async def _aiter(self) -> AsyncIterator[bytes]:
        for p in self._payloads:
            yield p

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._aiter()

    def cancel(self) -> None:
        self.cancelled = True


class _FailingStream(_Stream):
    def __init__(self, error: ServerError) -> None:
        super().__init__([])
        self.error = error

    def __iter__(self) -> Iterator[bytes]:
        raise self.error

    async def _aiter(self) -> AsyncIterator[bytes]:
        raise self.error
        yield b""  # pragma: no cover


class FakeTransport:
    """Sync ``Transport`` over a :class:`FakeEnclave`."""

    def __init__(self, enclave: FakeEnclave) -> None:
        self.enclave = enclave
        self.streams: list[_Stream] = []

    def get_evidence(self, nonce: bytes, timeout: float | None) -> bytes:
        self.enclave.evidence_calls.append(nonce)
        if self.enclave.evidence_errors:
            raise self.enclave.evidence_errors.pop(0)
        return self.enclave.evidence_bytes(nonce)

    def generate(self, request: service_pb2.EncryptedRequest, timeout: float | None) -> _Stream:
        try:
            stream: _Stream = _Stream(self.enclave.payloads(request))
        except ServerError as exc:
            stream = _FailingStream(exc)
        self.streams.append(stream)
        return stream

    def close(self) -> None:
        self.enclave.closed = True


class FakeAsyncTransport(FakeTransport):
    """Async ``AsyncTransport`` over a :class:`FakeEnclave`."""

    async def get_evidence(self, nonce: bytes, timeout: float | None) -> bytes:  # type: ignore[override]
        return FakeTransport.get_evidence(self, nonce, timeout)

    async def close(self) -> None:  # type: ignore[override]
        self.enclave.closed = True
