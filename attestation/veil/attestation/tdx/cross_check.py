"""``tdx.tcb.dcap_qvl``: a second, independent appraisal of a TDX quote by Phala's dcap-qvl.

After Veil's own verification (:mod:`veil.attestation.tdx.verify`), the same quote,
collateral, root and time go to dcap-qvl (a Rust port of Intel's QVL, optional); the check
passes when both accept with the same TCB status and advisories, or both reject. dcap-qvl
refuses some TD attributes itself (debug, …) which Veil leaves to the policy
(:mod:`veil.attestation.tdx.validate`): then the check is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.tdx.collateral import TdxCollateral
from veil.attestation.tdx.quote import TdxQuote
from veil.attestation.tdx.tcb import TcbAppraisal
from veil.attestation.verdict import VerdictBuilder

__all__ = ["cross_check_dcap_qvl"]

# dcap-qvl refuses these TD attributes itself; Veil leaves them to the policy (policy.debug …).
_DCAP_ATTRIBUTE_REFUSALS = (
    "Debug mode is enabled",
    "TD profiling is enabled",
    "SERVTD_EXT is enabled",
    "SEPT_VE_DISABLE is not enabled",
    "TD migration is enabled",
    "Reserved bits in TD attributes are set",
    "Invalid MR service TD",
)


def _pem(chain: Sequence[x509.Certificate]) -> str:
    return "".join(cert.public_bytes(Encoding.PEM).decode() for cert in chain)


def cross_check_dcap_qvl(
    b: VerdictBuilder,
    quote: TdxQuote,
    c: TdxCollateral,
    root: x509.Certificate,
    now: datetime,
    *,
    ours: TcbAppraisal | None,
) -> None:
    """Ask dcap-qvl for its appraisal and compare it with ours (None: Veil rejected the quote)."""
    name = "tdx.tcb.dcap_qvl"
    if c.pck_crl_der is None or c.root_ca_crl_der is None or not c.pck_crl_issuer_chain:
        b.skip(name, "dcap-qvl needs both CRLs and the PCK CRL issuer chain")
        return
    try:
        import dcap_qvl
    except ImportError:
        b.skip(name, "dcap-qvl is not installed")
        return
    try:
        coll: Any = dcap_qvl.QuoteCollateralV3(
            pck_crl_issuer_chain=_pem(c.pck_crl_issuer_chain),
            root_ca_crl=c.root_ca_crl_der,
            pck_crl=c.pck_crl_der,
            tcb_info_issuer_chain=_pem(c.tcb_info_issuer_chain),
            tcb_info=c.tcb_info_json.decode("utf-8"),
            tcb_info_signature=c.tcb_info_signature,
            qe_identity_issuer_chain=_pem(c.qe_identity_issuer_chain),
            qe_identity=c.qe_identity_json.decode("utf-8"),
            qe_identity_signature=c.qe_identity_signature,
        )
        report = dcap_qvl.verify_with_root_ca(
            quote.raw, coll, root.public_bytes(Encoding.DER), int(now.timestamp())
        )
    except BaseException as exc:
        if not isinstance(exc, ValueError | RuntimeError) and type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt and friends; a Rust panic (pyo3 PanicException) is a rejection
        message = " ".join(str(exc).split())
        if any(m in message for m in _DCAP_ATTRIBUTE_REFUSALS):
            b.skip(name, f"dcap-qvl refuses the TD attributes ({message}); left to the policy checks")
        elif ours is not None:
            b.fail(name, f"dcap-qvl rejects what Veil accepts: {message}")
        else:
            b.passed(name, f"dcap-qvl also rejects: {message}")
        return
    status, advisories = str(report.status), tuple(str(a) for a in report.advisory_ids)
    if ours is None:
        b.fail(name, f"dcap-qvl accepts ({status}) what Veil rejects")
        return
    same_advisories = set(advisories) == set(ours.advisory_ids)
    if status == ours.status and same_advisories:
        b.passed(name, f"dcap-qvl agrees: {status}, advisories {','.join(advisories) or 'none'}")
    else:
        b.fail(name, f"dcap-qvl: {status} {list(advisories)}; Veil: {ours.status} {list(ours.advisory_ids)}")
