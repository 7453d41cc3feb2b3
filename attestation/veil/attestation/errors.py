"""Every exception ``veil.attestation`` raises.

::

    VeilAttestationError                 base: catch this to catch everything below
    ├── MalformedInputError              bytes that do not parse (truncated, wrong length,
    │   │                                bad encoding, wrong key size)
    │   └── UnsupportedError             well-formed but not supported (unknown suite,
    │                                    report version, product)
    ├── VerificationError                evidence parsed, but a named check failed
    ├── CollateralError                  certificates / TCB info / RIMs missing or unfetchable
    ├── PolicyError                      a verification policy (file or value) is invalid
    │   └── ReleaseError                 a signed release manifest is refused (bad signature,
    │                                    unknown publisher key, platform it does not name)
    └── ChannelError                     the encrypted request/response channel
        ├── StaleKeyError                a request names an enclave key this enclave does
        │                                not hold (it restarted): re-attest
        ├── DecryptionError              HPKE open failed: wrong key, wrong info, tampering
        ├── StreamError                  response stream: tampered, reordered, replayed
        │   │                            chunk, or a chunk after FINAL
        │   └── TruncatedStreamError     stream ended without its FINAL chunk
        └── MessageTooLargeError         plaintext over the protocol's size limit

No function of this package raises a bare ``ValueError``, ``KeyError`` or
``IndexError`` for bad input; each error's message says what was wrong without
echoing secret material.
"""

from __future__ import annotations

__all__ = [
    "ChannelError",
    "CollateralError",
    "DecryptionError",
    "MalformedInputError",
    "MessageTooLargeError",
    "PolicyError",
    "ReleaseError",
    "StaleKeyError",
    "StreamError",
    "TruncatedStreamError",
    "UnsupportedError",
    "VeilAttestationError",
    "VerificationError",
]


class VeilAttestationError(Exception):
    """Base of every error raised by ``veil.attestation``."""


class MalformedInputError(VeilAttestationError):
    """Input bytes do not parse as the expected structure."""


class UnsupportedError(MalformedInputError):
    """Input is well-formed but names something this version does not support."""


class VerificationError(VeilAttestationError):
    """A named verification check failed.

    ``check`` is the name the verdict uses for the failed check.
    """

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


class CollateralError(VeilAttestationError):
    """Collateral (certificates, TCB info, RIMs, CRLs) is missing or could not be fetched."""


class PolicyError(VeilAttestationError):
    """A verification policy is invalid: unknown key, wrong type, unreadable root file."""


class ReleaseError(PolicyError):
    """A signed release manifest is refused; ``check`` is the verdict's name for it (``policy.release``)."""

    def __init__(self, detail: str, check: str = "policy.release") -> None:
        super().__init__(detail)
        self.check = check
        self.detail = detail


class ChannelError(VeilAttestationError):
    """Base of the encrypted-channel errors."""


class StaleKeyError(ChannelError):
    """The request's key id is not this enclave's current key; the client must re-attest."""


class DecryptionError(ChannelError):
    """An HPKE ciphertext did not open: wrong key, wrong info, or tampered bytes."""


class StreamError(ChannelError):
    """A response-stream chunk failed authentication or arrived out of order."""


class TruncatedStreamError(StreamError):
    """The response stream ended without its FINAL chunk: never a short answer."""


class MessageTooLargeError(ChannelError):
    """A plaintext exceeds the protocol's size limit."""
