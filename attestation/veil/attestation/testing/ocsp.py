"""A fake OCSP responder and fake CRLs: revocation answers signed by a fake authority's keys.

:func:`ocsp_response` answers for one certificate, signed by its issuer (as NVIDIA's responder
answers for device and RIM chains), with ``thisUpdate`` / ``nextUpdate`` set by the caller;
:func:`ocsp_responses` answers for every certificate of a chain the verifier asks about.
:func:`amd_crl` is an ARK-signed CRL (RSA-PSS, as AMD's KDS signs them). Used by the simulated
TEE, which staples them, and by the tests. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

__all__ = ["amd_crl", "ocsp_response", "ocsp_responses"]


def ocsp_response(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    this_update: datetime,
    next_update: datetime | None,
    revoked: bool = False,
    responder: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> bytes:
    """A DER OCSP response about ``cert``, signed by its issuer (responder id: key hash), or by
    ``responder`` (a certificate, carried in the response, and its key) when given."""
    status = ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=cert,
        issuer=issuer,
        algorithm=hashes.SHA384(),
        cert_status=status,
        this_update=this_update,
        next_update=next_update,
        revocation_time=this_update if revoked else None,
        revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
    )
    if responder is not None:
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder[0]).certificates(
            [responder[0]]
        )
        return builder.sign(responder[1], hashes.SHA384()).public_bytes(Encoding.DER)
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
    return builder.sign(issuer_key, hashes.SHA384()).public_bytes(Encoding.DER)


def ocsp_responses(
    chain: Sequence[x509.Certificate],
    keys: Mapping[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    this_update: datetime,
    next_update: datetime | None,
    skip_leaf: bool,
    revoked: Iterable[int] = (),
) -> list[bytes]:
    """Responses for every certificate of ``chain`` (leaf first, root last) below the root, the
    leaf too unless ``skip_leaf``; ``keys`` maps each issuer to its key; serials in ``revoked``
    are answered REVOKED."""
    bad = set(revoked)
    out = []
    for i in range(1 if skip_leaf else 0, len(chain) - 1):
        cert, issuer = chain[i], chain[i + 1]
        out.append(
            ocsp_response(
                cert,
                issuer,
                keys[issuer],
                this_update=this_update,
                next_update=next_update,
                revoked=cert.serial_number in bad,
            )
        )
    return out


def amd_crl(
    ark: x509.Certificate,
    ark_key: rsa.RSAPrivateKey,
    *,
    last_update: datetime,
    next_update: datetime,
    revoked: Iterable[int] = (),
) -> bytes:
    """A DER CRL issued by the ARK (RSASSA-PSS / SHA-384 / salt 48, as AMD's), listing ``revoked``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ark.subject)
        .last_update(last_update)
        .next_update(next_update)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last_update).build()
        )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    return builder.sign(ark_key, hashes.SHA384(), rsa_padding=pss).public_bytes(Encoding.DER)
