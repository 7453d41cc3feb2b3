"""What :class:`~veil.client.Client` and :class:`~veil.client.AsyncClient` share.

:class:`_BaseClient` holds the configuration, the pinned attestation and the
sans-I/O :class:`~veil.client._core.ClientCore`; the two clients differ only in
how they do I/O. What both do the same way lives here too: refusing text that
cannot be encoded before anything is sent, the one evidence retry after
``RESOURCE_EXHAUSTED`` (:func:`evidence_backoff`), the closed state, and the replica pool
(:mod:`veil.client._pool`): one transport and one attested key per target, all pinned to one
identity.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from veil.attestation.binding import Claims
from veil.attestation.errors import PolicyError
from veil.attestation.policy import Policy
from veil.attestation.verdict import Verdict
from veil.client._core import (
    Attestation,
    ClientCore,
    GenerateParams,
    check_messages,
    check_params,
    tenant_secret,
)
from veil.client._identity import EnclaveIdentity
from veil.client._pool import Failover, Replica, ReplicaPool, ReplicaStatus, failover
from veil.client.errors import (
    AttestationError,
    ClientClosedError,
    ConfigurationError,
    ServerError,
    VeilClientError,
)
from veil.proto.v1 import generate_pb2

__all__ = ["DEFAULT_TIMEOUT", "EVIDENCE_RETRY_MAX", "Messages", "evidence_backoff", "replica_targets"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 120.0
Messages = Iterable[Mapping[str, Any] | Any]
OVERLOADED_CODE = "RESOURCE_EXHAUSTED"
EVIDENCE_RETRY_MAX = 2.0  # seconds: the longest the SDK waits, whatever the server's hint says
EVIDENCE_RETRY_DEFAULT = (0.25, 0.75)  # seconds, jittered, when the server gave no hint
CLOSED_MESSAGE = "the client was closed"


def evidence_backoff(
    exc: ServerError, jitter: Callable[[float, float], float] = random.uniform
) -> float | None:
    """Seconds to wait before the one ``GetEvidence`` retry, or None when ``exc`` is not worth one.

    Only ``RESOURCE_EXHAUSTED`` (the evidence rate limit) is retried: after the server's
    ``retry-after-ms`` hint when it gave one, else a short jittered pause; never longer than
    :data:`EVIDENCE_RETRY_MAX`. Anything else (a wrong answer, an unreachable server) fails at once.
    """
    if exc.code != OVERLOADED_CODE:
        return None
    hint = exc.retry_after
    delay = jitter(*EVIDENCE_RETRY_DEFAULT) if hint is None else hint
    return min(EVIDENCE_RETRY_MAX, max(0.0, delay))


def check_encodable(messages: list[Any], stop: str | Sequence[str] | None) -> None:
    """Refuse text protobuf cannot encode (a lone surrogate) with a typed error naming where it is.

    Without this the SDK raised a raw ``UnicodeEncodeError`` from protobuf while sealing.
    """
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
        _encodable(content, f"messages[{i}].content")
    stops = [stop] if isinstance(stop, str) else list(stop) if stop is not None else []
    for j, text in enumerate(stops):
        _encodable(text, f"stop[{j}]")


def _encodable(text: object, where: str) -> None:
    if not isinstance(text, str):
        return  # not text: the argument checks name it
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"{where} is not valid Unicode text (a lone surrogate at offset {exc.start}); nothing was sent"
        ) from None


def replica_targets(
    target: str | Sequence[str] | None, transport: T | Sequence[T] | None, make: Callable[[str], T]
) -> list[tuple[str, T]]:
    """(name, transport) per replica, from targets (``make`` opens each) or given transports.

    Given transports are named by the targets when there are as many of them, else by position.
    """
    targets = [target] if isinstance(target, str) else list(target) if target is not None else []
    if not all(isinstance(t, str) and t for t in targets):
        raise ConfigurationError("every target must be a non-empty 'host:port' string")
    if len(set(targets)) != len(targets):
        raise ConfigurationError("the same target is named twice")
    if transport is not None:
        given: list[T] = list(transport) if isinstance(transport, list | tuple) else [transport]  # type: ignore[list-item]
        if not given:
            raise ConfigurationError("transport must not be an empty list")
        names = targets if len(targets) == len(given) else [f"replica-{i}" for i in range(len(given))]
        return list(zip(names, given, strict=True))
    if not targets:
        raise ConfigurationError("the client needs a target (host:port), a list of them, or a transport")
    return [(t, make(t)) for t in targets]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _BaseClient:
    """What the sync and async clients share: configuration and the pinned attestation."""

    def __init__(
        self,
        policy: Policy | None,
        *,
        timeout: float | None,
        clock: Callable[[], datetime] | None,
        random_bytes: Callable[[int], bytes] | None,
        key_ttl: timedelta | float | int,
        tenant: str | bytes | None = None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ConfigurationError("timeout must be positive (or None for no deadline)")
        if policy is None:
            try:
                policy = Policy()
            except PolicyError as exc:
                raise ConfigurationError(f"default policy unusable: {exc}") from exc
        self._core = ClientCore(
            policy,
            clock=clock or _utc_now,
            random_bytes=random_bytes or secrets.token_bytes,
            key_ttl=key_ttl,
            # Without tenant=, a random secret of this instance's own (from the OS, not the
            # injected random_bytes, whose sequence tests pin): its requests share cached
            # prefixes with each other and with no other instance.
            tenant_secret=tenant_secret(tenant, secrets.token_bytes),
        )
        self.timeout = timeout
        self._attestation: Attestation | None = None
        self._closed = False
        self._pool: ReplicaPool[Any]

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called; the client then sends nothing more."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(CLOSED_MESSAGE)

    @property
    def policy(self) -> Policy:
        """The policy evidence is verified against."""
        return self._core.policy

    @property
    def attestation(self) -> Verdict | None:
        """The verdict of the current attestation (every check), or None before the first use."""
        return self._attestation.verdict if self._attestation else None

    @property
    def claims(self) -> Claims | None:
        """What the attested enclave stated about itself (model, policy and build digests)."""
        return self._attestation.claims if self._attestation else None

    @property
    def identity(self) -> EnclaveIdentity | None:
        """The pinned identity every re-attestation must match, or None before the first use."""
        return self._core.pinned

    @property
    def key_ttl(self) -> timedelta:
        """How long a verified enclave key is used before the client attests afresh."""
        return self._core.key_ttl

    @property
    def replicas(self) -> tuple[ReplicaStatus, ...]:
        """A snapshot of every replica: state, requests in flight, last verdict and error."""
        return tuple(self._pool.status(r) for r in self._pool.replicas)

    def _fresh(self, replica: Replica[Any]) -> Attestation | None:
        """``replica``'s attestation while its key has not expired, else None."""
        current = replica.attestation
        return current if current is not None and not self._core.expired(current) else None

    def _failed(
        self, replica: Replica[Any], exc: VeilClientError, *, attesting: bool, release: bool = True
    ) -> bool:
        """Record a failure of ``replica``; True when the request may go to another replica.

        Call it under the pool's serialization (the sync client's lock; the async client's loop).
        """
        if release:
            self._pool.release(replica)
        if isinstance(exc, ClientClosedError):
            return False
        action = failover(exc, attesting=attesting)
        if action is Failover.REFUSE and isinstance(exc, AttestationError):
            self._pool.refuse(replica, exc)
        elif action is Failover.BACKOFF and isinstance(exc, ServerError):
            self._pool.failed(replica, exc, retry_after=exc.retry_after)
        return action is not Failover.RAISE

    @staticmethod
    def _pool_error(failures: list[VeilClientError]) -> VeilClientError:
        """What to raise when every replica failed: an attestation failure first, else the last."""
        refused = [e for e in failures if isinstance(e, AttestationError)]
        if refused:
            return refused[0]
        return failures[-1] if failures else ServerError("UNAVAILABLE", "no replica to send the request to")

    @property
    def evidence(self) -> bytes | None:
        """The raw ``Evidence`` bytes of the current attestation, as received."""
        return self._attestation.evidence if self._attestation else None

    def _install(self, replica: Replica[Any], attestation: Attestation) -> Attestation:
        self._pool.attested(replica, attestation)
        self._attestation = attestation
        return attestation

    def _current(self) -> Attestation:
        """The attestation installed last; only called after one was installed."""
        if self._attestation is None:  # pragma: no cover - attest() installs one or raises
            raise ConfigurationError("the client has not attested an enclave yet")
        return self._attestation

    @staticmethod
    def _write_evidence(path: str | Path, attestation: Attestation) -> Path:
        target = Path(path)
        target.write_bytes(attestation.evidence)
        return target

    @staticmethod
    def _prepare(
        messages: Messages,
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
        stream: bool = False,
        response_format: object = None,
    ) -> tuple[list[generate_pb2.ChatMessage], GenerateParams]:
        if not isinstance(messages, str | bytes | Mapping):  # those: check_messages names the mistake
            messages = list(messages)
        check_encodable(messages if isinstance(messages, list) else [], stop)
        return check_messages(messages), check_params(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stream=stream, response_format=response_format,
        )  # fmt: skip

    @staticmethod
    def _prepare_prompt(
        prompt: str | Sequence[str],
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
        stream: bool = False,
    ) -> tuple[str, GenerateParams]:
        if isinstance(prompt, list | tuple) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ConfigurationError("prompt must be one non-empty string (batches are not supported)")
        _encodable(prompt, "prompt")
        check_encodable([], stop)
        return prompt, check_params(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stream=stream,
        )  # fmt: skip
