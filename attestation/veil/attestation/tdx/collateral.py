"""TDX collateral: Intel PCS TCB info, QE identity, CRLs and their issuer chains.

Two ways in, both pure (bytes in, :class:`TdxCollateral` out):

* :func:`load_collateral` — dcap-qvl's ``QuoteCollateralV3`` JSON: ``tcb_info`` and
  ``qe_identity`` are the exact signed JSON texts, ``*_signature`` hex r‖s, CRLs hex
  DER, issuer chains PEM.
* :func:`collateral_from_pcs` — the pieces as Intel PCS serves them: the TCB info
  response body (``{"tcbInfo": {...}, "signature": "..."}``), the QE identity body
  (``{"enclaveIdentity": {...}, ...}``), the issuer chains from the response headers,
  and DER CRLs. The signed bytes are cut out of the body verbatim, never re-serialised.

The TCB info / QE identity JSON is decoded into typed records here; the signatures,
windows and TCB matching are appraised by :mod:`veil.attestation.tdx.verify`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from veil.attestation.errors import MalformedInputError
from veil.attestation.tdx.quote import load_pem_chain

__all__ = [
    "QeIdentity",
    "QeTcbLevel",
    "TcbInfo",
    "TcbLevel",
    "TdxCollateral",
    "TdxModuleIdentity",
    "collateral_from_pcs",
    "dump_collateral",
    "load_collateral",
    "parse_qe_identity",
    "parse_tcb_info",
    "signed_member",
]

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


@dataclass(frozen=True, slots=True)
class TcbLevel:
    """One platform TCB level of a TDX TCB info."""

    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    tcb_date: str
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QeTcbLevel:
    """One ISV-SVN level: of the QE identity, or of a TDX module identity."""

    isv_svn: int
    tcb_date: str
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    """``tdxModule`` (id ``""``, no levels) or one ``tdxModuleIdentities`` entry (``TDX_01`` …)."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[QeTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class TcbInfo:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]


@dataclass(frozen=True, slots=True)
class QeIdentity:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    tcb_levels: tuple[QeTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class TdxCollateral:
    """Everything the appraisal of one quote needs besides the quote itself.

    ``tcb_info_json`` / ``qe_identity_json`` are the exact signed bytes; the CRLs are
    optional (then ``tdx.pck.crl`` is skipped and dcap-qvl's cross-check cannot run).
    """

    tcb_info_json: bytes
    tcb_info_signature: bytes
    tcb_info_issuer_chain: tuple[x509.Certificate, ...]
    qe_identity_json: bytes
    qe_identity_signature: bytes
    qe_identity_issuer_chain: tuple[x509.Certificate, ...]
    tcb_info: TcbInfo
    qe_identity: QeIdentity
    pck_crl: x509.CertificateRevocationList | None = None
    pck_crl_issuer_chain: tuple[x509.Certificate, ...] = ()
    root_ca_crl: x509.CertificateRevocationList | None = None
    pck_crl_der: bytes | None = None
    root_ca_crl_der: bytes | None = None


# ---------------------------------------------------------------- small readers


def _get(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise MalformedInputError(f"{where}: missing {key!r}")
    value = obj[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MalformedInputError(f"{where}: {key!r} must be an integer")
    if not isinstance(value, kind):
        raise MalformedInputError(f"{where}: {key!r} must be {kind.__name__}")
    return value


def _hex(obj: dict[str, Any], key: str, size: int | None, where: str) -> bytes:
    text = _get(obj, key, str, where)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise MalformedInputError(f"{where}: {key!r} is not hex") from None
    if size is not None and len(value) != size:
        raise MalformedInputError(f"{where}: {key!r} must be {size} bytes")
    return value


def _date(obj: dict[str, Any], key: str, where: str) -> datetime:
    text = _get(obj, key, str, where)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedInputError(f"{where}: {key!r} is not an ISO-8601 date") from None
    if value.tzinfo is None:
        raise MalformedInputError(f"{where}: {key!r} has no time zone")
    return value


def _status(obj: dict[str, Any], where: str) -> str:
    status = _get(obj, "tcbStatus", str, where)
    if status not in TCB_STATUSES:
        raise MalformedInputError(f"{where}: unknown tcbStatus {status!r}")
    return str(status)


def _advisories(obj: dict[str, Any], where: str) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise MalformedInputError(f"{where}: advisoryIDs must be a list of strings")
    return tuple(ids)


def _svns(obj: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    items = _get(obj, key, list, where)
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise MalformedInputError(f"{where}: {key} entries must be objects")
        svn = _get(item, "svn", int, where)
        if not 0 <= svn <= 255:
            raise MalformedInputError(f"{where}: {key} svn out of range")
        out.append(svn)
    if len(out) != 16:
        raise MalformedInputError(f"{where}: {key} must have 16 components")
    return tuple(out)


def _isv_levels(items: Any, where: str) -> tuple[QeTcbLevel, ...]:
    if not isinstance(items, list):
        raise MalformedInputError(f"{where}: tcbLevels must be a list")
    levels = []
    for item in items:
        if not isinstance(item, dict):
            raise MalformedInputError(f"{where}: tcbLevels entries must be objects")
        tcb = _get(item, "tcb", dict, where)
        levels.append(
            QeTcbLevel(
                isv_svn=_get(tcb, "isvsvn", int, where),
                tcb_date=_get(item, "tcbDate", str, where),
                tcb_status=_status(item, where),
                advisory_ids=_advisories(item, where),
            )
        )
    return tuple(levels)


def _module(obj: dict[str, Any], where: str, *, with_levels: bool) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        id=str(obj.get("id", "")) if with_levels else "",
        mrsigner=_hex(obj, "mrsigner", 48, where),
        attributes=_hex(obj, "attributes", 8, where),
        attributes_mask=_hex(obj, "attributesMask", 8, where),
        tcb_levels=_isv_levels(obj.get("tcbLevels", []), where) if with_levels else (),
    )


def _json_object(text: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MalformedInputError(f"{where} is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedInputError(f"{where} is not a JSON object")
    return value


def parse_tcb_info(signed_json: bytes) -> TcbInfo:
    """Decode the signed ``tcbInfo`` object (TDX, version 3)."""
    where = "TCB info"
    obj = _json_object(signed_json, where)
    module = obj.get("tdxModule")
    identities = obj.get("tdxModuleIdentities", [])
    if module is not None and not isinstance(module, dict):
        raise MalformedInputError("TCB info: tdxModule must be an object")
    if not isinstance(identities, list) or not all(isinstance(i, dict) for i in identities):
        raise MalformedInputError("TCB info: tdxModuleIdentities must be a list of objects")
    levels = []
    for item in _get(obj, "tcbLevels", list, where):
        if not isinstance(item, dict):
            raise MalformedInputError("TCB info: tcbLevels entries must be objects")
        tcb = _get(item, "tcb", dict, where)
        levels.append(
            TcbLevel(
                sgx_components=_svns(tcb, "sgxtcbcomponents", where),
                pce_svn=_get(tcb, "pcesvn", int, where),
                tdx_components=_svns(tcb, "tdxtcbcomponents", where) if "tdxtcbcomponents" in tcb else (),
                tcb_date=_get(item, "tcbDate", str, where),
                tcb_status=_status(item, where),
                advisory_ids=_advisories(item, where),
            )
        )
    return TcbInfo(
        id=_get(obj, "id", str, where),
        version=_get(obj, "version", int, where),
        issue_date=_date(obj, "issueDate", where),
        next_update=_date(obj, "nextUpdate", where),
        fmspc=_hex(obj, "fmspc", 6, where),
        pce_id=_hex(obj, "pceId", 2, where),
        tcb_type=_get(obj, "tcbType", int, where),
        tcb_evaluation_data_number=_get(obj, "tcbEvaluationDataNumber", int, where),
        tdx_module=_module(module, where, with_levels=False) if module is not None else None,
        tdx_module_identities=tuple(_module(i, where, with_levels=True) for i in identities),
        tcb_levels=tuple(levels),
    )


def parse_qe_identity(signed_json: bytes) -> QeIdentity:
    """Decode the signed ``enclaveIdentity`` object (id ``TD_QE``)."""
    where = "QE identity"
    obj = _json_object(signed_json, where)
    return QeIdentity(
        id=_get(obj, "id", str, where),
        version=_get(obj, "version", int, where),
        issue_date=_date(obj, "issueDate", where),
        next_update=_date(obj, "nextUpdate", where),
        tcb_evaluation_data_number=_get(obj, "tcbEvaluationDataNumber", int, where),
        miscselect=int.from_bytes(_hex(obj, "miscselect", 4, where), "little"),
        miscselect_mask=int.from_bytes(_hex(obj, "miscselectMask", 4, where), "little"),
        attributes=_hex(obj, "attributes", 16, where),
        attributes_mask=_hex(obj, "attributesMask", 16, where),
        mrsigner=_hex(obj, "mrsigner", 32, where),
        isv_prod_id=_get(obj, "isvprodid", int, where),
        tcb_levels=_isv_levels(_get(obj, "tcbLevels", list, where), where),
    )


# ---------------------------------------------------------------- certificates and CRLs


def _pem_chain(pem: object, where: str) -> tuple[x509.Certificate, ...]:
    if not isinstance(pem, str | bytes):
        raise MalformedInputError(f"{where}: must be PEM text")
    return load_pem_chain(pem.encode() if isinstance(pem, str) else pem, where)


def _crl(der: bytes, where: str) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_der_x509_crl(der)
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.signature_hash_algorithm)
        _ = [entry.serial_number for entry in crl]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise MalformedInputError(f"{where}: not a DER CRL") from None
    return crl


def _signature(raw: bytes, where: str) -> bytes:
    if len(raw) != 64:
        raise MalformedInputError(f"{where}: signature must be 64 bytes (r‖s)")
    return raw


def _unhex(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise MalformedInputError(f"{where} must be a hex string")
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise MalformedInputError(f"{where} is not hex") from None


def _build(
    *,
    tcb_info_json: bytes,
    tcb_info_signature: bytes,
    tcb_info_issuer_chain: bytes | str,
    qe_identity_json: bytes,
    qe_identity_signature: bytes,
    qe_identity_issuer_chain: bytes | str,
    pck_crl: bytes | None,
    pck_crl_issuer_chain: bytes | str | None,
    root_ca_crl: bytes | None,
) -> TdxCollateral:
    return TdxCollateral(
        tcb_info_json=tcb_info_json,
        tcb_info_signature=_signature(tcb_info_signature, "TCB info"),
        tcb_info_issuer_chain=_pem_chain(tcb_info_issuer_chain, "TCB info issuer chain"),
        qe_identity_json=qe_identity_json,
        qe_identity_signature=_signature(qe_identity_signature, "QE identity"),
        qe_identity_issuer_chain=_pem_chain(qe_identity_issuer_chain, "QE identity issuer chain"),
        tcb_info=parse_tcb_info(tcb_info_json),
        qe_identity=parse_qe_identity(qe_identity_json),
        pck_crl=_crl(pck_crl, "PCK CRL") if pck_crl is not None else None,
        pck_crl_issuer_chain=(
            _pem_chain(pck_crl_issuer_chain, "PCK CRL issuer chain") if pck_crl_issuer_chain else ()
        ),
        root_ca_crl=_crl(root_ca_crl, "root CA CRL") if root_ca_crl is not None else None,
        pck_crl_der=pck_crl,
        root_ca_crl_der=root_ca_crl,
    )


def load_collateral(json_bytes: bytes) -> TdxCollateral:
    """Collateral in dcap-qvl's ``QuoteCollateralV3`` JSON form (as ``to_json`` writes it)."""
    obj = _json_object(json_bytes, "dcap-qvl collateral")

    def text(key: str) -> str:
        value = obj.get(key)
        if not isinstance(value, str):
            raise MalformedInputError(f"dcap-qvl collateral: {key!r} must be a string")
        return value

    def optional_hex(key: str) -> bytes | None:
        return _unhex(obj[key], f"dcap-qvl collateral {key!r}") if obj.get(key) else None

    return _build(
        tcb_info_json=text("tcb_info").encode(),
        tcb_info_signature=_unhex(obj.get("tcb_info_signature"), "tcb_info_signature"),
        tcb_info_issuer_chain=text("tcb_info_issuer_chain"),
        qe_identity_json=text("qe_identity").encode(),
        qe_identity_signature=_unhex(obj.get("qe_identity_signature"), "qe_identity_signature"),
        qe_identity_issuer_chain=text("qe_identity_issuer_chain"),
        pck_crl=optional_hex("pck_crl"),
        pck_crl_issuer_chain=obj.get("pck_crl_issuer_chain") or None,  # type checked by _pem_chain
        root_ca_crl=optional_hex("root_ca_crl"),
    )


def _pem_text(chain: tuple[x509.Certificate, ...]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)


def dump_collateral(collateral: TdxCollateral) -> bytes:
    """The inverse of :func:`load_collateral`: dcap-qvl's JSON form (e.g. to keep fetched
    collateral for an offline verification later)."""
    c = collateral
    doc = {
        "pck_crl_issuer_chain": _pem_text(c.pck_crl_issuer_chain),
        "root_ca_crl": c.root_ca_crl_der.hex() if c.root_ca_crl_der is not None else "",
        "pck_crl": c.pck_crl_der.hex() if c.pck_crl_der is not None else "",
        "tcb_info_issuer_chain": _pem_text(c.tcb_info_issuer_chain),
        "tcb_info": c.tcb_info_json.decode("utf-8"),
        "tcb_info_signature": c.tcb_info_signature.hex(),
        "qe_identity_issuer_chain": _pem_text(c.qe_identity_issuer_chain),
        "qe_identity": c.qe_identity_json.decode("utf-8"),
        "qe_identity_signature": c.qe_identity_signature.hex(),
    }
    return json.dumps(doc, indent=2).encode()


def signed_member(body: bytes, key: str) -> tuple[bytes, dict[str, Any]]:
    """The exact bytes of the top-level member ``key`` of a PCS JSON body, and the whole object.

    Intel signs the member's text as served; it is sliced out, never re-encoded.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedInputError("PCS response is not UTF-8") from None
    whole = _json_object(body, "PCS response")
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if text[pos : pos + 1] != "{":
        raise MalformedInputError("PCS response is not a JSON object")
    pos += 1
    while True:
        pos = _skip_ws(text, pos)
        try:
            name, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if text[pos : pos + 1] != ":":
                raise MalformedInputError("PCS response: expected ':'")
            start = _skip_ws(text, pos + 1)
            _, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            raise MalformedInputError("PCS response does not parse") from None
        if name == key:
            return text[start:end].encode("utf-8"), whole
        pos = _skip_ws(text, end)
        if text[pos : pos + 1] != ",":
            raise MalformedInputError(f"PCS response has no {key!r} member")
        pos += 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def collateral_from_pcs(
    *,
    tcb_info_response: bytes,
    qe_identity_response: bytes,
    tcb_info_issuer_chain: bytes | str,
    qe_identity_issuer_chain: bytes | str | None = None,
    pck_crl: bytes | None = None,
    pck_crl_issuer_chain: bytes | str | None = None,
    root_ca_crl: bytes | None = None,
) -> TdxCollateral:
    """Collateral from Intel PCS responses (e.g. go-tdx-guest's test files).

    ``tcb_info_response`` / ``qe_identity_response`` are the response bodies; the issuer
    chains come from the ``TCB-Info-Issuer-Chain`` / ``SGX-Enclave-Identity-Issuer-Chain``
    headers, URL-decoded (PCS signs both with the same TCB signing certificate, so the QE
    identity chain defaults to the TCB info chain). CRLs are DER.
    """
    tcb_json, tcb_whole = signed_member(tcb_info_response, "tcbInfo")
    qe_json, qe_whole = signed_member(qe_identity_response, "enclaveIdentity")
    return _build(
        tcb_info_json=tcb_json,
        tcb_info_signature=_unhex(tcb_whole.get("signature"), "TCB info signature"),
        tcb_info_issuer_chain=tcb_info_issuer_chain,
        qe_identity_json=qe_json,
        qe_identity_signature=_unhex(qe_whole.get("signature"), "QE identity signature"),
        qe_identity_issuer_chain=(
            qe_identity_issuer_chain if qe_identity_issuer_chain is not None else tcb_info_issuer_chain
        ),
        pck_crl=pck_crl,
        pck_crl_issuer_chain=pck_crl_issuer_chain,
        root_ca_crl=root_ca_crl,
    )
