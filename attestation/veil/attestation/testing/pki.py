"""What every fake authority needs: DER scraps, names, CA/leaf extensions, keys as PEM.

Shared by the fake AMD (:mod:`~veil.attestation.testing.snp`) and NVIDIA
(:mod:`~veil.attestation.testing.nvidia`) authorities, and through them by the simulated
TEE, which saves and reloads its keys with :func:`private_key_pem` / :func:`load_private_key`.
Pure: no I/O.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "PrivateKey",
    "PublicKey",
    "ca_key_usage",
    "der",
    "der_ia5",
    "der_int",
    "der_octets",
    "ext",
    "key_identifiers",
    "leaf_key_usage",
    "load_private_key",
    "pem",
    "private_key_pem",
    "spki_der",
]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def der(tag: int, body: bytes) -> bytes:
    """One DER TLV (definite length, short or long form)."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def der_int(n: int) -> bytes:
    """A non-negative DER INTEGER."""
    return der(0x02, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big"))


def der_ia5(s: str) -> bytes:
    return der(0x16, s.encode("ascii"))


def der_octets(b: bytes) -> bytes:
    return der(0x04, b)


def ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    """An extension with a hand-made DER value (vendor OIDs ``cryptography`` does not know)."""
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def ca_key_usage() -> x509.KeyUsage:
    """keyCertSign + cRLSign."""
    return _key_usage(ca=True)


def leaf_key_usage() -> x509.KeyUsage:
    """digitalSignature only."""
    return _key_usage(ca=False)


def key_identifiers(
    public_key: PublicKey, issuer_public_key: PublicKey
) -> tuple[x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier]:
    """SubjectKeyIdentifier of ``public_key`` and AuthorityKeyIdentifier of its issuer."""
    return (
        x509.SubjectKeyIdentifier.from_public_key(public_key),
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key),
    )


def spki_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem(*certs: x509.Certificate) -> bytes:
    """A PEM bundle of ``certs``, in order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(data: bytes) -> PrivateKey:
    """An RSA or EC private key from PEM; ``ValueError`` for anything else.

    Skips OpenSSL's slow RSA consistency check: callers compare the public half with the
    certificate it belongs to.
    """
    key = serialization.load_pem_private_key(data, None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"not an RSA or EC private key: {type(key).__name__}")
    return key
