"""What :class:`~veil.client.Client` and :class:`~veil.client.AsyncClient` share.

:class:`_BaseClient` holds the configuration, the pinned attestation and the
sans-I/O :class:`~veil.client._core.ClientCore`; the two clients differ only in
how they do I/O.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
)
from veil.client._identity import EnclaveIdentity
from veil.client.errors import ConfigurationError
from veil.proto.v1 import generate_pb2

__all__ = ["DEFAULT_TIMEOUT", "Messages"]

DEFAULT_TIMEOUT = 120.0
Messages = Iterable[Mapping[str, Any] | Any]


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
        )
        self.timeout = timeout
        self._attestation: Attestation | None = None

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

    def _fresh(self) -> Attestation | None:
        """The pinned attestation while its key has not expired, else None."""
        current = self._attestation
        return current if current is not None and not self._core.expired(current) else None

    @property
    def evidence(self) -> bytes | None:
        """The raw ``Evidence`` bytes of the current attestation, as received."""
        return self._attestation.evidence if self._attestation else None

    def _install(self, attestation: Attestation) -> Attestation:
        self._attestation = attestation
        return attestation

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
    ) -> tuple[list[generate_pb2.ChatMessage], GenerateParams]:
        return check_messages(messages), check_params(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stream=stream,
        )  # fmt: skip
