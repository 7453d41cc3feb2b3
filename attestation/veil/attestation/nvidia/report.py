"""NVIDIA GPU / NVSwitch attestation reports: SPDM 1.1 GET_MEASUREMENTS request ‖ MEASUREMENTS response.

Pure parsing and serialisation; no I/O, no cryptographic verification (that is
:mod:`veil.attestation.nvidia.verify`). A report as the NVIDIA driver hands it out is the
37-byte request followed by the signed response::

    request   0  SPDMVersion (0x11)      response 0  SPDMVersion (0x11)
              1  code 0xE0                        1  code 0x60
              2  attributes (bit 0: sig)          2  param1      3  param2 (slot id)
              3  operation (0xFF = all)           4  NumberOfBlocks
              4  nonce (32)                       5  MeasurementRecordLength (3, LE)
             36  slot id                          8  MeasurementRecord (blocks)
                                                  …  responder nonce (32)
                                                  …  OpaqueLength (2, LE) ‖ OpaqueData
                                                  …  signature (96: ECDSA P-384 r ‖ s)

Each measurement block is ``index(1) ‖ spec(1) ‖ size(2, LE) ‖ measurement``; with the DMTF
spec (bit 0) the measurement is ``value_type(1) ‖ value_size(2, LE) ‖ value``. NVIDIA's
opaque data is a list of TLVs ``type(2, LE) ‖ size(2, LE) ‖ data`` (driver version, VBIOS
version, FWID, …). The signature covers request ‖ response up to the signature.

Reports are parsed by structure, not by length: some real ones carry trailing zero bytes
after the signature, which are tolerated (and recorded) but never signed.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from veil.attestation.errors import MalformedInputError, UnsupportedError

__all__ = [
    "DMTF_MEASUREMENT_SPEC",
    "GET_MEASUREMENTS",
    "MEASUREMENTS",
    "NONCE_SIZE",
    "REQUEST_SIZE",
    "SIGNATURE_SIZE",
    "SPDM_VERSION_11",
    "GpuKind",
    "GpuReport",
    "MeasurementBlock",
    "OpaqueData",
    "OpaqueField",
    "OpaqueFieldType",
    "Signer",
    "SpdmMeasurementResponse",
    "SpdmRequest",
    "build_gpu_report",
    "build_request",
    "describe_gpu_report",
    "format_vbios_version",
    "parse_gpu_report",
    "parse_request",
]

SPDM_VERSION_11 = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
NONCE_SIZE = 32
REQUEST_SIZE = 37
SIGNATURE_SIZE = 96
DMTF_MEASUREMENT_SPEC = 0x01
ALL_MEASUREMENTS = 0xFF
_SIGNATURE_REQUESTED = 0x01
_MAX_TRAILING_ZEROS = 16
_MAX_OPAQUE = 1024  # SPDM 1.1: OpaqueLength shall not exceed 1024

GpuKind = Literal["gpu", "nvswitch"]
"""Which device a report comes from: a GPU or an NVSwitch."""
Signer = Callable[[bytes], bytes]
"""Signs ``request ‖ response-without-signature``; returns the 96-byte raw ``r ‖ s``."""


class OpaqueFieldType(enum.IntEnum):
    """NVIDIA opaque-data TLV types (nvtrust ``OpaqueDataParser``)."""

    CERT_ISSUER_NAME = 1
    CERT_AUTHORITY_KEY_IDENTIFIER = 2
    DRIVER_VERSION = 3
    GPU_INFO = 4
    SKU = 5
    VBIOS_VERSION = 6
    MANUFACTURER_ID = 7
    TAMPER_DETECTION = 8
    SMC = 9
    VPR = 10
    NVDEC0_STATUS = 11
    MSRSCNT = 12
    CPRINFO = 13
    BOARD_ID = 14
    CHIP_SKU = 15
    CHIP_SKU_MOD = 16
    PROJECT = 17
    PROJECT_SKU = 18
    PROJECT_SKU_MOD = 19
    FWID = 20
    PROTECTED_PCIE_STATUS = 21
    SWITCH_PDI = 22
    FLOORSWEPT_PORTS = 23
    POSITION_ID = 24
    LOCK_SWITCH_STATUS = 25
    GPU_LINK_CONN = 32
    SYS_ENABLE_STATUS = 33
    OPAQUE_DATA_VERSION = 34
    CHIP_INFO = 35
    FEATURE_FLAG = 36
    INVALID = 255


_TEXT_FIELDS = frozenset(
    {
        OpaqueFieldType.PROJECT,
        OpaqueFieldType.PROJECT_SKU,
        OpaqueFieldType.CHIP_SKU,
    }
)


def _u16(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "little")


def _need(data: bytes, offset: int, size: int, what: str) -> None:
    if size < 0 or offset + size > len(data):
        raise MalformedInputError(
            f"GPU report truncated: {what} needs {size} bytes at offset {offset}, "
            f"only {len(data) - offset} left"
        )


def _ascii_field(data: bytes, what: str) -> str:
    text = data.split(b"\x00", 1)[0]
    if not text or any(b < 0x20 or b > 0x7E for b in text):
        raise MalformedInputError(f"{what} is not printable ASCII")
    return text.decode("ascii")


def format_vbios_version(data: bytes) -> str:
    """The VBIOS version as NVIDIA prints it (``96.00.A5.00.01``).

    GPUs report 8 binary bytes (low 32 bits little-endian, then the OEM byte); NVSwitches
    report the printable string itself.
    """
    if data and all(0x20 <= b <= 0x7E or b == 0 for b in data) and data[:1] != b"\x00":
        return _ascii_field(data, "VBIOS version")
    if len(data) != 8:
        raise MalformedInputError(f"binary VBIOS version must be 8 bytes, got {len(data)}")
    low = int.from_bytes(data[0:4], "little")
    digits = f"{low:08X}{data[4]:02X}"
    return ".".join(digits[i : i + 2] for i in range(0, len(digits), 2))


@dataclass(frozen=True, slots=True)
class SpdmRequest:
    """SPDM GET_MEASUREMENTS request (37 bytes)."""

    version: int
    attributes: int  # Param1; bit 0 = signature requested
    operation: int  # Param2; 0xFF = all measurements
    nonce: bytes
    slot_id: int

    def to_bytes(self) -> bytes:
        return (
            bytes([self.version, GET_MEASUREMENTS, self.attributes, self.operation])
            + self.nonce
            + bytes([self.slot_id])
        )


@dataclass(frozen=True, slots=True)
class MeasurementBlock:
    """One measurement block; ``value`` is the DMTF measurement value (a 48-byte digest on H100)."""

    index: int
    spec: int
    value_type: int
    value: bytes

    def to_bytes(self) -> bytes:
        measurement = bytes([self.value_type]) + struct.pack("<H", len(self.value)) + self.value
        return bytes([self.index, self.spec]) + struct.pack("<H", len(measurement)) + measurement


@dataclass(frozen=True, slots=True)
class OpaqueField:
    type: int
    data: bytes

    @property
    def name(self) -> str:
        try:
            return OpaqueFieldType(self.type).name
        except ValueError:
            return f"UNKNOWN_{self.type}"


@dataclass(frozen=True, slots=True)
class OpaqueData:
    """NVIDIA opaque data: TLVs in report order (a type may repeat; ``get`` returns the first)."""

    fields: tuple[OpaqueField, ...]

    def get(self, field_type: int) -> bytes | None:
        return next((f.data for f in self.fields if f.type == field_type), None)

    def to_bytes(self) -> bytes:
        return b"".join(struct.pack("<HH", f.type, len(f.data)) + f.data for f in self.fields)

    @property
    def driver_version(self) -> str | None:
        data = self.get(OpaqueFieldType.DRIVER_VERSION)
        return None if data is None else _ascii_field(data, "driver version")

    @property
    def vbios_version(self) -> str | None:
        data = self.get(OpaqueFieldType.VBIOS_VERSION)
        return None if data is None else format_vbios_version(data)

    @property
    def fwid(self) -> bytes | None:
        return self.get(OpaqueFieldType.FWID)

    def text(self, field_type: int) -> str | None:
        """A NUL-terminated ASCII field (project, SKU, chip SKU, …), decoded."""
        data = self.get(field_type)
        return None if data is None else _ascii_field(data, OpaqueFieldType(field_type).name)

    @property
    def msr_counts(self) -> tuple[int, ...]:
        data = self.get(OpaqueFieldType.MSRSCNT) or b""
        if len(data) % 4:
            raise MalformedInputError("MSRSCNT length is not a multiple of 4")
        return tuple(int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4))

    def to_json(self) -> dict[str, str]:
        return {f.name.lower(): f.data.hex() for f in self.fields}


@dataclass(frozen=True, slots=True)
class SpdmMeasurementResponse:
    """SPDM MEASUREMENTS response, signature included."""

    version: int
    param1: int
    param2: int
    blocks: tuple[MeasurementBlock, ...]
    nonce: bytes  # responder nonce
    opaque: OpaqueData
    signature: bytes

    def unsigned_bytes(self) -> bytes:
        record = b"".join(b.to_bytes() for b in self.blocks)
        opaque = self.opaque.to_bytes()
        return (
            bytes([self.version, MEASUREMENTS, self.param1, self.param2, len(self.blocks)])
            + len(record).to_bytes(3, "little")
            + record
            + self.nonce
            + struct.pack("<H", len(opaque))
            + opaque
        )

    def to_bytes(self) -> bytes:
        return self.unsigned_bytes() + self.signature

    def measurement(self, index: int) -> bytes | None:
        """The value of the block with SPDM index ``index`` (1-based), or None."""
        return next((b.value for b in self.blocks if b.index == index), None)


@dataclass(frozen=True, slots=True)
class GpuReport:
    """A parsed GPU / NVSwitch report. ``signed_bytes`` is exactly what the signature covers."""

    request: SpdmRequest
    response: SpdmMeasurementResponse
    raw: bytes
    signed_bytes: bytes
    signature: bytes
    trailing: bytes = b""

    @property
    def nonce(self) -> bytes:
        """The requester's nonce (bytes 4..36 of the request), the one a verifier compares."""
        return self.request.nonce

    @property
    def opaque(self) -> OpaqueData:
        return self.response.opaque

    @property
    def measurements(self) -> dict[int, bytes]:
        """SPDM index (1-based) → measurement value."""
        return {b.index: b.value for b in self.response.blocks}


def _safe(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except MalformedInputError as exc:
        return f"<malformed: {exc}>"


def describe_gpu_report(report: GpuReport) -> dict[str, object]:
    """Every field of a report, decoded and named (JSON-ready), for ``veil attest show``."""
    opaque = report.opaque
    fields: list[dict[str, object]] = []
    for f in opaque.fields:
        entry: dict[str, object] = {"type": f.type, "name": f.name, "size": len(f.data), "hex": f.data.hex()}
        if f.type == OpaqueFieldType.DRIVER_VERSION:
            entry["value"] = _safe(lambda: opaque.driver_version)
        elif f.type == OpaqueFieldType.VBIOS_VERSION:
            entry["value"] = _safe(lambda: opaque.vbios_version)
        elif f.type == OpaqueFieldType.MSRSCNT:
            entry["value"] = _safe(lambda: list(opaque.msr_counts))
        elif f.type in _TEXT_FIELDS:
            entry["value"] = _safe(lambda t=f.type: opaque.text(t))  # type: ignore[misc]
        fields.append(entry)
    req, resp = report.request, report.response
    return {
        "request": {
            "spdm_version": f"{req.version >> 4}.{req.version & 0xF}",
            "attributes": req.attributes,
            "signature_requested": bool(req.attributes & _SIGNATURE_REQUESTED),
            "measurement_operation": req.operation,
            "nonce": req.nonce.hex(),
            "slot_id": req.slot_id,
        },
        "response": {
            "spdm_version": f"{resp.version >> 4}.{resp.version & 0xF}",
            "param1": resp.param1,
            "param2": resp.param2,
            "number_of_blocks": len(resp.blocks),
            "measurements": [
                {"index": b.index, "spec": b.spec, "value_type": b.value_type, "value": b.value.hex()}
                for b in resp.blocks
            ],
            "responder_nonce": resp.nonce.hex(),
            "opaque_data": fields,
            "signature": report.signature.hex(),
        },
        "signed_length": len(report.signed_bytes),
        "trailing_zero_bytes": len(report.trailing),
    }


def parse_request(data: bytes) -> SpdmRequest:
    """Parse a 37-byte SPDM 1.1 GET_MEASUREMENTS request (extra bytes are the caller's)."""
    _need(data, 0, REQUEST_SIZE, "GET_MEASUREMENTS request")
    if data[0] != SPDM_VERSION_11:
        raise UnsupportedError(f"SPDM version 0x{data[0]:02x} not supported (only 1.1)")
    if data[1] != GET_MEASUREMENTS:
        raise MalformedInputError(f"request code 0x{data[1]:02x} is not GET_MEASUREMENTS (0xE0)")
    if not data[2] & _SIGNATURE_REQUESTED:
        raise UnsupportedError("GET_MEASUREMENTS request did not ask for a signature")
    return SpdmRequest(data[0], data[2], data[3], bytes(data[4:36]), data[36])


def _parse_blocks(record: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    blocks: list[MeasurementBlock] = []
    offset = 0
    while offset < len(record):
        _need(record, offset, 4, "measurement block header")
        index, spec, size = record[offset], record[offset + 1], _u16(record, offset + 2)
        _need(record, offset + 4, size, f"measurement block {index}")
        body = record[offset + 4 : offset + 4 + size]
        if not spec & DMTF_MEASUREMENT_SPEC:
            raise UnsupportedError(f"measurement block {index}: specification 0x{spec:02x} is not DMTF")
        if size < 3 or _u16(body, 1) != size - 3:
            raise MalformedInputError(f"measurement block {index}: DMTF value size does not match block size")
        if any(b.index == index for b in blocks):
            raise MalformedInputError(f"measurement block index {index} repeats")
        blocks.append(MeasurementBlock(index, spec, body[0], bytes(body[3:])))
        offset += 4 + size
    if len(blocks) != count:
        raise MalformedInputError(f"NumberOfBlocks says {count}, record holds {len(blocks)}")
    return tuple(blocks)


def _parse_opaque(data: bytes) -> OpaqueData:
    fields: list[OpaqueField] = []
    offset = 0
    while offset < len(data):
        _need(data, offset, 4, "opaque TLV header")
        kind, size = _u16(data, offset), _u16(data, offset + 2)
        _need(data, offset + 4, size, f"opaque field {kind}")
        fields.append(OpaqueField(kind, bytes(data[offset + 4 : offset + 4 + size])))
        offset += 4 + size
    return OpaqueData(tuple(fields))


def parse_gpu_report(data: bytes) -> GpuReport:
    """Parse request ‖ response by structure.

    Raises :class:`MalformedInputError` (or :class:`UnsupportedError`) for anything that does not
    parse: truncation, inconsistent lengths, a non-1.1 version, non-zero bytes after the signature.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedInputError("GPU report must be bytes")
    data = bytes(data)
    request = parse_request(data)
    r = data[REQUEST_SIZE:]
    _need(r, 0, 8, "MEASUREMENTS response header")
    if r[0] != request.version:
        raise MalformedInputError(f"response SPDM version 0x{r[0]:02x} differs from the request's")
    if r[1] != MEASUREMENTS:
        raise MalformedInputError(f"response code 0x{r[1]:02x} is not MEASUREMENTS (0x60)")
    if r[3] & 0x0F != request.slot_id & 0x0F:
        raise MalformedInputError(f"response slot {r[3] & 0x0F} differs from the requested {request.slot_id}")
    count, record_len = r[4], int.from_bytes(r[5:8], "little")
    _need(r, 8, record_len, "measurement record")
    blocks = _parse_blocks(r[8 : 8 + record_len], count)
    offset = 8 + record_len
    _need(r, offset, NONCE_SIZE + 2, "responder nonce and opaque length")
    nonce = r[offset : offset + NONCE_SIZE]
    opaque_len = _u16(r, offset + NONCE_SIZE)
    offset += NONCE_SIZE + 2
    if opaque_len > _MAX_OPAQUE:
        raise MalformedInputError(f"OpaqueLength {opaque_len} exceeds SPDM's 1024")
    _need(r, offset, opaque_len, "opaque data")
    opaque = _parse_opaque(r[offset : offset + opaque_len])
    offset += opaque_len
    _need(r, offset, SIGNATURE_SIZE, "signature")
    signature = r[offset : offset + SIGNATURE_SIZE]
    trailing = r[offset + SIGNATURE_SIZE :]
    if len(trailing) > _MAX_TRAILING_ZEROS or any(trailing):
        raise MalformedInputError(f"{len(trailing)} unexpected bytes after the signature")
    response = SpdmMeasurementResponse(r[0], r[2], r[3], blocks, nonce, opaque, signature)
    signed = data[: REQUEST_SIZE + offset]
    return GpuReport(request, response, data, signed, signature, trailing)


def build_request(nonce: bytes, *, operation: int = ALL_MEASUREMENTS, slot_id: int = 0) -> bytes:
    """A GET_MEASUREMENTS request for ``nonce`` (32 bytes) with the signature requested."""
    if len(nonce) != NONCE_SIZE:
        raise MalformedInputError(f"SPDM nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return SpdmRequest(SPDM_VERSION_11, _SIGNATURE_REQUESTED, operation, bytes(nonce), slot_id).to_bytes()


def _opaque_fields(
    opaque: OpaqueData | Mapping[int, bytes] | Iterable[tuple[int, bytes]],
) -> OpaqueData:
    if isinstance(opaque, OpaqueData):
        return opaque
    items = opaque.items() if isinstance(opaque, Mapping) else opaque
    fields = tuple(OpaqueField(int(k), bytes(v)) for k, v in items)
    if any(not 0 <= f.type <= 0xFFFF or len(f.data) > 0xFFFF for f in fields):
        raise MalformedInputError("opaque field type or length out of range")
    return OpaqueData(fields)


def build_gpu_report(
    *,
    nonce: bytes,
    measurements: Sequence[bytes] | Mapping[int, bytes],
    opaque: OpaqueData | Mapping[int, bytes] | Iterable[tuple[int, bytes]],
    responder_nonce: bytes,
    sign: Signer,
    value_type: int = 0x01,
    slot_id: int = 0,
    trailing: bytes = b"",
) -> bytes:
    """Serialise a signed report: request(nonce) ‖ MEASUREMENTS response ‖ signature.

    ``measurements`` is a sequence (SPDM indices 1, 2, …) or a mapping index → value.
    ``opaque`` gives the TLVs (e.g. ``{OpaqueFieldType.DRIVER_VERSION: b"590.12\\0", ...}``).
    ``sign`` receives exactly the bytes a verifier checks and returns a 96-byte ``r ‖ s``
    (see :func:`veil.attestation.nvidia.verify.p384_signer`). Used by the simulated GPU
    provider and by tests; real reports come from the hardware.
    """
    request = build_request(nonce, slot_id=slot_id)
    if len(responder_nonce) != NONCE_SIZE:
        raise MalformedInputError(f"responder nonce must be {NONCE_SIZE} bytes")
    items = (
        sorted(measurements.items())
        if isinstance(measurements, Mapping)
        else list(enumerate(measurements, start=1))
    )
    if not 0 < len(items) <= 255 or any(not 1 <= i <= 254 for i, _ in items):
        raise MalformedInputError("measurement indices must be 1..254, at most 255 blocks")
    if any(len(v) > 0xFFFF - 3 for _, v in items):
        raise MalformedInputError("a measurement value is too long for a block")
    blocks = tuple(MeasurementBlock(i, DMTF_MEASUREMENT_SPEC, value_type, bytes(v)) for i, v in items)
    fields = _opaque_fields(opaque)
    if len(fields.to_bytes()) > _MAX_OPAQUE:
        raise MalformedInputError("opaque data longer than 1024 bytes")
    response = SpdmMeasurementResponse(
        SPDM_VERSION_11, 0, slot_id, blocks, bytes(responder_nonce), fields, b""
    )
    unsigned = response.unsigned_bytes()
    signature = sign(request + unsigned)
    if len(signature) != SIGNATURE_SIZE:
        raise MalformedInputError(f"signer returned {len(signature)} bytes, expected {SIGNATURE_SIZE}")
    if any(trailing):
        raise MalformedInputError("trailing bytes must be zeros")
    return request + unsigned + signature + trailing
