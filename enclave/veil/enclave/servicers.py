"""gRPC servicers: translate wire messages to enclave objects and back, choose status codes.

Status codes (DESIGN.md "Channel / Errors"); every status message is a fixed string,
never an exception's text, so nothing derived from a plaintext reaches the host:

================================  ==============================================
GetEvidence nonce not 32 bytes    INVALID_ARGUMENT
GetEvidence over the rate limit   RESOURCE_EXHAUSTED
provider failure                  INTERNAL ("evidence unavailable")
Generate for another key          FAILED_PRECONDITION (:data:`STALE_KEY_MESSAGE`)
Generate that does not open       INVALID_ARGUMENT (:data:`UNDECRYPTABLE_MESSAGE`)
Generate replayed or out of time  INVALID_ARGUMENT (:data:`REFUSED_MESSAGE`), before any model work
replay cache full                 RESOURCE_EXHAUSTED
over capacity / engine queue full RESOURCE_EXHAUSTED
draining or engine stopped        UNAVAILABLE
deadline passed                   DEADLINE_EXCEEDED (grpc's own)
================================  ==============================================

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from veil.attestation.binding import EVIDENCE_FORMAT_VERSION, NONCE_SIZE
from veil.attestation.channel.hpke import open_request
from veil.attestation.channel.stream import StreamEncryptor
from veil.attestation.errors import StaleKeyError, VeilAttestationError
from veil.enclave.data_policy import log_event
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    ReplayCacheFullError,
    ReplayRefusedError,
)
from veil.enclave.framing import DEFAULT_FRAME_INTERVAL_S, FramedResponse
from veil.enclave.keys import EnclaveIdentity
from veil.enclave.replay import ReplayGuard
from veil.enclave.tee.provider import AttestationProvider
from veil.proto.v1 import evidence_pb2, generate_pb2, service_pb2, service_pb2_grpc

if TYPE_CHECKING:
    from veil.enclave.engine.async_engine import AsyncEngine, EngineRequest

__all__ = [
    "REFUSED_MESSAGE",
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
# One message for a replay, a stale capture and a client clock outside the window: the host
# learns nothing it did not know (it sent the request), the client a hint to check its clock.
REFUSED_MESSAGE = "request refused: replayed, or its time is outside the server's window"


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``clock`` is injected for tests."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")  # configuration bug, not input
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def try_acquire(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


@dataclass(slots=True)
class ServerMetrics:
    """Metadata-only counters (the ``Metrics`` message without the engine gauges)."""

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
    """``GetEvidence``: a fresh report for every 32-byte nonce, rate-limited."""

    def __init__(
        self,
        identity: EnclaveIdentity,
        provider: AttestationProvider,
        limiter: TokenBucket,
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
        if not self._limiter.try_acquire():
            self._metrics.evidence_rate_limited += 1
            await _abort(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, "evidence rate limit reached; retry later"
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
        replay: ReplayGuard | None = None,
        frame_interval_s: float = DEFAULT_FRAME_INTERVAL_S,
        log_exact_counts: bool = False,
    ) -> None:
        self._identity = identity
        self._engine = engine
        self._metrics = metrics
        self._max_inflight = max_inflight
        self._replay = replay if replay is not None else ReplayGuard()
        self._frame_interval_s = frame_interval_s
        self._log_exact_counts = log_exact_counts
        self.draining = False

    def _reject(self) -> None:
        self._metrics.requests_rejected += 1

    async def Generate(
        self, request: service_pb2.EncryptedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[service_pb2.EncryptedChunk]:
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
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "server at capacity; retry later")
        except ReplayRefusedError:
            self._reject()
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, REFUSED_MESSAGE)
        if self._metrics.requests_active >= self._max_inflight:
            self._reject()
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "server at capacity; retry later")

        rid = secrets.token_hex(8)
        response = FramedResponse(
            self._engine,
            rid,
            lambda: _engine_request(rid, plain),
            StreamEncryptor(plain.response_key, plain.request_id),
            streamed=plain.stream,
            interval_s=self._frame_interval_s,
        )
        self._metrics.requests_started += 1
        self._metrics.requests_active += 1
        try:
            async for payload in response.frames():
                yield service_pb2.EncryptedChunk(payload=payload)
        except EngineOverloadedError:
            self._reject()
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "engine queue full; retry later")
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
    """``GetMetrics``: counters and engine gauges, metadata only."""

    def __init__(self, metrics: ServerMetrics, engine: AsyncEngine) -> None:
        self._metrics = metrics
        self._engine = engine

    async def GetMetrics(
        self, request: service_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> service_pb2.Metrics:
        m = self._metrics
        stats = self._engine.stats()
        return service_pb2.Metrics(
            simulated=m.simulated,
            draining=m.draining,
            uptime_s=time.monotonic() - m.started_at,
            requests_started=m.requests_started,
            requests_completed=m.requests_completed,
            requests_rejected=m.requests_rejected,
            requests_cancelled=m.requests_cancelled,
            requests_active=m.requests_active,
            prompt_tokens_total=m.prompt_tokens_total,
            completion_tokens_total=m.completion_tokens_total,
            evidence_served=m.evidence_served,
            evidence_rate_limited=m.evidence_rate_limited,
            engine_running=stats.running,
            engine_waiting=stats.waiting,
            free_kv_blocks=stats.free_kv_blocks,
            total_kv_blocks=stats.total_kv_blocks,
        )
