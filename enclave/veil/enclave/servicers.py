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
Generate replayed or out of time  INVALID_ARGUMENT (:data:`REFUSED_MESSAGE`), before any model work
replay cache full                 RESOURCE_EXHAUSTED + ``retry-after-ms``
over capacity / engine queue full RESOURCE_EXHAUSTED + ``retry-after-ms``
draining or engine stopped        UNAVAILABLE
deadline passed                   DEADLINE_EXCEEDED (grpc's own)
================================  ==============================================

Before a servicer runs, :mod:`veil.enclave.transport` refuses, each with a fixed string too:
malformed and oversized requests, a request not sent in time, too many calls from one peer or
in total, unknown methods.

Everything that depends on the plaintext (bad sampling parameters, prompt too long,
an engine error mid-stream) travels as an encrypted ``ResponseChunk`` with ``error`` and
``finish_reason = ERROR``, tagged FINAL. The response is framed so that the wire shows
elapsed time, not tokens (:mod:`veil.enclave.framing`): the secretstream header, then
equal-size frames on the cadence (streamed) or one bucketed frame (not streamed), the last
one FINAL with usage. The per-request log line carries bucketed counts and a duration
rounded to 100 ms; exact counts and TTFT only when the data policy allows them.

Cancellation: a client disconnect, a passed deadline or the end of the drain grace
period cancels the handler task; its ``finally`` closes the framed response, which stops the engine
stream and calls ``engine.cancel`` so the request's KV blocks are freed at once.
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
from veil.enclave.engine.response_format import ResponseFormat
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    ReplayCacheFullError,
    ReplayRefusedError,
)
from veil.enclave.framing import DEFAULT_FRAME_INTERVAL_S, Cadence, FramedResponse
from veil.enclave.keys import EnclaveIdentity
from veil.enclave.metrics import MetricsPublisher
from veil.enclave.replay import ReplayGuard
from veil.enclave.tee.provider import AttestationProvider
from veil.enclave.transport import SERVER_BUSY_MESSAGE, refuse
from veil.proto.v1 import evidence_pb2, generate_pb2, service_pb2, service_pb2_grpc

if TYPE_CHECKING:
    from veil.enclave.engine.async_engine import AsyncEngine, EngineRequest

__all__ = [
    "EVIDENCE_RATE_LIMITED_MESSAGE",
    "GENERATE_RATE_LIMITED_MESSAGE",
    "QUEUE_FULL_MESSAGE",
    "REFUSED_MESSAGE",
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
# One message for a replay, a stale capture and a client clock outside the window: the host
# learns nothing it did not know (it sent the request), the client a hint to check its clock.
REFUSED_MESSAGE = "request refused: replayed, or its time is outside the server's window"


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
            azure=parts.cpu.azure,
            collateral=parts.collateral,
        )


def _response_format(req: generate_pb2.GenerateRequest) -> ResponseFormat | None:
    """The sealed request's ``response_format`` (field 8), None when absent; checked when built."""
    if not req.HasField("response_format"):
        return None
    f = req.response_format
    which = f.WhichOneof("format")
    if which is None:
        raise InvalidRequestError("response_format names no format")
    text = "" if which == "json_object" else getattr(f, which)
    return ResponseFormat(kind=which, text=text, name=f.name)


def _sampling_params(p: generate_pb2.SamplingParams, fmt: ResponseFormat | None = None) -> SamplingParams:
    kwargs: dict[str, Any] = {
        "stop": tuple(p.stop),
        "stop_token_ids": tuple(p.stop_token_ids),
        "response_format": fmt,
    }
    if p.max_tokens:
        kwargs["max_tokens"] = p.max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "ignore_eos", "min_tokens"):
        if p.HasField(name):
            kwargs[name] = getattr(p, name)
    return SamplingParams(**kwargs)


def _engine_request(rid: str, req: generate_pb2.GenerateRequest) -> EngineRequest:
    from veil.enclave.engine.async_engine import EngineRequest

    params = _sampling_params(req.params, _response_format(req))
    tenant = req.tenant_secret or None  # checked by the engine; the cache key is derived there
    which = req.WhichOneof("input")
    if which == "prompt":
        return EngineRequest(request_id=rid, params=params, prompt=req.prompt, tenant_secret=tenant)
    if which == "chat":
        messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        return EngineRequest(request_id=rid, params=params, messages=messages, tenant_secret=tenant)
    raise InvalidRequestError("request has neither a prompt nor chat messages")


def _bucket(n: int) -> int:
    """A count as its bucket for the log: 0, or the next power of two, at least 256."""
    return 0 if n <= 0 else max(256, 1 << (n - 1).bit_length())


class InferenceServicer(service_pb2_grpc.InferenceServiceServicer):
    """``Generate``: HPKE-open inside the enclave, refuse replays, run on the engine, send frames.

    The frames follow the response framing rule (:mod:`veil.enclave.framing`): equal-size
    frames every ``frame_interval_s`` for a streamed request, one bucketed frame otherwise.
    """

    def __init__(
        self,
        identity: EnclaveIdentity,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        *,
        max_inflight: int,
        limiter: PeerRateLimiter | None = None,
        replay: ReplayGuard | None = None,
        frame_interval_s: float = DEFAULT_FRAME_INTERVAL_S,
        log_exact_counts: bool = False,
    ) -> None:
        self._identity = identity
        self._engine = engine
        self._metrics = metrics
        self._max_inflight = max_inflight
        self._limiter = limiter
        self._replay = replay if replay is not None else ReplayGuard()
        self._cadence = Cadence(frame_interval_s)  # one clock for every streamed answer
        self._log_exact_counts = log_exact_counts
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
        try:  # before any model work: a replayed or stale capture runs nothing
            self._replay.admit(plain.request_id, plain.issued_at_ms)
        except ReplayCacheFullError:
            self._reject()
            await refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, SERVER_BUSY_MESSAGE, retry_after_s=BUSY_RETRY_S
            )
        except ReplayRefusedError:
            self._reject()
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, REFUSED_MESSAGE)
        if self._metrics.requests_active >= self._max_inflight:
            self._reject()
            await refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, SERVER_BUSY_MESSAGE, retry_after_s=BUSY_RETRY_S
            )

        rid = secrets.token_hex(8)
        response = FramedResponse(
            self._engine,
            rid,
            lambda: _engine_request(rid, plain),
            StreamEncryptor(plain.response_key, plain.request_id),
            streamed=plain.stream,
            cadence=self._cadence,
        )
        self._metrics.requests_started += 1
        self._metrics.requests_active += 1
        try:
            async for payload in response.frames():
                yield service_pb2.EncryptedChunk(payload=payload)
        except EngineOverloadedError:
            self._reject()
            await refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_FULL_MESSAGE, retry_after_s=BUSY_RETRY_S
            )
        except EngineStoppedError:
            self._reject()
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "server is draining")
        except Exception as exc:  # a bug in the framing itself: a fixed status, never its text
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log_event(
                log, "request.internal_error", logging.ERROR, request=rid, error_type=type(exc).__name__
            )
            response.status = "internal_error"
            await _abort(context, grpc.StatusCode.INTERNAL, "internal error")
        finally:
            await response.close()
            self._metrics.requests_active -= 1
            if response.finished:
                self._metrics.requests_completed += 1
            elif response.status in ("ok", "cancelled"):
                response.status = "cancelled"
                self._metrics.requests_cancelled += 1
            self._metrics.prompt_tokens_total += response.usage[0]
            self._metrics.completion_tokens_total += response.usage[1]
            self._log_done(rid, response, plain.stream)

    def _log_done(self, rid: str, response: FramedResponse, streamed: bool) -> None:
        """The per-request log line: bucketed sizes and coarse timings unless the policy allows exact."""
        prompt, completion = response.usage
        elapsed_ms = response.elapsed_s() * 1000
        fields: dict[str, object] = {
            "request": rid,
            "status": response.status,
            "finish_reason": response.finish_reason,
            "streamed": streamed,
            "prompt_tokens_bucket": _bucket(prompt),
            "completion_tokens_bucket": _bucket(completion),
            "duration_ms": int(-(-elapsed_ms // 100) * 100),  # rounded up to 100 ms
        }
        if self._log_exact_counts:  # only where the attested data policy says so
            ttft = response.ttft_s
            fields.update(
                prompt_tokens=prompt,
                completion_tokens=completion,
                ttft_ms=-1.0 if ttft is None else round(ttft * 1000, 1),
                duration_ms=round(elapsed_ms, 1),
            )
        log_event(log, "request.done", logging.INFO, **fields)


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
