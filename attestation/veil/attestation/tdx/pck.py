"""The Intel SGX extension of a PCK certificate (OID 1.2.840.113741.1.13.1).

It names the platform the PCK key belongs to: PPID, the TCB it was issued for
(16 CPU SVN components, PCE SVN, raw CPUSVN), PCE id, FMSPC and SGX type, plus
platform-instance fields on multi-package platforms. The collateral appraisal
matches FMSPC / PCE id against the TCB info and the TCB components against its
TCB levels. A few lines of DER reading suffice; ``cryptography`` exposes the
extension value as raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from veil.attestation.der import der_items, oid_text
from veil.attestation.errors import MalformedInputError

__all__ = ["SGX_EXTENSION_OID", "PckExtensions", "parse_pck_extensions", "parse_sgx_extension"]

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_PPID = SGX_EXTENSION_OID + ".1"
_TCB = SGX_EXTENSION_OID + ".2"
_PCESVN = _TCB + ".17"
_CPUSVN = _TCB + ".18"
_PCEID = SGX_EXTENSION_OID + ".3"
_FMSPC = SGX_EXTENSION_OID + ".4"
_SGX_TYPE = SGX_EXTENSION_OID + ".5"
_PLATFORM_INSTANCE_ID = SGX_EXTENSION_OID + ".6"
_CONFIGURATION = SGX_EXTENSION_OID + ".7"

_SEQUENCE = 0x30
_OID = 0x06
_INTEGER = 0x02
_ENUMERATED = 0x0A
_OCTET_STRING = 0x04
_BOOLEAN = 0x01


@dataclass(frozen=True, slots=True)
class PckExtensions:
    """What the PCK leaf says about its platform."""

    ppid: bytes
    tcb_components: tuple[int, ...]
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None
    dynamic_platform: bool | None
    cached_keys: bool | None
    smt_enabled: bool | None


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    return der_items(data, "PCK SGX extension")


def _entries(seq_value: bytes) -> dict[str, tuple[int, bytes]]:
    """A SEQUENCE OF SEQUENCE {OID, value} as {oid: (tag, value)}."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, value in _tlvs(seq_value):
        if tag != _SEQUENCE:
            raise MalformedInputError("PCK SGX extension: entry is not a SEQUENCE")
        parts = _tlvs(value)
        if len(parts) != 2 or parts[0][0] != _OID:
            raise MalformedInputError("PCK SGX extension: entry is not {OID, value}")
        out[oid_text(parts[0][1], "PCK SGX extension")] = parts[1]
    return out


def _need(entries: dict[str, tuple[int, bytes]], oid: str, tag: int) -> bytes:
    if oid not in entries:
        raise MalformedInputError(f"PCK SGX extension lacks {oid}")
    got, value = entries[oid]
    if got != tag:
        raise MalformedInputError(f"PCK SGX extension: {oid} has DER tag {got:#x}, expected {tag:#x}")
    return value


def _uint(value: bytes, what: str) -> int:
    if not value or value[0] & 0x80:
        raise MalformedInputError(f"PCK SGX extension: {what} is not a non-negative integer")
    return int.from_bytes(value, "big")


def _bool(entries: dict[str, tuple[int, bytes]], oid: str) -> bool | None:
    if oid not in entries:
        return None
    value = _need(entries, oid, _BOOLEAN)
    if len(value) != 1:
        raise MalformedInputError(f"PCK SGX extension: {oid} is not a BOOLEAN")
    return value != b"\x00"


def parse_pck_extensions(cert: x509.Certificate) -> PckExtensions:
    """Read the SGX extension of a PCK leaf certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
    except x509.ExtensionNotFound:
        raise MalformedInputError("PCK certificate has no Intel SGX extension") from None
    except ValueError as exc:
        raise MalformedInputError(f"PCK certificate extensions do not parse: {exc}") from None
    if not isinstance(ext.value, x509.UnrecognizedExtension):
        raise MalformedInputError("PCK certificate SGX extension has an unexpected type")
    return parse_sgx_extension(ext.value.value)


def parse_sgx_extension(der: bytes) -> PckExtensions:
    """Decode the DER value of the SGX extension."""
    outer = _tlvs(der)
    if len(outer) != 1 or outer[0][0] != _SEQUENCE:
        raise MalformedInputError("PCK SGX extension is not one SEQUENCE")
    top = _entries(outer[0][1])
    tcb = _entries(_need(top, _TCB, _SEQUENCE))
    components = tuple(_uint(_need(tcb, f"{_TCB}.{i}", _INTEGER), f"TCB component {i}") for i in range(1, 17))
    if any(c > 255 for c in components):
        raise MalformedInputError("PCK SGX extension: a TCB component exceeds one byte")
    cpu_svn = _need(tcb, _CPUSVN, _OCTET_STRING)
    pce_id = _need(top, _PCEID, _OCTET_STRING)
    fmspc = _need(top, _FMSPC, _OCTET_STRING)
    if len(cpu_svn) != 16 or len(pce_id) != 2 or len(fmspc) != 6:
        raise MalformedInputError("PCK SGX extension: CPUSVN, PCE id or FMSPC has the wrong length")
    config = _entries(_need(top, _CONFIGURATION, _SEQUENCE)) if _CONFIGURATION in top else {}
    return PckExtensions(
        ppid=_need(top, _PPID, _OCTET_STRING),
        tcb_components=components,
        pce_svn=_uint(_need(tcb, _PCESVN, _INTEGER), "PCESVN"),
        cpu_svn=cpu_svn,
        pce_id=pce_id,
        fmspc=fmspc,
        sgx_type=_uint(_need(top, _SGX_TYPE, _ENUMERATED), "SGX type"),
        platform_instance_id=(
            _need(top, _PLATFORM_INSTANCE_ID, _OCTET_STRING) if _PLATFORM_INSTANCE_ID in top else None
        ),
        dynamic_platform=_bool(config, _CONFIGURATION + ".1"),
        cached_keys=_bool(config, _CONFIGURATION + ".2"),
        smt_enabled=_bool(config, _CONFIGURATION + ".3"),
    )
