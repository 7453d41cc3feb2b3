"""Verify an Intel TDX quote: signatures, PCK chain, QE binding, and collateral.

Every step is a named check in the :class:`~veil.attestation.verdict.Verdict`:

========================  ===============================================================
``tdx.quote.parse``       the quote parsed (version, body, unsigned trailing bytes)
``tdx.quote.header``      QE vendor id is Intel's
``tdx.ak.signature``      attestation key (P-256, raw r‖s) over header (+ v5 descriptor) + body
``tdx.pck.chain``         PCK leaf → PCK Platform/Processor CA → pinned Intel SGX Root CA
``tdx.pck.validity``      every certificate of that chain valid at ``now``
``tdx.pck.crl``           PCK CRL and root CA CRL: signed, current, nothing revoked
``tdx.pck.extensions``    (only when failing) the PCK leaf's SGX extension does not parse
``tdx.qe.signature``      PCK leaf over the QE report
``tdx.qe.binding``        QE report_data = SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes
``tdx.collateral.*``      TCB info / QE identity: chain to the root, signature over the exact
                          JSON bytes, issue ≤ now ≤ next update; FMSPC / PCE id = PCK's
``tdx.qe.identity``       QE report against the QE identity
``tdx.tdx_module``        MRSIGNERSEAM / SEAM attributes against the TDX module identity
``tdx.tcb.status``        converged platform / module / QE TCB status and advisories (TD 1.5:
                          also the current TCB, and TDRelaunchAdvised); fails on no matching
                          level or Revoked — any other status is the policy's to judge
``tdx.tcb.dcap_qvl``      dcap-qvl's independent appraisal agrees (both accept with the same
                          status and advisories, or both reject); skipped when dcap-qvl refuses
                          only the TD attributes (debug …), which the policy judges
                          (:mod:`.cross_check`)
========================  ===============================================================

Without collateral the collateral checks are skipped, so the verdict can still be
good on signatures alone; a policy (:mod:`veil.attestation.tdx.validate`) then
decides whether a missing TCB status is acceptable (by default it is not).

A check that judges what a failed check should have authenticated is ``skip``
("not checked: <check> failed"), never ``pass``: the PCK CRL and the PCK's FMSPC after a
failed ``tdx.pck.chain``; the QE identity after a failed QE signature or QE identity
collateral; the TDX module and the TCB status after a failed quote signature, QE binding,
QE signature, PCK chain or collateral check (:data:`TCB_PREREQUISITES`). ``tdx.tcb.dcap_qvl``
always runs: "both reject" is an answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.errors import CollateralError, MalformedInputError
from veil.attestation.options import VerifyOptions
from veil.attestation.tdx.collateral import TdxCollateral
from veil.attestation.tdx.cross_check import cross_check_dcap_qvl
from veil.attestation.tdx.pck import PckExtensions, parse_pck_extensions
from veil.attestation.tdx.quote import INTEL_QE_VENDOR_ID, TdxQuote
from veil.attestation.tdx.tcb import (
    TcbAppraisal,
    TcbError,
    evaluate_tdx_tcb,
    match_qe_identity,
    match_tdx_module,
)
from veil.attestation.verdict import CheckStatus, Verdict, VerdictBuilder

__all__ = [
    "INTEL_SGX_ROOT_CA_SHA256",
    "TCB_PREREQUISITES",
    "TCB_STATUS_DETAIL_PREFIX",
    "intel_sgx_root_ca",
    "tcb_advisories_of",
    "tcb_status_of",
    "tcb_unappraised_reason",
    "verify_tdx",
    "verify_tdx_collateral",
]

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
"""SHA-256 of the DER Intel SGX Root CA certificate shipped in ``roots/intel_sgx_root_ca.pem``."""

TCB_STATUS_DETAIL_PREFIX = "status="
_PCK_CA_NAMES = ("Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA")
# What authenticates the TD report (quote → attestation key → QE report → PCK → Intel root).
_QUOTE_CHAIN = ("tdx.ak.signature", "tdx.qe.binding", "tdx.qe.signature", "tdx.pck.chain")
TCB_PREREQUISITES = (
    *_QUOTE_CHAIN,
    "tdx.pck.extensions",
    "tdx.collateral.tcb_info",
    "tdx.collateral.qe_identity",
    "tdx.collateral.fmspc",
    "tdx.qe.identity",
    "tdx.tdx_module",
)
"""The checks ``tdx.tcb.status`` needs to pass: when one failed, the TCB status is not appraised (skip)."""


@lru_cache(maxsize=1)
def intel_sgx_root_ca() -> x509.Certificate:
    """The pinned Intel SGX Root CA, checked against :data:`INTEL_SGX_ROOT_CA_SHA256`."""
    pem = resources.files("veil.attestation").joinpath("roots/intel_sgx_root_ca.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    if hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() != INTEL_SGX_ROOT_CA_SHA256:
        raise CollateralError("the packaged Intel SGX Root CA does not match its pinned SHA-256")
    return cert


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _p256_verify(public_key: ec.EllipticCurvePublicKey, raw_sig: bytes, data: bytes) -> bool:
    if len(raw_sig) != 64 or not isinstance(public_key.curve, ec.SECP256R1):
        return False
    sig = encode_dss_signature(int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big"))
    try:
        public_key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _cert_p256_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey | None:
    key = cert.public_key()
    return key if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1) else None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _chain_problem(chain: Sequence[x509.Certificate], root: x509.Certificate) -> str | None:
    """Why ``chain`` (leaf first) does not lead to ``root``; None when it does."""
    certs = list(chain)
    if not certs:
        return "empty certificate chain"
    if _der(certs[-1]) == _der(root):
        certs.pop()
    elif certs[-1].issuer == certs[-1].subject and len(certs) > 1:
        return f"chain ends at {_cn(certs[-1])!r}, which is not the pinned Intel SGX Root CA"
    if not certs:
        return "chain holds only the root"
    for i, cert in enumerate(certs):
        issuer = certs[i + 1] if i + 1 < len(certs) else root
        if i > 0 and not _is_ca(cert):
            return f"{_cn(cert)!r} is not a CA certificate"
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return f"{_cn(cert)!r} is not signed by {_cn(issuer)!r}"
    return None


def _validity_problem(chain: Sequence[x509.Certificate], now: datetime) -> str | None:
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return (
                f"{_cn(cert)!r} is valid {cert.not_valid_before_utc.isoformat()} .. "
                f"{cert.not_valid_after_utc.isoformat()}, not at {now.isoformat()}"
            )
    return None


def _crl_problem(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, subject: x509.Certificate, now: datetime
) -> str | None:
    if crl.issuer != issuer.subject:
        return f"CRL is issued by {crl.issuer.rfc4514_string()!r}, not by {_cn(issuer)!r}"
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        return f"CRL signature does not verify with {_cn(issuer)!r}"
    next_update = crl.next_update_utc
    if not crl.last_update_utc <= now or next_update is None or now > next_update:
        return f"CRL is current {crl.last_update_utc.isoformat()} .. {next_update}, not at {now.isoformat()}"
    if crl.get_revoked_certificate_by_serial_number(subject.serial_number) is not None:
        return f"{_cn(subject)!r} (serial {subject.serial_number:x}) is revoked"
    return None


def _check_signed_json(
    b: VerdictBuilder,
    name: str,
    *,
    what: str,
    signed: bytes,
    signature: bytes,
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    root_crl: x509.CertificateRevocationList | None,
    expected_id: str,
    versions: tuple[int, ...],
    got_id: str,
    version: int,
    issue: datetime,
    next_update: datetime,
    now: datetime,
) -> bool:
    below_root = [c for c in chain if _der(c) != _der(root)]
    problem = _chain_problem(chain, root) or _validity_problem([*below_root, root], now)
    if problem is None and root_crl is not None:
        problem = _crl_problem(root_crl, root, below_root[-1], now)
    if problem is not None:
        return b.check(name, False, f"{what} issuer chain: {problem}")
    key = _cert_p256_key(chain[0])
    if key is None or not _p256_verify(key, signature, signed):
        return b.check(name, False, f"{what} signature does not verify with {_cn(chain[0])!r}")
    if got_id != expected_id or version not in versions:
        return b.check(name, False, f"{what} is {got_id!r} v{version}, expected {expected_id!r} v{versions}")
    if not issue <= now <= next_update:
        return b.check(
            name,
            False,
            f"{what} is current {issue.isoformat()} .. {next_update.isoformat()}, not at {now.isoformat()}",
        )
    return b.check(name, True, f"signed by {_cn(chain[0])!r}; current until {next_update.isoformat()}")


def _tcb_fields(verdict: Verdict) -> dict[str, str]:
    check = verdict.get("tdx.tcb.status")
    if check is None or check.status is not CheckStatus.PASS:
        return {}
    parts = [p.strip().split("=", 1) for p in check.detail.split(";")]
    return {p[0]: p[1] for p in parts if len(p) == 2}


def tcb_status_of(verdict: Verdict) -> str | None:
    """The TCB status ``verify_tdx`` found (when ``tdx.tcb.status`` passed), else None."""
    return _tcb_fields(verdict).get("status")


def tcb_unappraised_reason(verdict: Verdict) -> str | None:
    """Why collateral was given yet no TCB status came out: ``"tdx.tcb.status failed"`` or the
    failed prerequisite (``"tdx.ak.signature failed"``); None when it was appraised or no
    collateral was given. For :func:`~veil.attestation.tdx.validate.validate_tdx`'s
    ``tcb_not_appraised`` (whose check then skips, as this verdict already fails)."""
    check = verdict.get("tdx.tcb.status")
    if check is None or check.status is CheckStatus.PASS:
        return None
    if check.status is CheckStatus.FAIL:
        return "tdx.tcb.status failed"
    cause = check.detail.removeprefix("not checked: ")
    return (
        cause
        if cause != check.detail and cause.removesuffix(" failed") in {c.name for c in verdict.failed}
        else None
    )


def tcb_advisories_of(verdict: Verdict) -> tuple[str, ...]:
    """The advisory IDs of that TCB status (empty when none or not appraised)."""
    ids = _tcb_fields(verdict).get("advisories", "none")
    return () if ids == "none" else tuple(ids.split(","))


def verify_tdx_collateral(collateral: TdxCollateral, options: VerifyOptions) -> Verdict:
    """Check TCB info and QE identity on their own: issuer chains, signatures, windows."""
    root = options.anchor_for(collateral.tcb_info_issuer_chain, intel_sgx_root_ca)
    b = VerdictBuilder()
    _check_collateral_signatures(b, collateral, root, options.now)
    return b.build()


def verify_tdx(
    quote: TdxQuote,
    options: VerifyOptions,
    *,
    collateral: TdxCollateral | None,
) -> Verdict:
    """Verify ``quote`` (signatures, chain, binding) and, given collateral, appraise its TCB.

    ``options.now`` is the moment certificates, CRLs and collateral must be valid at;
    ``options.trusted_roots`` replace the pinned Intel SGX Root CA (tests, other PKIs).
    Never raises for a bad quote: every problem is a failed check.
    """
    now = options.now
    root = options.anchor_for(quote.pck_chain.certificates, intel_sgx_root_ca)
    b = VerdictBuilder()
    td = quote.td_report
    body = f"TD report {td.version}"
    trailer = f"; {len(quote.trailing)} unsigned trailing bytes ignored" if quote.trailing else ""
    b.passed("tdx.quote.parse", f"quote v{quote.version}, {body}{trailer}")
    b.check(
        "tdx.quote.header",
        quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID,
        f"QE vendor id {quote.header.qe_vendor_id.hex()}",
    )

    sig = quote.signature_data
    try:
        ak = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sig.attestation_key)
    except ValueError:
        ak = None
    ak_ok = ak is not None and _p256_verify(ak, sig.signature, quote.signed_region)
    b.check(
        "tdx.ak.signature",
        ak_ok,
        f"over {quote.signed_length} bytes"
        if ak_ok
        else ("attestation key is not a P-256 point" if ak is None else "signature does not verify"),
    )

    chain = quote.pck_chain.certificates
    leaf = chain[0]
    problem = _chain_problem(chain, root)
    if problem is None and _cn(leaf) != "Intel SGX PCK Certificate":
        problem = f"leaf is {_cn(leaf)!r}, not an Intel SGX PCK Certificate"
    if problem is None and (len(chain) < 2 or _cn(chain[1]) not in _PCK_CA_NAMES):
        problem = "the PCK leaf's issuer is not an Intel SGX PCK Platform/Processor CA"
    b.check("tdx.pck.chain", problem is None, problem or f"{_cn(leaf)} ← {_cn(chain[1])} ← {_cn(root)}")
    full_chain = [c for c in chain if _der(c) != _der(root)] + [root]
    validity = _validity_problem(full_chain, now)
    b.check("tdx.pck.validity", validity is None, validity or f"all valid at {now.isoformat()}")

    pck_ext: PckExtensions | None = None
    try:
        pck_ext = parse_pck_extensions(leaf)
    except MalformedInputError as exc:
        b.fail("tdx.pck.extensions", str(exc))

    _check_crls(b, collateral, chain, root, now)

    qe = sig.qe_certification
    leaf_key = _cert_p256_key(leaf)
    qe_sig_ok = leaf_key is not None and _p256_verify(leaf_key, qe.qe_report_signature, qe.qe_report.raw)
    b.check(
        "tdx.qe.signature",
        qe_sig_ok,
        "PCK leaf signs the QE report" if qe_sig_ok else "QE report signature does not verify",
    )
    expected = hashlib.sha256(sig.attestation_key + qe.qe_auth_data).digest() + bytes(32)
    bound = qe.qe_report.report_data == expected
    b.check(
        "tdx.qe.binding",
        bound,
        "QE report_data = SHA-256(attestation key ‖ QE auth data)"
        if bound
        else "QE report_data does not bind the attestation key and QE auth data",
    )

    if collateral is None:
        for name in (
            "tdx.collateral.tcb_info",
            "tdx.collateral.qe_identity",
            "tdx.collateral.fmspc",
            "tdx.qe.identity",
            "tdx.tdx_module",
            "tdx.tcb.status",
            "tdx.tcb.dcap_qvl",
        ):
            b.skip(name, "no collateral given")
        return b.build()

    ours = _appraise(b, quote, collateral, pck=pck_ext, root=root, now=now)
    cross_check_dcap_qvl(b, quote, collateral, root, now, ours=ours if not b.build().failed else None)
    return b.build()


def _check_crls(
    b: VerdictBuilder,
    collateral: TdxCollateral | None,
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    now: datetime,
) -> None:
    if collateral is None or (collateral.pck_crl is None and collateral.root_ca_crl is None):
        b.skip("tdx.pck.crl", "no CRLs given")
        return
    if b.blocked("tdx.pck.crl", "tdx.pck.chain"):
        return
    problems: list[str] = []
    done: list[str] = []
    if len(chain) >= 2 and collateral.pck_crl is not None:
        p = _crl_problem(collateral.pck_crl, chain[1], chain[0], now)
        problems += [f"PCK CRL: {p}"] if p else []
        done.append("PCK CRL")
    if len(chain) >= 2 and collateral.root_ca_crl is not None:
        p = _crl_problem(collateral.root_ca_crl, root, chain[1], now)
        problems += [f"root CA CRL: {p}"] if p else []
        done.append("root CA CRL")
    if problems:
        b.fail("tdx.pck.crl", "; ".join(problems))
    else:
        b.passed("tdx.pck.crl", f"{' and '.join(done)} current; nothing in the PCK chain revoked")


def _check_collateral_signatures(
    b: VerdictBuilder, c: TdxCollateral, root: x509.Certificate, now: datetime
) -> tuple[bool, bool]:
    info, qe_id = c.tcb_info, c.qe_identity
    tcb_ok = _check_signed_json(
        b,
        "tdx.collateral.tcb_info",
        what="TCB info",
        signed=c.tcb_info_json,
        signature=c.tcb_info_signature,
        chain=c.tcb_info_issuer_chain,
        root=root,
        root_crl=c.root_ca_crl,
        expected_id="TDX",
        versions=(3,),
        got_id=info.id,
        version=info.version,
        issue=info.issue_date,
        next_update=info.next_update,
        now=now,
    )
    qe_ok = _check_signed_json(
        b,
        "tdx.collateral.qe_identity",
        what="QE identity",
        signed=c.qe_identity_json,
        signature=c.qe_identity_signature,
        chain=c.qe_identity_issuer_chain,
        root=root,
        root_crl=c.root_ca_crl,
        expected_id="TD_QE",
        versions=(2, 3),
        got_id=qe_id.id,
        version=qe_id.version,
        issue=qe_id.issue_date,
        next_update=qe_id.next_update,
        now=now,
    )
    return tcb_ok, qe_ok


def _appraise(
    b: VerdictBuilder,
    quote: TdxQuote,
    c: TdxCollateral,
    *,
    pck: PckExtensions | None,
    root: x509.Certificate,
    now: datetime,
) -> TcbAppraisal | None:
    """Collateral checks; the merged TCB appraisal when it could be made, else None."""
    info, qe_id = c.tcb_info, c.qe_identity
    tcb_ok, qe_ok = _check_collateral_signatures(b, c, root, now)
    fmspc_ok = False
    # pck is None exactly when tdx.pck.extensions failed, which blocks this check.
    if not b.blocked(
        "tdx.collateral.fmspc", "tdx.pck.chain", "tdx.pck.extensions", "tdx.collateral.tcb_info"
    ):
        fmspc_ok = pck is not None and b.check(
            "tdx.collateral.fmspc",
            pck.fmspc == info.fmspc and pck.pce_id == info.pce_id,
            f"PCK FMSPC {pck.fmspc.hex()} / PCE id {pck.pce_id.hex()}; "
            f"TCB info FMSPC {info.fmspc.hex()} / PCE id {info.pce_id.hex()}",
        )
    qe_level: TcbAppraisal | None = None
    if not b.blocked("tdx.qe.identity", "tdx.qe.signature", "tdx.pck.chain", "tdx.collateral.qe_identity"):
        try:
            qe_level = match_qe_identity(qe_id, quote.signature_data.qe_certification.qe_report)
            b.passed(
                "tdx.qe.identity",
                f"QE ISV SVN {quote.signature_data.qe_certification.qe_report.isv_svn}: {qe_level.status}",
            )
        except TcbError as exc:
            b.fail("tdx.qe.identity", str(exc))
    td = quote.td_report
    module_ok = False
    if not b.blocked("tdx.tdx_module", *_QUOTE_CHAIN, "tdx.collateral.tcb_info"):
        try:
            module_name, module_level = match_tdx_module(info, td, td.tee_tcb_svn)
            module_ok = True
            level_note = f": ISV SVN {td.tee_tcb_svn[0]} {module_level.status}" if module_level else ""
            b.passed("tdx.tdx_module", module_name + level_note)
        except TcbError as exc:
            b.fail("tdx.tdx_module", str(exc))

    if b.blocked("tdx.tcb.status", *TCB_PREREQUISITES):
        return None
    if pck is None or qe_level is None or not (tcb_ok and qe_ok and fmspc_ok and module_ok):
        b.fail("tdx.tcb.status", "not appraised: a check above did not pass")  # pragma: no cover
        return None
    try:
        launch, current, final = evaluate_tdx_tcb(info, pck, td, qe_level)
    except TcbError as exc:
        b.fail("tdx.tcb.status", str(exc))
        return None
    advisories = ",".join(final.advisory_ids) or "none"
    parts = [
        f"{TCB_STATUS_DETAIL_PREFIX}{final.status}",
        f"advisories={advisories}",
        f"launch TCB {launch.result.status} (platform {launch.platform.status}, "
        f"tcbDate {launch.platform.tcb_date}"
        + (f", module {launch.module.status}" if launch.module else "")
        + f", QE {qe_level.status})",
    ]
    if current is not None:
        parts.append(f"current TCB (tee_tcb_svn2) {current.result.status}")
    parts.append(f"tcbEvaluationDataNumber {info.tcb_evaluation_data_number}")
    b.check("tdx.tcb.status", final.status != "Revoked", "; ".join(parts))
    return final
