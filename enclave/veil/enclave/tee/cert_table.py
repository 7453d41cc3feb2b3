"""The SEV-SNP certificate table (GHCB extended guest request): GUID-keyed DER certificates.

What ``/sys/kernel/config/tsm/report/<entry>/auxblob`` and ``SNP_GET_EXT_REPORT`` return: an
array of ``{guid (16 bytes, little-endian fields), offset u32, length u32}`` entries ended by an
all-zero entry; each offset/length points into the same buffer at a DER certificate. Pure.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.enclave.errors import AttestationProviderError

__all__ = ["ARK_GUID", "ASK_GUID", "VCEK_GUID", "VLEK_GUID", "build_cert_table", "cert_table_to_pem"]

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_ENTRY = struct.Struct("<16sII")
_ORDER = (VLEK_GUID, VCEK_GUID, ASK_GUID, ARK_GUID)  # leaf first, as Evidence.cpu_cert_chain wants


def parse_cert_table(table: bytes) -> dict[uuid.UUID, bytes]:
    """GUID → DER bytes; raises :class:`AttestationProviderError` for a truncated or bad table."""
    out: dict[uuid.UUID, bytes] = {}
    pos = 0
    while True:
        if pos + _ENTRY.size > len(table):
            raise AttestationProviderError("SNP certificate table is truncated (no terminating entry)")
        raw_guid, offset, length = _ENTRY.unpack_from(table, pos)
        pos += _ENTRY.size
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            return out
        if offset + length > len(table) or length == 0:
            raise AttestationProviderError("SNP certificate table entry points outside the table")
        out[uuid.UUID(bytes_le=raw_guid)] = table[offset : offset + length]


def cert_table_to_pem(table: bytes) -> bytes:
    """The VCEK (or VLEK), ASK and ARK of a certificate table as one PEM chain, leaf first."""
    entries = parse_cert_table(table)
    if VCEK_GUID not in entries and VLEK_GUID not in entries:
        raise AttestationProviderError("SNP certificate table holds neither a VCEK nor a VLEK")
    pem = b""
    for guid in _ORDER:
        if guid in entries:
            try:
                pem += x509.load_der_x509_certificate(entries[guid]).public_bytes(Encoding.PEM)
            except ValueError:
                raise AttestationProviderError(f"SNP certificate table entry {guid} is not DER") from None
    return pem


def build_cert_table(certs: Mapping[uuid.UUID, x509.Certificate]) -> bytes:
    """The inverse of :func:`parse_cert_table` (what a host hands the guest; fakes use it)."""
    ders = [(guid, cert.public_bytes(Encoding.DER)) for guid, cert in certs.items()]
    offset = _ENTRY.size * (len(ders) + 1)
    head, body = b"", b""
    for guid, der in ders:
        head += _ENTRY.pack(guid.bytes_le, offset + len(body), len(der))
        body += der
    return head + bytes(_ENTRY.size) + body
