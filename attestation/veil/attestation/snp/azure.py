"""Azure confidential VMs (SEV-SNP): the HCL report and the vTPM quote.

On an Azure CVM the guest never sees ``/dev/sev-guest``; the paravisor (HCL)
requests the SNP report and publishes an *HCL report* in vTPM NV index 0x01400001::

    0x000  attestation header (32 B): "HCLA", version, report_size, request_type, status, reserved
    0x020  hardware report (1184 B): the SEV-SNP ATTESTATION_REPORT (or a TDX TD report)
    0x4C0  IGVM request data (20 B): data_size, version, report_type (2 SNP, 4 TDX),
           report_data_hash_type (1 SHA-256, 2 SHA-384, 3 SHA-512), variable_data_size
    0x4D4  variable data: JSON with the vTPM attestation key ("HCLAkPub" JWK), the
           VM configuration and optional "user-data"

The hardware signs ``report_data[0:n] = H(variable data)`` (rest zero), which binds
the attestation key to the SNP report; the vTPM then signs a ``TPM2_Quote``
(``TPMS_ATTEST``, big-endian) with that key: RSASSA-PKCS1-v1_5 / SHA-256 over the
TPMS_ATTEST bytes. The quote carries the caller's nonce (``extraData``) and the
SHA-256 digest of the selected PCR values.

This module parses (pure, no trust); :mod:`veil.attestation.snp.azure_verify` verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.attestation.errors import MalformedInputError, UnsupportedError
from veil.attestation.snp.certs import load_certificates
from veil.attestation.snp.report import REPORT_SIZE

__all__ = [
    "AzureSnpEvidence",
    "HclReport",
    "PcrSelection",
    "RuntimeData",
    "TpmQuote",
    "TpmsAttest",
    "parse_azure_evidence_json",
    "parse_hcl_report",
    "parse_runtime_data",
    "parse_tpms_attest",
    "tpms_attest_to_dict",
]

HCL_HEADER_SIZE = 32
HCL_HW_REPORT_SIZE = 1184
IGVM_REQUEST_DATA_SIZE = 20
VAR_DATA_OFFSET = HCL_HEADER_SIZE + HCL_HW_REPORT_SIZE + IGVM_REQUEST_DATA_SIZE
REPORT_TYPE_SNP = 2
REPORT_TYPE_TDX = 4
TD_REPORT_SIZE = 1024
_HASH_TYPES = {1: hashlib.sha256, 2: hashlib.sha384, 3: hashlib.sha512}
_HASH_NAMES = {1: "SHA-256", 2: "SHA-384", 3: "SHA-512"}
_MAX_HCL_SIZE = 64 * 1024
AK_KEY_ID = "HCLAkPub"

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B
PCR_COUNT = 24


@dataclass(frozen=True, slots=True)
class HclReport:
    """A parsed HCL report (see the module docstring for the layout)."""

    version: int
    report_size: int
    request_type: int
    status: int
    hw_report: bytes
    igvm_version: int
    report_type: int
    report_data_hash_type: int
    variable_data: bytes
    raw: bytes

    @property
    def snp_report_bytes(self) -> bytes:
        """The 0x4A0-byte SEV-SNP report; :class:`UnsupportedError` for a TDX HCL report."""
        if self.report_type != REPORT_TYPE_SNP:
            raise UnsupportedError(f"HCL report type {self.report_type} is not SEV-SNP")
        return self.hw_report[:REPORT_SIZE]

    @property
    def td_report_bytes(self) -> bytes:
        """The 1024-byte TDX TD report of a TDX HCL report."""
        if self.report_type != REPORT_TYPE_TDX:
            raise UnsupportedError(f"HCL report type {self.report_type} is not TDX")
        return self.hw_report[:TD_REPORT_SIZE]

    def to_dict(self) -> dict[str, object]:
        """The header and IGVM fields, JSON-ready (the hardware report and var_data as hex / text)."""
        return {
            "version": self.version,
            "report_size": self.report_size,
            "request_type": self.request_type,
            "status": self.status,
            "igvm_version": self.igvm_version,
            "report_type": {REPORT_TYPE_SNP: "SEV-SNP", REPORT_TYPE_TDX: "TDX"}[self.report_type],
            "report_data_hash_type": _HASH_NAMES[self.report_data_hash_type],
            "variable_data": self.variable_data.decode("utf-8", "replace"),
            "hw_report": self.hw_report.hex(),
        }

    @property
    def hash_name(self) -> str:
        """The name of the hash that binds the variable data (``"SHA-256"``, …)."""
        return _HASH_NAMES[self.report_data_hash_type]

    def variable_data_digest(self) -> bytes:
        """H(variable data) with the hash the report names; it must prefix the hardware report_data."""
        return _HASH_TYPES[self.report_data_hash_type](self.variable_data).digest()


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an Azure HCL report. Trailing bytes after the variable data must be zero."""
    data = bytes(data)
    if len(data) < VAR_DATA_OFFSET:
        raise MalformedInputError(f"HCL report is {len(data)} bytes, shorter than its fixed part")
    if len(data) > _MAX_HCL_SIZE:
        raise MalformedInputError("HCL report is implausibly large")
    if data[:4] != b"HCLA":
        raise MalformedInputError("HCL report does not start with 'HCLA'")
    version, report_size, request_type, status = struct.unpack_from("<4I", data, 4)
    if any(data[20:32]):
        raise MalformedInputError("HCL header reserved bytes are not zero")
    data_size, igvm_version, report_type, hash_type, var_size = struct.unpack_from(
        "<5I", data, HCL_HEADER_SIZE + HCL_HW_REPORT_SIZE
    )
    if report_type not in (REPORT_TYPE_SNP, REPORT_TYPE_TDX):
        raise UnsupportedError(f"HCL report type {report_type} is not SEV-SNP (2) or TDX (4)")
    if hash_type not in _HASH_TYPES:
        raise UnsupportedError(f"HCL report_data hash type {hash_type} is not supported")
    if data_size != IGVM_REQUEST_DATA_SIZE + var_size:
        raise MalformedInputError("HCL data_size disagrees with the variable data size")
    end = VAR_DATA_OFFSET + var_size
    if end > len(data):
        raise MalformedInputError("HCL variable data runs past the end of the report")
    if report_size != end:
        raise MalformedInputError(f"HCL report_size {report_size} disagrees with its contents ({end} bytes)")
    if any(data[end:]):
        raise MalformedInputError("non-zero bytes after the HCL variable data")
    return HclReport(
        version=version,
        report_size=report_size,
        request_type=request_type,
        status=status,
        hw_report=data[HCL_HEADER_SIZE : HCL_HEADER_SIZE + HCL_HW_REPORT_SIZE],
        igvm_version=igvm_version,
        report_type=report_type,
        report_data_hash_type=hash_type,
        variable_data=data[VAR_DATA_OFFSET:end],
        raw=data,
    )


@dataclass(frozen=True, slots=True)
class RuntimeData:
    """The HCL variable data: the vTPM attestation key and what else the paravisor states."""

    attestation_key: rsa.RSAPublicKey
    user_data: bytes | None
    vm_configuration: dict[str, Any]


def _b64url_int(value: object, what: str) -> int:
    if not isinstance(value, str) or not value:
        raise MalformedInputError(f"JWK {what} is missing")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise MalformedInputError(f"JWK {what} is not base64url") from None
    return int.from_bytes(raw, "big")


def parse_runtime_data(variable_data: bytes) -> RuntimeData:
    """Parse the HCL variable data JSON and its ``HCLAkPub`` RSA key."""
    try:
        doc = json.loads(variable_data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedInputError("HCL variable data is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise MalformedInputError("HCL variable data has no 'keys' list")
    aks = [k for k in doc["keys"] if isinstance(k, dict) and k.get("kid") == AK_KEY_ID]
    if len(aks) != 1:
        raise MalformedInputError(
            f"HCL variable data must hold exactly one {AK_KEY_ID} key, found {len(aks)}"
        )
    ak = aks[0]
    if ak.get("kty") != "RSA":
        raise UnsupportedError(f"{AK_KEY_ID} is not an RSA key")
    n, e = _b64url_int(ak.get("n"), "n"), _b64url_int(ak.get("e"), "e")
    if n.bit_length() < 2048 or e < 3 or e % 2 == 0:
        raise MalformedInputError(f"{AK_KEY_ID} is not a usable RSA key (>= 2048 bits, odd exponent)")
    try:
        key = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise MalformedInputError(f"{AK_KEY_ID} is not a valid RSA key") from None
    user_data: bytes | None = None
    if "user-data" in doc:
        try:
            user_data = bytes.fromhex(doc["user-data"])
        except (TypeError, ValueError):
            raise MalformedInputError("HCL user-data is not hex") from None
    config = doc.get("vm-configuration", {})
    if not isinstance(config, dict):
        raise MalformedInputError("HCL vm-configuration is not an object")
    return RuntimeData(attestation_key=key, user_data=user_data, vm_configuration=config)


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """One ``TPMS_PCR_SELECTION``: a hash algorithm and the PCR indices selected, ascending."""

    hash_alg: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TpmsAttest:
    """A ``TPMS_ATTEST`` of type ``TPM_ST_ATTEST_QUOTE`` (TPM 2.0 Part 2, 10.12)."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes
    raw: bytes


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedInputError("TPMS_ATTEST is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.uint(2))


def parse_tpms_attest(data: bytes) -> TpmsAttest:
    """Parse a TPM2_Quote's ``TPMS_ATTEST``; it must be TPM-generated and a quote."""
    data = bytes(data)
    r = _Reader(data)
    if r.uint(4) != TPM_GENERATED_VALUE:
        raise MalformedInputError("TPMS_ATTEST magic is not TPM_GENERATED_VALUE")
    if (kind := r.uint(2)) != TPM_ST_ATTEST_QUOTE:
        raise UnsupportedError(f"TPMS_ATTEST type 0x{kind:04x} is not a quote (0x8018)")
    qualified_signer = r.tpm2b()
    extra_data = r.tpm2b()
    if len(extra_data) > 64:
        raise MalformedInputError("TPMS_ATTEST extraData is longer than any TPM digest")
    clock, reset_count, restart_count = r.uint(8), r.uint(4), r.uint(4)
    safe = r.uint(1)
    if safe > 1:
        raise MalformedInputError("TPMS_CLOCK_INFO.safe is not a boolean")
    firmware_version = r.uint(8)
    count = r.uint(4)
    if count > 16:
        raise MalformedInputError("TPML_PCR_SELECTION has too many entries")
    selections = []
    for _ in range(count):
        alg = r.uint(2)
        bitmap = r.take(r.uint(1))
        pcrs = tuple(8 * i + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1)
        selections.append(PcrSelection(alg, pcrs))
    pcr_digest = r.tpm2b()
    if r.pos != len(data):
        raise MalformedInputError("trailing bytes after TPMS_ATTEST")
    return TpmsAttest(
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock=clock,
        reset_count=reset_count,
        restart_count=restart_count,
        safe=bool(safe),
        firmware_version=firmware_version,
        pcr_select=tuple(selections),
        pcr_digest=pcr_digest,
        raw=data,
    )


def tpms_attest_to_dict(attest: TpmsAttest) -> dict[str, object]:
    """A TPMS_ATTEST's fields, JSON-ready."""
    return {
        "qualified_signer": attest.qualified_signer.hex(),
        "extra_data": attest.extra_data.hex(),
        "clock": attest.clock,
        "reset_count": attest.reset_count,
        "restart_count": attest.restart_count,
        "safe": attest.safe,
        "firmware_version": f"0x{attest.firmware_version:016x}",
        "pcr_select": [{"hash_alg": f"0x{s.hash_alg:04x}", "pcrs": list(s.pcrs)} for s in attest.pcr_select],
        "pcr_digest": attest.pcr_digest.hex(),
    }


@dataclass(frozen=True, slots=True)
class TpmQuote:
    """A vTPM quote as shipped with Azure evidence: TPMS_ATTEST, its RSA signature, PCR values."""

    message: bytes
    signature: bytes
    pcrs: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AzureSnpEvidence:
    """Azure SNP CVM evidence: HCL report, vTPM quote and the VCEK (chain) that signed the SNP report."""

    hcl_report: bytes
    quote: TpmQuote
    certs: tuple[x509.Certificate, ...]


def _bytes_field(value: object, what: str, encoding: str) -> bytes:
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
            raise MalformedInputError(f"{what}: byte list holds a non-byte")
        return bytes(value)
    if not isinstance(value, str):
        raise MalformedInputError(f"{what}: expected a string or a byte list")
    try:
        if encoding == "hex":
            return bytes.fromhex(value)
        if ("-" in value or "_" in value) and not ("+" in value or "/" in value):
            value = value.replace("-", "+").replace("_", "/")  # the URL-safe alphabet
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (ValueError, binascii.Error):
        raise MalformedInputError(f"{what}: not {encoding}") from None


def parse_azure_evidence_json(data: bytes) -> AzureSnpEvidence:
    """Parse Azure SNP vTPM evidence JSON as the Confidential Containers attester emits it.

    Version 0: ``{"quote": {signature, message, pcrs} (byte lists), "report": [...], "vcek": PEM}``;
    versions 1 and 2: ``{"version", "tpm_quote": {signature, message, pcrs} (hex), "hcl_report":
    base64, "vcek": base64 DER or PEM}``.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedInputError("Azure evidence is not JSON") from None
    if not isinstance(doc, dict):
        raise MalformedInputError("Azure evidence is not a JSON object")
    version = doc.get("version", 0)
    if version not in (0, 1, 2) or isinstance(version, bool):
        raise UnsupportedError(f"Azure evidence version {version!r} is not supported")
    quote_doc = doc.get("tpm_quote", doc.get("quote"))
    report = doc.get("hcl_report", doc.get("report"))
    vcek = doc.get("vcek")
    if not isinstance(quote_doc, dict) or report is None or vcek is None:
        raise MalformedInputError("Azure evidence lacks tpm_quote, hcl_report or vcek")
    pcrs = quote_doc.get("pcrs")
    if not isinstance(pcrs, list):
        raise MalformedInputError("TPM quote has no pcrs list")
    quote = TpmQuote(
        message=_bytes_field(quote_doc.get("message"), "quote message", "hex"),
        signature=_bytes_field(quote_doc.get("signature"), "quote signature", "hex"),
        pcrs=tuple(_bytes_field(p, "PCR value", "hex") for p in pcrs),
    )
    if not isinstance(vcek, str):
        raise MalformedInputError("vcek must be a string")
    cert_bytes = vcek.encode() if "-----BEGIN" in vcek else _bytes_field(vcek, "vcek", "base64")
    return AzureSnpEvidence(
        hcl_report=_bytes_field(report, "hcl_report", "base64"),
        quote=quote,
        certs=tuple(load_certificates(cert_bytes)),
    )
