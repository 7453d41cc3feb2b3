"""The one options value every verifier takes: the clock, the trust anchors, the network.

In the manner of go-sev-guest's ``verify.Options{Getter, Now, TrustedRoots}``: what a
verifier needs from the world is injected, so a test pins the day a certificate chain was
valid and runs offline. The value is checked once, when it is made; a verifier never
re-checks it.

* ``now`` — the moment certificates, CRLs, collateral and OCSP answers must be valid at
  (timezone-aware; a naive datetime is a :class:`~veil.attestation.errors.MalformedInputError`).
* ``trusted_roots`` — the trust anchors. Empty means the vendor default *of that verifier*:
  the AMD ARKs (SEV-SNP), the Intel SGX Root CA (TDX), the NVIDIA Device Identity CA (GPU
  reports) or the NVIDIA CoRIM signing Root CA (RIMs), all pinned in the package. A caller
  whose policy trusts nothing for a vendor must not call that vendor's verifier.
* ``ocsp_post`` — sends a DER OCSP request and returns the DER response (online revocation
  checks of NVIDIA chains); None: offline, the ``….ocsp`` checks are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from veil.attestation.errors import MalformedInputError

__all__ = ["OcspPost", "VerifyOptions"]

OcspPost = Callable[[bytes], bytes]
"""Sends a DER OCSP request to NVIDIA's responder and returns the DER response; raises on
transport errors. ``veil.attestation.collateral.CollateralStore.nvidia_ocsp`` is one."""


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    """What a verifier takes from the world (see the module docstring)."""

    now: datetime
    trusted_roots: tuple[x509.Certificate, ...] = ()
    ocsp_post: OcspPost | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.now, datetime) or self.now.tzinfo is None or self.now.utcoffset() is None:
            raise MalformedInputError("now must be a timezone-aware datetime")
        if isinstance(self.trusted_roots, x509.Certificate) or not isinstance(self.trusted_roots, Sequence):
            raise MalformedInputError("trusted_roots must be a sequence of certificates")
        roots = tuple(self.trusted_roots)
        if not all(isinstance(r, x509.Certificate) for r in roots):
            raise MalformedInputError("trusted_roots must hold only X.509 certificates")
        object.__setattr__(self, "trusted_roots", roots)
        if self.ocsp_post is not None and not callable(self.ocsp_post):
            raise MalformedInputError("ocsp_post must be callable")

    def anchor_for(
        self, chain: Sequence[x509.Certificate], default: Callable[[], x509.Certificate]
    ) -> x509.Certificate:
        """The one root a single-anchor verifier (TDX, NVIDIA) checks ``chain`` (leaf first) against.

        ``default()`` (the pinned vendor root) when ``trusted_roots`` is empty; else the trusted
        root that is the chain's last certificate, else the first one named as its issuer, else
        the first trusted root (the chain check then fails, naming it).
        """
        if not self.trusted_roots:
            return default()
        top = chain[-1] if chain else None
        if top is None:
            return self.trusted_roots[0]
        exact = next((r for r in self.trusted_roots if r == top), None)
        named = next((r for r in self.trusted_roots if top.issuer == r.subject), None)
        return exact or named or self.trusted_roots[0]
