"""X.509 certificate loading shared by every verifier (AMD, Intel, NVIDIA).

:func:`load_certificates` reads a PEM bundle (one or more certificates, file
order kept) or a single DER certificate and decodes every field verification
reads *now*: ``cryptography`` decodes names, extensions and keys lazily, so a
corrupt certificate would otherwise surface later as a bare ``ValueError``.
AMD's VCEKs and VLEKs carry serial number 0, which RFC 5280 forbids and
``cryptography`` warns about; that one warning is expected and silenced, only
for that message; any other decoding warning makes the certificate malformed.
"""

from __future__ import annotations

import hashlib
import re
import warnings

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.errors import MalformedInputError

__all__ = ["ensure_decodable", "fingerprint", "load_certificates"]

_SERIAL_WARNING = r".*serial number which wasn't positive.*"
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def ensure_decodable(cert: x509.Certificate) -> x509.Certificate:
    """Decode every field verification reads, now, so bad DER is a :class:`MalformedInputError`.

    ``cryptography`` parses names, extensions and keys lazily; a certificate that
    loaded can still fail on first access to its issuer. A warning while decoding
    (say, a country name that is not two letters) also makes it malformed; only the
    serial-number-0 warning that every AMD VCEK triggers is tolerated.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING)
        try:
            _ = (
                cert.version,
                cert.serial_number,
                cert.subject,
                cert.issuer,
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
            )
            _ = (
                cert.signature_algorithm_oid,
                cert.signature,
                cert.tbs_certificate_bytes,
                list(cert.extensions),
            )
            cert.public_key()
        except (
            Warning,
            ValueError,
            UnsupportedAlgorithm,
            x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType,
            x509.InvalidVersion,
        ) as exc:
            raise MalformedInputError(f"certificate does not decode: {exc}") from None
    return cert


def _load_one(data: bytes, *, pem: bool) -> x509.Certificate:
    loader = x509.load_pem_x509_certificate if pem else x509.load_der_x509_certificate
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING)
        try:
            return ensure_decodable(loader(data))
        except (ValueError, x509.InvalidVersion) as exc:
            raise MalformedInputError(f"not a {'PEM' if pem else 'DER'} X.509 certificate: {exc}") from None


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates from a PEM bundle (in file order) or from one DER certificate.

    Raises :class:`MalformedInputError` when nothing parses as a certificate.
    """
    data = bytes(data)
    if b"-----BEGIN" in data:
        blocks = _PEM_BLOCK.findall(data)
        if not blocks:
            raise MalformedInputError("PEM data holds no CERTIFICATE block")
        return [_load_one(block, pem=True) for block in blocks]
    if not data:
        raise MalformedInputError("empty certificate data")
    return [_load_one(data, pem=False)]
