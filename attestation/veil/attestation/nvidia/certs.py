"""X.509 plumbing shared by the NVIDIA verifiers: pinned roots, chain checks, DICE TcbInfo FWID.

Pure functions over ``cryptography`` certificates; results that do not depend on the time are
cached, so a chain seen before costs nothing to re-check.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from veil.attestation.certificates import load_certificates
from veil.attestation.der import der_items, oid_text
from veil.attestation.errors import CollateralError, MalformedInputError

__all__ = [
    "NVIDIA_DEVICE_ROOT_SHA256",
    "NVIDIA_RIM_ROOT_SHA256",
    "TCB_INFO_OID",
    "cert_name",
    "chain_problem",
    "encode_tcb_info_fwid",
    "find_extension",
    "leaf_fwid",
    "leaf_problem",
    "load_cert_chain",
    "nvidia_device_root",
    "nvidia_rim_root",
    "validity_problem",
]

NVIDIA_DEVICE_ROOT_SHA256 = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
"""SHA-256 of the DER of the NVIDIA Device Identity CA (GPUs and NVSwitches share it)."""
NVIDIA_RIM_ROOT_SHA256 = "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1"
"""SHA-256 of the DER of the NVIDIA CoRIM signing Root CA (signs the RIM chains)."""
TCB_INFO_OID = x509.ObjectIdentifier("2.23.133.5.4.1")
_SHA384_OID = "2.16.840.1.101.3.4.2.2"
_KNOWN_CRITICAL = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.CERTIFICATE_POLICIES,
    TCB_INFO_OID,
    x509.ObjectIdentifier("2.23.133.5.4.4"),  # DICE UEID
    x509.ObjectIdentifier("2.23.133.5.4.5"),  # DICE MultiTcbInfo
}


def _pinned_root(file: str, sha256: str) -> x509.Certificate:
    pem = resources.files("veil.attestation").joinpath(f"roots/{file}").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    if cert.fingerprint(hashes.SHA256()).hex() != sha256:
        raise CollateralError(f"shipped root {file} does not match its pinned SHA-256")
    return cert


@functools.cache
def nvidia_device_root() -> x509.Certificate:
    """The pinned NVIDIA Device Identity CA (``roots/nvidia_device_root.pem``), SHA-256 checked."""
    return _pinned_root("nvidia_device_root.pem", NVIDIA_DEVICE_ROOT_SHA256)


@functools.cache
def nvidia_rim_root() -> x509.Certificate:
    """The pinned NVIDIA CoRIM signing Root CA (``roots/nvidia_rim_root.pem``), SHA-256 checked."""
    return _pinned_root("nvidia_rim_root.pem", NVIDIA_RIM_ROOT_SHA256)


@functools.lru_cache(maxsize=256)
def load_cert_chain(data: bytes) -> tuple[x509.Certificate, ...]:
    """A PEM bundle (leaf first) or one DER certificate, fully decoded, parsed once and cached."""
    return tuple(load_certificates(data))


def cert_name(cert: x509.Certificate) -> str:
    """The subject's common name (or the whole subject)."""
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def find_extension(
    cert: x509.Certificate, oid: x509.ObjectIdentifier
) -> x509.Extension[x509.ExtensionType] | None:
    """The extension, or None when absent or undecodable."""
    try:
        return cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except ValueError:
        return None


def _is_ca(cert: x509.Certificate) -> tuple[bool, int | None]:
    ext = find_extension(cert, ExtensionOID.BASIC_CONSTRAINTS)
    if ext is None or not isinstance(ext.value, x509.BasicConstraints):
        return False, None
    return ext.value.ca, ext.value.path_length


def _critical_problem(cert: x509.Certificate) -> str | None:
    try:
        exts = list(cert.extensions)
    except ValueError as exc:
        return f"{cert_name(cert)}: extensions do not parse ({exc})"
    for e in exts:
        if e.critical and e.oid not in _KNOWN_CRITICAL:
            return f"{cert_name(cert)}: unsupported critical extension {e.oid.dotted_string}"
    return None


@functools.lru_cache(maxsize=512)
def chain_problem(chain: tuple[x509.Certificate, ...], root: x509.Certificate) -> str | None:
    """Why ``chain`` (leaf first, ending at ``root``) is not a valid issuance chain, or None."""
    if len(chain) < 2:
        return "certificate chain must have at least the root CA and the signing certificate"
    if chain[-1] != root:
        if chain[-1].issuer != root.subject:
            return (
                f"chain does not end at the trusted root ({cert_name(root)}); last is {cert_name(chain[-1])}"
            )
        chain = (*chain, root)
    for i, cert in enumerate(chain):
        if (problem := _critical_problem(cert)) is not None:
            return problem
        if i + 1 == len(chain):
            break
        issuer = chain[i + 1]
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return f"{cert_name(cert)} is not issued by {cert_name(issuer)}"
        ca, path_len = _is_ca(issuer)
        if not ca:
            return f"{cert_name(issuer)} signs certificates but is not a CA"
        ku = find_extension(issuer, ExtensionOID.KEY_USAGE)
        if ku is not None and isinstance(ku.value, x509.KeyUsage) and not ku.value.key_cert_sign:
            return f"{cert_name(issuer)} lacks the keyCertSign key usage"
        intermediates_below = sum(1 for c in chain[1 : i + 1] if _is_ca(c)[0])
        if path_len is not None and intermediates_below > path_len:
            return f"{cert_name(issuer)} path length {path_len} exceeded"
    return None


def validity_problem(certs: Sequence[x509.Certificate], now: datetime) -> str | None:
    for cert in certs:
        if now < cert.not_valid_before_utc:
            return f"{cert_name(cert)} not valid before {cert.not_valid_before_utc.isoformat()}"
        if now > cert.not_valid_after_utc:
            return f"{cert_name(cert)} expired {cert.not_valid_after_utc.isoformat()}"
    return None


def leaf_problem(leaf: x509.Certificate) -> str | None:
    if _is_ca(leaf)[0]:
        return f"leaf {cert_name(leaf)} is a CA certificate, not the device's signing key"
    ku = find_extension(leaf, ExtensionOID.KEY_USAGE)
    if ku is not None and isinstance(ku.value, x509.KeyUsage) and not ku.value.digital_signature:
        return f"leaf {cert_name(leaf)} lacks the digitalSignature key usage"
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return f"leaf {cert_name(leaf)} key is not EC P-384"
    return None


def _fwid_entry(content: bytes) -> bytes | None:
    """``FWID ::= SEQUENCE { hashAlg OID, digest OCTET STRING }`` → the SHA-384 digest."""
    items = der_items(content, "FWID")
    if (
        len(items) == 2
        and items[0][0] == 0x06
        and items[1][0] == 0x04
        and oid_text(items[0][1], "FWID") == _SHA384_OID
    ):
        return items[1][1]
    return None


def leaf_fwid(cert: x509.Certificate) -> bytes | None:
    """The SHA-384 FWID in the certificate's DICE TcbInfo extension, or None if it has none.

    Accepts the TCG ``DiceTcbInfo`` (``fwids [6]``) and NVIDIA's encoding, in which the FWID
    ``SEQUENCE { sha384, OCTET STRING }`` is a direct member of the extension's SEQUENCE.
    Raises :class:`MalformedInputError` when the extension is present but does not decode.
    """
    ext = find_extension(cert, TCB_INFO_OID)
    if ext is None:
        return None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()
    outer = der_items(raw, "TcbInfo")
    if len(outer) != 1 or outer[0][0] != 0x30:
        raise MalformedInputError("TcbInfo extension is not one SEQUENCE")
    found: list[bytes] = []
    for tag, content in der_items(outer[0][1], "TcbInfo"):
        if tag == 0x30 and (digest := _fwid_entry(content)) is not None:
            found.append(digest)
        elif tag == 0xA6:  # DiceTcbInfo fwids [6] IMPLICIT SEQUENCE OF FWID
            for sub_tag, sub in der_items(content, "TcbInfo"):
                if sub_tag == 0x30 and (digest := _fwid_entry(sub)) is not None:
                    found.append(digest)
    if len(found) != 1:
        raise MalformedInputError(f"TcbInfo extension holds {len(found)} SHA-384 FWIDs, expected 1")
    return found[0]


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def encode_tcb_info_fwid(fwid: bytes) -> bytes:
    """DER of a TCG ``DiceTcbInfo`` carrying one SHA-384 FWID, for a simulated leaf certificate::

    leaf_builder.add_extension(x509.UnrecognizedExtension(TCB_INFO_OID, encode_tcb_info_fwid(f)), False)
    """
    if len(fwid) != 48:
        raise MalformedInputError("FWID must be a 48-byte SHA-384 digest")
    sha384 = bytes.fromhex("0609608648016503040202")
    entry = _der(0x30, sha384 + _der(0x04, fwid))
    return _der(0x30, _der(0xA6, entry))
