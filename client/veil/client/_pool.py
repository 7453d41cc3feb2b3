"""The replica pool: which attested enclave replica takes the next request (pure, no I/O).

A client given several targets keeps one :class:`Replica` per target, each with its own
transport and its own attested key; all of them are verified under the client's one policy
and must show the identity the first one pinned (same measurement, build, model and data-policy
digests), so a replica serving another model is refused. The pool only decides:

* **where** a request goes: the usable replica with the fewest requests in flight (ties taken in
  turn), never one this request already tried;
* **what a failure means** (:func:`failover`): a replica that failed *before* accepting the
  request (unreachable, ``UNAVAILABLE``, overloaded, a stale key it could not re-attest, any
  evidence failure) is backed off and the request tries another; evidence that fails
  verification or pinning *refuses* the replica for :data:`REFUSED_BACKOFF` seconds (nothing is
  ever sent to it meanwhile); everything else (and anything after a stream started) is the
  caller's error, never retried;
* **how long** a replica sits out (:meth:`ReplicaPool.failed`): exponential from
  :data:`BACKOFF_MIN` to :data:`BACKOFF_MAX`, at least the server's retry hint; a success resets it.

When every replica is backed off, the one due back soonest is tried anyway rather than
failing without trying (a single-target client therefore behaves as it always did).
The clock is injected (monotonic seconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from veil.attestation.verdict import Verdict
from veil.client._core import Attestation
from veil.client._identity import EnclaveIdentity
from veil.client.errors import (
    AttestationError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
)

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "REFUSED_BACKOFF",
    "Failover",
    "Replica",
    "ReplicaPool",
    "ReplicaStatus",
    "failover",
]

BACKOFF_MIN = 1.0  # seconds a replica sits out after its first failure
BACKOFF_MAX = 30.0  # ... doubling per consecutive failure up to this
REFUSED_BACKOFF = 300.0  # seconds a replica whose evidence was refused sits out
# gRPC statuses that show the replica did not take the request: safe to send it elsewhere.
NOT_ACCEPTED_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"})

T = TypeVar("T")


class Failover(Enum):
    """What a failure on one replica means for the request."""

    RAISE = "raise"  # the caller's error: not retried anywhere
    BACKOFF = "backoff"  # the replica did not take the request: back it off, try another
    REFUSE = "refuse"  # its evidence failed verification or pinning: refuse it, try another


def failover(exc: BaseException, *, attesting: bool) -> Failover:
    """Classify ``exc``, raised by a replica before its response stream started.

    While ``attesting`` (``GetEvidence``; nothing of the request was sent yet) any gRPC status
    backs the replica off. During ``Generate`` only the statuses that show the request was not
    accepted do (:data:`NOT_ACCEPTED_CODES`); a rejection from inside the encrypted stream, a
    deadline or a malformed answer is raised.
    """
    if isinstance(exc, AttestationError):
        return Failover.REFUSE
    if isinstance(exc, RequestRejectedError | StreamInterruptedError) or not isinstance(exc, ServerError):
        return Failover.RAISE
    if attesting or exc.code in NOT_ACCEPTED_CODES:
        return Failover.BACKOFF
    return Failover.RAISE


@dataclass(slots=True, eq=False)
class Replica(Generic[T]):
    """One enclave replica: its target, transport, attested key and health."""

    index: int
    target: str
    transport: T
    attestation: Attestation | None = None
    in_flight: int = 0
    failures: int = 0
    down_until: float = 0.0
    refused: bool = False
    error: str | None = None  # the last failure, as a one-line reason
    failed_checks: tuple[str, ...] = ()
    verdict: Verdict | None = None  # the last verdict, good or bad


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A snapshot of one replica for display (``Client.replicas``, ``GET /veil/attestation``).

    ``state`` is ``ready`` (attested, usable), ``unattested`` (not yet used), ``backoff``
    (failed; sits out ``retry_in_s`` more seconds), ``recovering`` (its back-off is over: the
    next request tries it) or ``refused`` (its evidence failed verification or did not match
    the pinned identity).
    """

    target: str
    state: str
    in_flight: int
    retry_in_s: float
    verdict: Verdict | None
    identity: EnclaveIdentity | None
    model: str | None
    error: str | None
    failed_checks: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the verdict with every check)."""
        return {
            "target": self.target,
            "state": self.state,
            "in_flight": self.in_flight,
            "retry_in_s": round(self.retry_in_s, 3),
            "model": self.model,
            "identity": self.identity.fields() if self.identity else None,
            "error": self.error,
            "failed_checks": list(self.failed_checks),
            "verdict": self.verdict.to_json() if self.verdict else None,
        }


class ReplicaPool(Generic[T]):
    """Routing and health of a client's replicas; call it under the client's own serialization.

    Every method is synchronous and does no I/O, so the sync client calls it under a lock and
    the async client from its one event loop.
    """

    def __init__(self, replicas: Sequence[tuple[str, T]], *, clock: Callable[[], float] = time.monotonic):
        if not replicas:
            raise ValueError("a pool needs at least one replica")
        self.replicas = [Replica(i, target, transport) for i, (target, transport) in enumerate(replicas)]
        self._clock = clock
        self._turn = 0

    def pick(self, tried: Collection[int] = ()) -> Replica[T] | None:
        """The replica for the next attempt (its ``in_flight`` counted), or None when all were tried.

        Usable replicas come first, fewest in flight, ties in turn; when none is usable, the one
        due back soonest.
        """
        now = self._clock()
        left = [r for r in self.replicas if r.index not in tried]
        if not left:
            return None
        n = len(self.replicas)
        usable = [r for r in left if r.down_until <= now]
        if usable:
            chosen = min(usable, key=lambda r: (r.in_flight, (r.index - self._turn) % n))
        else:
            chosen = min(left, key=lambda r: (r.down_until, r.index))
        self._turn = (chosen.index + 1) % n
        chosen.in_flight += 1
        return chosen

    def release(self, replica: Replica[T]) -> None:
        """A request on ``replica`` ended (however it ended)."""
        replica.in_flight = max(0, replica.in_flight - 1)

    def succeeded(self, replica: Replica[T]) -> None:
        """``replica`` answered: it is healthy again."""
        replica.failures = 0
        replica.down_until = 0.0
        replica.refused = False
        replica.error = None
        replica.failed_checks = ()

    def attested(self, replica: Replica[T], attestation: Attestation) -> None:
        """``replica`` showed good evidence for the pinned identity."""
        replica.attestation = attestation
        replica.verdict = attestation.verdict
        self.succeeded(replica)

    def failed(self, replica: Replica[T], exc: BaseException, *, retry_after: float | None = None) -> float:
        """Back ``replica`` off after a failure; returns the seconds it sits out."""
        replica.failures += 1
        delay: float = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(replica.failures - 1, 16))
        if retry_after is not None:
            delay = max(delay, min(retry_after, BACKOFF_MAX))
        replica.down_until = self._clock() + delay
        replica.error = _reason(exc)
        return delay

    def refuse(self, replica: Replica[T], exc: AttestationError) -> None:
        """``replica``'s evidence failed verification or pinning: nothing is sent to it for a while."""
        replica.refused = True
        replica.attestation = None
        replica.failures += 1
        replica.down_until = self._clock() + REFUSED_BACKOFF
        replica.error = _reason(exc)
        replica.failed_checks = exc.failed_checks
        replica.verdict = exc.verdict

    def status(self, replica: Replica[T]) -> ReplicaStatus:
        """A snapshot of ``replica``."""
        now = self._clock()
        retry_in = max(0.0, replica.down_until - now)
        if replica.refused:
            state = "refused"
        elif retry_in > 0:
            state = "backoff"
        elif replica.error is not None:
            state = "recovering"
        elif replica.attestation is None:
            state = "unattested"
        else:
            state = "ready"
        attestation = replica.attestation
        return ReplicaStatus(
            target=replica.target,
            state=state,
            in_flight=replica.in_flight,
            retry_in_s=retry_in,
            verdict=replica.verdict,
            identity=attestation.identity if attestation else None,
            model=attestation.model if attestation else None,
            error=replica.error,
            failed_checks=replica.failed_checks,
        )


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
