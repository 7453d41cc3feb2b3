"""Intel TDX quotes, versions 4 and 5: a pure parser.

Layout (all integers little-endian), after Intel's *TDX DCAP Quoting Library API*:

::

    header (48)              version u16 | attestation key type u16 (2 = ECDSA P-256)
                             | TEE type u32 (0x81 = TDX) | qe_svn u16 | pce_svn u16
                             | QE vendor id (16) | user data (20)
    v5 only: descriptor (6)  body type u16 (2 = TD report 1.0, 3 = TD report 1.5) | body size u32
    body                     TD report 1.0 (584) or 1.5 (648)
    signature data length    u32
    signature data           ECDSA signature r‖s (64) | attestation key x‖y (64)
                             | certification data: type u16 (6) | size u32 | then
                               QE report (384) | QE report signature (64)
                               | QE auth data: size u16 | bytes
                               | certification data: type u16 (5) | size u32 | PCK chain (PEM)

The signed region of the attestation key is the header and body (v5: header,
descriptor and body), i.e. every byte before the signature-data length. Bytes
after the signature data are kept in ``TdxQuote.trailing`` and otherwise ignored,
as Intel's and Google's verifiers ignore them: some tools pad quotes with zeros
to a fixed size, and go-tdx-guest's test quote carries a text trailer. They are
not signed, so nothing may be read from them.

:func:`parse_tdx_quote` parses by structure and raises only
:class:`~veil.attestation.errors.MalformedInputError` (or its subclass
:class:`~veil.attestation.errors.UnsupportedError`). It checks no signature.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography import x509

from veil.attestation.certificates import load_certificates
from veil.attestation.errors import MalformedInputError, UnsupportedError
from veil.attestation.tdx.pck import parse_pck_extensions

__all__ = [
    "ATTESTATION_KEY_TYPE_ECDSA_P256",
    "BODY_TYPE_TD_REPORT_10",
    "BODY_TYPE_TD_REPORT_15",
    "INTEL_QE_VENDOR_ID",
    "TEE_TYPE_TDX",
    "EnclaveReport",
    "PckCertChain",
    "QeReportCertificationData",
    "TdReport",
    "TdxBodyDescriptor",
    "TdxQuote",
    "TdxQuoteHeader",
    "TdxSignatureData",
    "describe_tdx_quote",
    "load_pem_chain",
    "parse_enclave_report",
    "parse_td_report",
    "parse_tdx_quote",
    "td_attribute_names",
]

HEADER_SIZE = 48
TD_REPORT_10_SIZE = 584
TD_REPORT_15_SIZE = 648
ENCLAVE_REPORT_SIZE = 384
BODY_TYPE_SGX = 1
BODY_TYPE_TD_REPORT_10 = 2
BODY_TYPE_TD_REPORT_15 = 3
TEE_TYPE_TDX = 0x81
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
_MAX_QUOTE_SIZE = 1 << 20


class _Reader:
    """A bounds-checked cursor; every overrun is a MalformedInputError naming the field."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def pos(self) -> int:
        return self._pos

    def take(self, n: int, what: str) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise MalformedInputError(
                f"TDX quote truncated: {what} needs {n} bytes at offset {self._pos}, "
                f"{len(self._data) - self._pos} left"
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


@dataclass(frozen=True, slots=True)
class TdxQuoteHeader:
    """The 48-byte quote header. ``qe_svn`` / ``pce_svn`` are reserved in TDX quotes."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True, slots=True)
class TdxBodyDescriptor:
    """Quote v5 only: which body follows and how long it is."""

    body_type: int
    body_size: int


@dataclass(frozen=True, slots=True)
class TdReport:
    """A TD report body as the quote carries it: TD report 1.0, or 1.5 with two more fields."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def version(self) -> str:
        """``"1.0"`` or ``"1.5"``."""
        return "1.0" if self.tee_tcb_svn2 is None else "1.5"

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def td_attributes_value(self) -> int:
        """TD attributes as the 64-bit little-endian integer the TDX module defines."""
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        """TUD.DEBUG (attribute bit 0): the host can read and write this TD's memory."""
        return bool(self.td_attributes_value & TD_ATTR_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        return bool(self.td_attributes_value & TD_ATTR_SEPT_VE_DISABLE)


@dataclass(frozen=True, slots=True)
class EnclaveReport:
    """An SGX enclave report body (384 bytes): here, the quoting enclave's report."""

    cpu_svn: bytes
    misc_select: int
    reserved1: bytes
    attributes: bytes
    mr_enclave: bytes
    reserved2: bytes
    mr_signer: bytes
    reserved3: bytes
    isv_prod_id: int
    isv_svn: int
    reserved4: bytes
    report_data: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class PckCertChain:
    """Certification data type 5: the PEM PCK chain, leaf first, as the quote embeds it."""

    pem: bytes
    certificates: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]


@dataclass(frozen=True, slots=True)
class QeReportCertificationData:
    """Certification data type 6: the QE report, its PCK signature, QE auth data, PCK chain."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_cert_chain_type: int
    pck_cert_chain: PckCertChain


@dataclass(frozen=True, slots=True)
class TdxSignatureData:
    """The quote's ECDSA signature data: AK signature, AK public key, certification data."""

    signature: bytes
    attestation_key: bytes
    certification_data_type: int
    certification_data_size: int
    qe_certification: QeReportCertificationData


@dataclass(frozen=True, slots=True)
class TdxQuote:
    """A parsed TDX quote. ``raw`` is the quote up to the end of its signature data."""

    header: TdxQuoteHeader
    body_descriptor: TdxBodyDescriptor | None
    td_report: TdReport
    signature_data_length: int
    signature_data: TdxSignatureData
    raw: bytes
    signed_length: int
    trailing: bytes

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def signed_region(self) -> bytes:
        """The bytes the attestation key signs: header (+ v5 descriptor) + body."""
        return self.raw[: self.signed_length]

    @property
    def pck_chain(self) -> PckCertChain:
        return self.signature_data.qe_certification.pck_cert_chain


def _parse_header(r: _Reader) -> TdxQuoteHeader:
    version = r.u16("header.version")
    key_type = r.u16("header.attestation_key_type")
    tee_type = r.u32("header.tee_type")
    header = TdxQuoteHeader(
        version=version,
        attestation_key_type=key_type,
        tee_type=tee_type,
        qe_svn=r.u16("header.qe_svn"),
        pce_svn=r.u16("header.pce_svn"),
        qe_vendor_id=r.take(16, "header.qe_vendor_id"),
        user_data=r.take(20, "header.user_data"),
    )
    if version not in (4, 5):
        raise UnsupportedError(f"TDX quote version {version} is not supported (4 and 5 are)")
    if tee_type != TEE_TYPE_TDX:
        raise UnsupportedError(f"TEE type {tee_type:#x} is not TDX ({TEE_TYPE_TDX:#x})")
    if key_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        raise UnsupportedError(f"attestation key type {key_type} is not supported (2 = ECDSA P-256 is)")
    return header


def parse_td_report(data: bytes, *, td15: bool) -> TdReport:
    """Parse a TD report 1.0 (584 bytes) or 1.5 (648 bytes) quote body."""
    expected = TD_REPORT_15_SIZE if td15 else TD_REPORT_10_SIZE
    if len(data) != expected:
        raise MalformedInputError(f"TD report {'1.5' if td15 else '1.0'} must be {expected} bytes")
    r = _Reader(data)
    fields = {
        "tee_tcb_svn": r.take(16, "tee_tcb_svn"),
        "mr_seam": r.take(48, "mr_seam"),
        "mr_signer_seam": r.take(48, "mr_signer_seam"),
        "seam_attributes": r.take(8, "seam_attributes"),
        "td_attributes": r.take(8, "td_attributes"),
        "xfam": r.take(8, "xfam"),
        "mr_td": r.take(48, "mr_td"),
        "mr_config_id": r.take(48, "mr_config_id"),
        "mr_owner": r.take(48, "mr_owner"),
        "mr_owner_config": r.take(48, "mr_owner_config"),
        "rtmr0": r.take(48, "rtmr0"),
        "rtmr1": r.take(48, "rtmr1"),
        "rtmr2": r.take(48, "rtmr2"),
        "rtmr3": r.take(48, "rtmr3"),
        "report_data": r.take(64, "report_data"),
    }
    if td15:
        return TdReport(
            **fields, tee_tcb_svn2=r.take(16, "tee_tcb_svn2"), mr_service_td=r.take(48, "mr_service_td")
        )
    return TdReport(**fields)


def parse_enclave_report(data: bytes) -> EnclaveReport:
    """Parse a 384-byte SGX enclave report body (the QE report)."""
    if len(data) != ENCLAVE_REPORT_SIZE:
        raise MalformedInputError(f"enclave report must be {ENCLAVE_REPORT_SIZE} bytes")
    r = _Reader(data)
    return EnclaveReport(
        cpu_svn=r.take(16, "qe_report.cpu_svn"),
        misc_select=r.u32("qe_report.misc_select"),
        reserved1=r.take(28, "qe_report.reserved1"),
        attributes=r.take(16, "qe_report.attributes"),
        mr_enclave=r.take(32, "qe_report.mr_enclave"),
        reserved2=r.take(32, "qe_report.reserved2"),
        mr_signer=r.take(32, "qe_report.mr_signer"),
        reserved3=r.take(96, "qe_report.reserved3"),
        isv_prod_id=r.u16("qe_report.isv_prod_id"),
        isv_svn=r.u16("qe_report.isv_svn"),
        reserved4=r.take(60, "qe_report.reserved4"),
        report_data=r.take(64, "qe_report.report_data"),
        raw=data,
    )


def load_pem_chain(pem: bytes, where: str) -> tuple[x509.Certificate, ...]:
    """PEM certificates, each fully decoded now (see :mod:`veil.attestation.certificates`)."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise MalformedInputError(f"{where} holds no PEM certificate")
    try:
        return tuple(load_certificates(pem))
    except MalformedInputError as exc:
        raise MalformedInputError(f"{where} does not parse: {exc}") from None


def _parse_pck_chain(data: bytes) -> PckCertChain:
    pem = data.rstrip(b"\x00")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise MalformedInputError("PCK certification data holds no PEM certificate")
    return PckCertChain(pem=pem, certificates=load_pem_chain(pem, "PCK certificate chain"))


def _parse_qe_certification(data: bytes) -> QeReportCertificationData:
    r = _Reader(data)
    qe_report = parse_enclave_report(r.take(ENCLAVE_REPORT_SIZE, "qe_report"))
    qe_report_signature = r.take(64, "qe_report_signature")
    qe_auth_data = r.take(r.u16("qe_auth_data.size"), "qe_auth_data")
    cert_type = r.u16("pck_cert_data.type")
    cert_size = r.u32("pck_cert_data.size")
    cert_data = r.take(cert_size, "pck_cert_data")
    if r.pos != len(data):
        raise MalformedInputError("QE report certification data has bytes after the PCK chain")
    if cert_type != CERT_DATA_PCK_CHAIN:
        raise UnsupportedError(
            f"QE certification data type {cert_type} is not supported (5 = PCK chain is); "
            "fetch the PCK certificate for it"
        )
    return QeReportCertificationData(
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_cert_chain_type=cert_type,
        pck_cert_chain=_parse_pck_chain(cert_data),
    )


def _parse_signature_data(data: bytes) -> TdxSignatureData:
    r = _Reader(data)
    signature = r.take(64, "signature")
    attestation_key = r.take(64, "attestation_key")
    cert_type = r.u16("certification_data.type")
    cert_size = r.u32("certification_data.size")
    cert_data = r.take(cert_size, "certification_data")
    if r.pos != len(data):
        raise MalformedInputError("quote signature data has bytes after its certification data")
    if cert_type != CERT_DATA_QE_REPORT:
        raise UnsupportedError(
            f"certification data type {cert_type} is not supported (6 = QE report certification is)"
        )
    return TdxSignatureData(
        signature=signature,
        attestation_key=attestation_key,
        certification_data_type=cert_type,
        certification_data_size=cert_size,
        qe_certification=_parse_qe_certification(cert_data),
    )


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parse a TDX quote (v4 or v5) by structure; unsigned trailing bytes are kept apart.

    Raises :class:`MalformedInputError` for truncated, inconsistent or garbage
    bytes and :class:`UnsupportedError` for a version, TEE type, key type, body
    type or certification data type this parser does not handle.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedInputError("a TDX quote must be bytes")
    data = bytes(data)
    if len(data) > _MAX_QUOTE_SIZE:
        raise MalformedInputError(f"TDX quote larger than {_MAX_QUOTE_SIZE} bytes")
    r = _Reader(data)
    header = _parse_header(r)
    descriptor: TdxBodyDescriptor | None = None
    if header.version == 4:
        body_type, body_size = BODY_TYPE_TD_REPORT_10, TD_REPORT_10_SIZE
    else:
        descriptor = TdxBodyDescriptor(r.u16("body_descriptor.type"), r.u32("body_descriptor.size"))
        body_type, body_size = descriptor.body_type, descriptor.body_size
        if body_type not in (BODY_TYPE_TD_REPORT_10, BODY_TYPE_TD_REPORT_15):
            raise UnsupportedError(
                f"quote v5 body type {body_type} is not supported (2 = TD report 1.0, 3 = TD report 1.5)"
            )
        wanted = TD_REPORT_10_SIZE if body_type == BODY_TYPE_TD_REPORT_10 else TD_REPORT_15_SIZE
        if body_size != wanted:
            raise MalformedInputError(
                f"quote v5 body type {body_type} must be {wanted} bytes, says {body_size}"
            )
    td_report = parse_td_report(r.take(body_size, "td_report"), td15=body_type == BODY_TYPE_TD_REPORT_15)
    signed_length = r.pos
    sig_len = r.u32("signature_data.length")
    signature_data = _parse_signature_data(r.take(sig_len, "signature_data"))
    end = r.pos
    return TdxQuote(
        header=header,
        body_descriptor=descriptor,
        td_report=td_report,
        signature_data_length=sig_len,
        signature_data=signature_data,
        raw=data[:end],
        signed_length=signed_length,
        trailing=data[end:],
    )


_TD_ATTRIBUTE_BITS = {0: "DEBUG", 28: "SEPT_VE_DISABLE", 29: "MIGRATABLE", 30: "PKS", 31: "KL", 63: "PERFMON"}


def td_attribute_names(td: TdReport) -> list[str]:
    """Names of the TD attribute bits that are set (``BIT<n>`` for ones without a name)."""
    value = td.td_attributes_value
    return [_TD_ATTRIBUTE_BITS.get(bit, f"BIT{bit}") for bit in range(64) if value >> bit & 1]


def _hexes(obj: object, names: tuple[str, ...]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in names:
        value = getattr(obj, name)
        out[name] = value.hex() if isinstance(value, bytes) else value
    return out


def describe_tdx_quote(quote: TdxQuote) -> dict[str, object]:
    """Every field of a quote, decoded and named (JSON-ready), for ``veil attest show``."""
    td = quote.td_report
    td_fields = (
        "tee_tcb_svn",
        "mr_seam",
        "mr_signer_seam",
        "seam_attributes",
        "td_attributes",
        "xfam",
        "mr_td",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "report_data",
        "tee_tcb_svn2",
        "mr_service_td",
    )
    td_dict = _hexes(td, td_fields if td.tee_tcb_svn2 is not None else td_fields[:-2])
    td_dict["version"] = td.version
    td_dict["td_attribute_flags"] = td_attribute_names(td)
    qe = quote.signature_data.qe_certification
    report = qe.qe_report
    chain: list[dict[str, object]] = []
    for cert in quote.pck_chain.certificates:
        chain.append(
            {
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "serial": format(cert.serial_number, "x"),
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
            }
        )
    try:
        ext = parse_pck_extensions(quote.pck_chain.leaf)
        pck: dict[str, object] = {
            "fmspc": ext.fmspc.hex(),
            "pce_id": ext.pce_id.hex(),
            "pce_svn": ext.pce_svn,
            "cpu_svn": ext.cpu_svn.hex(),
            "tcb_components": list(ext.tcb_components),
            "ppid": ext.ppid.hex(),
            "sgx_type": ext.sgx_type,
            "platform_instance_id": ext.platform_instance_id.hex() if ext.platform_instance_id else None,
            "dynamic_platform": ext.dynamic_platform,
            "cached_keys": ext.cached_keys,
            "smt_enabled": ext.smt_enabled,
        }
    except MalformedInputError as exc:
        pck = {"error": str(exc)}
    return {
        "format": "Intel TDX quote",
        "header": _hexes(
            quote.header,
            ("version", "attestation_key_type", "tee_type", "qe_svn", "pce_svn", "qe_vendor_id", "user_data"),
        ),
        "body_descriptor": (
            _hexes(quote.body_descriptor, ("body_type", "body_size")) if quote.body_descriptor else None
        ),
        "td_report": td_dict,
        "signature_data": {
            "length": quote.signature_data_length,
            "signature": quote.signature_data.signature.hex(),
            "attestation_key": quote.signature_data.attestation_key.hex(),
            "certification_data_type": quote.signature_data.certification_data_type,
            "qe_report": _hexes(
                report,
                (
                    "cpu_svn",
                    "misc_select",
                    "attributes",
                    "mr_enclave",
                    "mr_signer",
                    "isv_prod_id",
                    "isv_svn",
                    "report_data",
                ),
            ),
            "qe_report_signature": qe.qe_report_signature.hex(),
            "qe_auth_data": qe.qe_auth_data.hex(),
            "pck_cert_chain_type": qe.pck_cert_chain_type,
            "pck_cert_chain": chain,
            "pck_extensions": pck,
        },
        "signed_length": quote.signed_length,
        "trailing_unsigned_bytes": len(quote.trailing),
    }
