"""The encrypted channel bound to the attested key (pure: no I/O, no torch).

* :mod:`~veil.attestation.channel.hpke` — requests: HPKE (RFC 9180) sealing to the enclave key.
* :mod:`~veil.attestation.channel.stream` — responses: libsodium secretstream, FINAL tag last.
* :mod:`~veil.attestation.channel.padding` — size buckets for both directions.

The names most callers need are re-exported here.
"""

from __future__ import annotations

from veil.attestation.channel.hpke import (
    HpkeSuite,
    PrivateKey,
    PublicKey,
    open_request,
    seal_request,
)
from veil.attestation.channel.stream import StreamDecryptor, StreamEncryptor

__all__ = [
    "HpkeSuite",
    "PrivateKey",
    "PublicKey",
    "StreamDecryptor",
    "StreamEncryptor",
    "open_request",
    "seal_request",
]
