"""gRPC servicers: translate wire messages to enclave objects and back, choose status codes.

Status codes (DESIGN.md "Channel / Errors"); every status message is a fixed string,
never an exception's text, so nothing derived from a plaintext reaches the host:

================================  ==============================================
GetEvidence nonce not 32 bytes    INVALID_ARGUMENT
GetEvidence over the rate limit   RESOURCE_EXHAUSTED + ``retry-after-ms`` (per peer, then shared)
provider failure                  INTERNAL ("evidence unavailable")
Generate over the peer's rate     RESOURCE_EXHAUSTED + ``retry-after-ms``
Generate for another key          FAILED_PRECONDITION (:data:`STALE_KEY_MESSAGE`)
Generate that does not open       INVALID_ARGUMENT (:data:`UNDECRYPTABLE_MESSAGE`)
over capacity / engine queue full RESOURCE_EXHAUSTED + ``retry-after-ms``
draining or engine stopped        UNAVAILABLE
deadline passed                   DEADLINE_EXCEEDED (grpc's own)
================================  ==============================================

Before a servicer runs, :mod:`veil.enclave.transport` refuses, each with a fixed string too:
malformed and oversized requests, a request not sent in time, too many calls from one peer or
in total, unknown methods.

Everything that depends on the plaintext (bad sampling parameters, prompt too long,
an engine error mid-stream) travels as an encrypted ``ResponseChunk`` with ``error`` and
``finish_reason = ERROR``, tagged FINAL. The response stream is: the secretstream header,
then one encrypted chunk per engine delta, the last one FINAL with usage.

Cancellation: a client disconnect, a passed deadline or the end of the drain grace
period cancels the handler task; its ``finally`` closes the engine stream and calls
``engine.cancel`` so the request's KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from veil.attestation.binding import EVIDENCE_FORMAT_VERSION, NONCE_SIZE
from veil.attestation.channel.hpke import open_request
from veil.attestation.channel.stream import StreamEncryptor
from veil.attestation.errors import StaleKeyError, VeilAttestationError
from veil.enclave.admission import PeerRateLimiter, TokenBucket, peer_key
from veil.enclave.data_policy import log_event
from veil.enclave.engine.detokenizer import FINISH_CANCELLED, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
)
from veil.enclave.keys import EnclaveIdentity
from veil.enclave.metrics import MetricsPublisher
from veil.enclave.tee.provider import AttestationProvider
from veil.enclave.transport import SERVER_BUSY_MESSAGE, refuse
from veil.proto.v1 import evidence_pb2, generate_pb2, service_pb2, service_pb2_grpc

if TYPE_CHECKING:
    from veil.enclave.engine.async_engine import AsyncEngine, Delta, EngineRequest

__all__ = [
    "EVIDENCE_RATE_LIMITED_MESSAGE",
    "GENERATE_RATE_LIMITED_MESSAGE",
    "QUEUE_FULL_MESSAGE",
    "SERVER_BUSY_MESSAGE",
    "STALE_KEY_MESSAGE",
    "UNDECRYPTABLE_MESSAGE",
    "AttestationServicer",
    "InferenceServicer",
    "MetricsServicer",
    "ServerMetrics",
    "TokenBucket",
]

log = logging.getLogger("veil.enclave.server")

STALE_KEY_MESSAGE = "stale key: the request is sealed to a key this enclave does not hold; re-attest"
UNDECRYPTABLE_MESSAGE = "request could not be decrypted"
EVIDENCE_RATE_LIMITED_MESSAGE = "evidence rate limit reached; retry later"
GENERATE_RATE_LIMITED_MESSAGE = "request rate limit reached; retry later"
QUEUE_FULL_MESSAGE = "engine queue full; retry later"
BUSY_RETRY_S = 1.0  # the hint sent with "at capacity" and "queue full"
_FINISH = {
    FINISH_STOP: generate_pb2.FINISH_REASON_STOP,
    FINISH_LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FINISH_CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
    FINISH_ERROR: generate_pb2.FINISH_REASON_ERROR,
}


@dataclass(slots=True)
class ServerMetrics:
    """The server's counters, in enclave memory. Only what :mod:`veil.enclave.metrics` snapshots
    is ever published; the token totals stay inside (they would give away request lengths)."""

    simulated: bool
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False
    requests_started: int = 0
    requests_completed: int = 0
    requests_rejected: int = 0
    requests_cancelled: int = 0
    requests_active: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    evidence_served: int = 0
    evidence_rate_limited: int = 0


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


class AttestationServicer(service_pb2_grpc.AttestationServiceServicer):
    """``GetEvidence``: a fresh report for every 32-byte nonce, rate-limited per peer."""

    def __init__(
        self,
        identity: EnclaveIdentity,
        provider: AttestationProvider,
        limiter: PeerRateLimiter,
        metrics: ServerMetrics,
    ) -> None:
        self._identity = identity
        self._provider = provider
        self._limiter = limiter
        self._metrics = metrics

    async def GetEvidence(
        self, request: service_pb2.GetEvidenceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> evidence_pb2.Evidence:
        if len(request.nonce) != NONCE_SIZE:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"nonce must be exactly {NONCE_SIZE} bytes"
            )
        wait_s = self._limiter.acquire(peer_key(context.peer()))
        if wait_s:
            self._metrics.evidence_rate_limited += 1
            await refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                EVIDENCE_RATE_LIMITED_MESSAGE,
                retry_after_s=wait_s,
            )
        ident = self._identity
        try:
            parts = await asyncio.to_thread(
                self._provider.evidence, bytes(request.nonce), ident.claims_bytes, ident.public_key.to_bytes()
            )
        except Exception as exc:  # provider failure or bug: a fixed status, never the exception text
            log_event(log, "evidence.failed", logging.ERROR, error_type=type(exc).__name__)
            await _abort(context, grpc.StatusCode.INTERNAL, "evidence unavailable")
        self._metrics.evidence_served += 1
        return evidence_pb2.Evidence(
            format_version=EVIDENCE_FORMAT_VERSION,
            platform=parts.platform,
            cpu_report=parts.cpu.report,
            cpu_cert_chain=parts.cpu.cert_chain,
            gpus=[g.to_proto() for g in parts.gpus],
            enclave_key=ident.public_key.to_proto(),
            claims=ident.claims_bytes,
            nonce=bytes(request.nonce),
            simulated=parts.simulated,
            collateral=parts.collateral,
        )


def _sampling_params(p: generate_pb2.SamplingParams) -> SamplingParams:
    kwargs: dict[str, Any] = {"stop": tuple(p.stop), "stop_token_ids": tuple(p.stop_token_ids)}
    if p.max_tokens:
        kwargs["max_tokens"] = p.max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "ignore_eos", "min_tokens"):
        if p.HasField(name):
            kwargs[name] = getattr(p, name)
    return SamplingParams(**kwargs)


def _engine_request(rid: str, req: generate_pb2.GenerateRequest) -> EngineRequest:
    from veil.enclave.engine.async_engine import EngineRequest

    params = _sampling_params(req.params)
    which = req.WhichOneof("input")
    if which == "prompt":
        return EngineRequest(request_id=rid, params=params, prompt=req.prompt)
    if which == "chat":
        messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        return EngineRequest(request_id=rid, params=params, messages=messages)
    raise InvalidRequestError("request has neither a prompt nor chat messages")


def _error_chunk(exc: Exception | None) -> generate_pb2.ResponseChunk:
    if isinstance(exc, PromptTooLongError):
        code = generate_pb2.ChunkError.CODE_PROMPT_TOO_LONG
    elif isinstance(exc, InvalidRequestError):
        code = generate_pb2.ChunkError.CODE_INVALID_REQUEST
    else:
        code = generate_pb2.ChunkError.CODE_INTERNAL
    # Enclave error messages name fields, never prompt text; this one is encrypted anyway.
    message = str(exc) if isinstance(exc, InvalidRequestError) else "internal error"
    return generate_pb2.ResponseChunk(
        finish_reason=generate_pb2.FINISH_REASON_ERROR,
        error=generate_pb2.ChunkError(code=code, message=message),
    )


class InferenceServicer(service_pb2_grpc.InferenceServiceServicer):
    """``Generate``: HPKE-open inside the enclave, run on the engine, stream encrypted chunks."""

    def __init__(
        self,
        identity: EnclaveIdentity,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        *,
        max_inflight: int,
        limiter: PeerRateLimiter | None = None,
    ) -> None:
        self._identity = identity
        self._engine = engine
        self._metrics = metrics
        self._max_inflight = max_inflight
        self._limiter = limiter
        self.draining = False

    def _reject(self) -> None:
        self._metrics.requests_rejected += 1

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The peer's rate limit, checked before any work (no HPKE open for a flooding peer)."""
        if self._limiter is None:
            return
        wait_s = self._limiter.acquire(peer_key(context.peer()))
        if wait_s:
            self._reject()
            await refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                GENERATE_RATE_LIMITED_MESSAGE,
                retry_after_s=wait_s,
            )

    async def Generate(
        self, request: service_pb2.EncryptedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[service_pb2.EncryptedChunk]:
        await self._admit(context)
        if self.draining:
            self._reject()
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "server is draining")
        try:
            plain = open_request(request, self._identity.private_key)
        except StaleKeyError:
            self._reject()
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, STALE_KEY_MESSAGE)
        except VeilAttestationError:
            self._reject()
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, UNDECRYPTABLE_MESSAGE)
        if self._metrics.requests_active >= self._max_inflight:
            self._reject()
            await refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, SERVER_BUSY_MESSAGE, retry_after_s=BUSY_RETRY_S
            )

        rid = secrets.token_hex(8)
        enc = StreamEncryptor(plain.response_key, plain.request_id)
        self._metrics.requests_started += 1
        self._metrics.requests_active += 1
        started = time.monotonic()
        stream: AsyncIterator[Delta] | None = None
        header_sent = finished = False
        status, finish, usage, ttft_ms = "cancelled", "", (0, 0), -1.0
        try:
            try:
                # Builds and checks the sampling parameters; the engine tokenizes and checks the
                # prompt when the stream starts, and raises from the first delta.
                stream = self._engine.generate(_engine_request(rid, plain))
                delta: Delta | None = await anext(stream)
            except InvalidRequestError as exc:
                status, finished = "invalid_request", True
                yield service_pb2.EncryptedChunk(payload=enc.header)
                yield service_pb2.EncryptedChunk(payload=enc.encrypt(_error_chunk(exc), final=True))
                return
            except EngineOverloadedError:
                status = "overloaded"
                self._reject()
                await refuse(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    QUEUE_FULL_MESSAGE,
                    retry_after_s=BUSY_RETRY_S,
                )
            except EngineStoppedError:
                status = "stopped"
                self._reject()
                await _abort(context, grpc.StatusCode.UNAVAILABLE, "server is draining")
            ttft_ms = round((time.monotonic() - started) * 1000, 1)
            header_sent = True
            yield service_pb2.EncryptedChunk(payload=enc.header)
            while delta is not None:
                if delta.error is not None:
                    status, finished = "engine_error", True
                    yield service_pb2.EncryptedChunk(payload=enc.encrypt(_error_chunk(None), final=True))
                    return
                if delta.finish_reason is not None:
                    finish, usage = delta.finish_reason, (delta.prompt_tokens, delta.completion_tokens)
                    chunk = generate_pb2.ResponseChunk(
                        text_delta=delta.text,
                        finish_reason=_FINISH.get(delta.finish_reason, generate_pb2.FINISH_REASON_STOP),
                        usage=generate_pb2.Usage(prompt_tokens=usage[0], completion_tokens=usage[1]),
                    )
                    status, finished = "ok", True
                    yield service_pb2.EncryptedChunk(payload=enc.encrypt(chunk, final=True))
                    return
                if delta.text:
                    chunk = generate_pb2.ResponseChunk(text_delta=delta.text)
                    yield service_pb2.EncryptedChunk(payload=enc.encrypt(chunk))
                delta = await anext(stream, None)
            raise EngineStoppedError("engine stream ended without a final delta")
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError) or finished:
                raise
            # A bug or an engine failure: report it generically, inside the stream.
            log_event(
                log, "request.internal_error", logging.ERROR, request=rid, error_type=type(exc).__name__
            )
            status, finished = "internal_error", True
            if not header_sent:
                yield service_pb2.EncryptedChunk(payload=enc.header)
            yield service_pb2.EncryptedChunk(payload=enc.encrypt(_error_chunk(None), final=True))
        finally:
            self._metrics.requests_active -= 1
            if finished:
                self._metrics.requests_completed += 1
            elif status == "cancelled":
                self._metrics.requests_cancelled += 1
            self._metrics.prompt_tokens_total += usage[0]
            self._metrics.completion_tokens_total += usage[1]
            if status != "ok":
                await self._cancel(rid, stream)
            log_event(
                log,
                "request.done",
                request=rid,
                status=status,
                finish_reason=finish or None,
                prompt_tokens=usage[0],
                completion_tokens=usage[1],
                ttft_ms=ttft_ms,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

    async def _cancel(self, rid: str, stream: AsyncIterator[Delta] | None) -> None:
        """Stop the engine work for ``rid`` and free its KV blocks (idempotent)."""
        try:
            self._engine.cancel(rid)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        except Exception as exc:  # never let cleanup mask the original outcome
            log_event(
                log, "request.cancel_failed", logging.WARNING, request=rid, error_type=type(exc).__name__
            )


class MetricsServicer(service_pb2_grpc.MetricsServiceServicer):
    """``GetMetrics``: the publisher's periodic snapshot (:mod:`veil.enclave.metrics` says what is in it)."""

    def __init__(self, publisher: MetricsPublisher) -> None:
        self._publisher = publisher

    async def GetMetrics(
        self, request: service_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> service_pb2.Metrics:
        s = self._publisher.current()
        return service_pb2.Metrics(
            simulated=s.simulated,
            draining=s.draining,
            uptime_s=s.uptime_s,
            requests_started=s.requests_started,
            requests_completed=s.requests_completed,
            requests_rejected=s.requests_rejected,
            requests_cancelled=s.requests_cancelled,
            requests_active=s.requests_active,
            evidence_served=s.evidence_served,
            evidence_rate_limited=s.evidence_rate_limited,
            total_kv_blocks=s.total_kv_blocks,
            period_s=s.period_s,
        )
