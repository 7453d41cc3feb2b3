"""Minimal DER reading for the vendor certificate extensions ``cryptography`` leaves opaque.

NVIDIA's DICE TcbInfo (FWID) and Intel's SGX PCK extension are DER structures
inside an X.509 extension; these two pure functions split one nesting level
into ``(tag, content)`` pairs and decode an OBJECT IDENTIFIER. Every malformed
encoding is a :class:`MalformedInputError` naming ``what`` was being read.
"""

from __future__ import annotations

from veil.attestation.errors import MalformedInputError

__all__ = ["der_items", "oid_text"]


def der_items(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """The DER TLVs of ``data`` at one nesting level, as ``(tag, content)``."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise MalformedInputError(f"{what}: truncated DER header")
        tag, first = data[pos], data[pos + 1]
        if tag & 0x1F == 0x1F:
            raise MalformedInputError(f"{what}: multi-byte DER tags are not used here")
        pos += 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or pos + n > len(data):
                raise MalformedInputError(f"{what}: bad DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise MalformedInputError(f"{what}: DER value runs past its container")
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def oid_text(value: bytes, what: str) -> str:
    """The dotted text of an OBJECT IDENTIFIER's content bytes."""
    if not value:
        raise MalformedInputError(f"{what}: empty OID")
    if value[-1] & 0x80:
        raise MalformedInputError(f"{what}: truncated OID")
    arcs: list[int] = []
    acc = 0
    for byte in value:
        acc = (acc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(acc)
            acc = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])
