"""Every exception ``veil.client`` raises.

::

    VeilClientError                  base: catch this to catch everything below
    ├── ConfigurationError           bad arguments or policy file (nothing was sent)
    │   └── ClientClosedError        the client was closed: a new request is refused,
    │                                a stream still open is abandoned (never a bare
    │                                ``CancelledError`` or a transport error)
    ├── AttestationError             the enclave's evidence failed verification;
    │                                ``.failed_checks`` names every failed check
    ├── ChannelError                 the encrypted channel failed: tampered, truncated,
    │                                reordered or replayed data (never a short answer)
    └── ServerError                  the server answered with a gRPC status;
        │                            ``.code`` is the status name (``DEADLINE_EXCEEDED``,
        │                            ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``, ...);
        │                            ``.retry_after`` the server's hint in seconds
        ├── RequestRejectedError     the enclave rejected the request's content
        │                            (sent back inside the encrypted stream)
        └── StreamInterruptedError   a response stream the enclave had accepted broke off
                                     (replica lost, deadline): never retried elsewhere,
                                     since the request may have run; ``.target`` names
                                     the replica

Errors from ``veil.attestation`` are wrapped into these, with the original as
``__cause__``.
"""

from __future__ import annotations

from collections.abc import Sequence

from veil.attestation.verdict import Verdict

__all__ = [
    "AttestationError",
    "ChannelError",
    "ClientClosedError",
    "ConfigurationError",
    "RequestRejectedError",
    "ServerError",
    "StreamInterruptedError",
    "VeilClientError",
]


class VeilClientError(Exception):
    """Base of every error raised by ``veil.client``."""


class ConfigurationError(VeilClientError):
    """Bad arguments or policy; raised before anything is sent."""


class ClientClosedError(ConfigurationError):
    """The client was closed: it sends nothing more, and its open streams end with this error."""


class AttestationError(VeilClientError):
    """The enclave's evidence did not satisfy the policy.

    ``failed_checks`` names every failed check; ``verdict`` is the whole verdict
    (every check with its detail) when verification got that far.
    """

    def __init__(
        self, message: str, failed_checks: Sequence[str] = (), verdict: Verdict | None = None
    ) -> None:
        checks = ", ".join(failed_checks)
        super().__init__(f"{message} (failed: {checks})" if checks else message)
        self.failed_checks = tuple(failed_checks)
        self.verdict = verdict


class ChannelError(VeilClientError):
    """The encrypted channel failed authentication or ended early."""


class ServerError(VeilClientError):
    """The server returned a gRPC error status.

    ``code`` is the status name (e.g. ``"RESOURCE_EXHAUSTED"``); ``retry_after`` is the
    server's back-off hint in seconds (trailing metadata ``retry-after-ms``), or None.
    """

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


class RequestRejectedError(ServerError):
    """The enclave rejected the request's content; the reason came encrypted."""


class StreamInterruptedError(ServerError):
    """A response stream broke off after the enclave accepted the request.

    It is never retried on another replica (the request may already have run, so a retry could
    run it twice). ``code`` is the gRPC status that ended it; ``target`` names the replica.
    """

    def __init__(self, code: str, message: str, *, target: str) -> None:
        super().__init__(code, f"the response stream from {target} broke off: {message}")
        self.target = target
