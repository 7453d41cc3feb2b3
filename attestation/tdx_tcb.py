"""TDX TCB appraisal: which TCB level a quote's platform, TDX module and QE sit at.

Follows Intel's Quote Verification Library (and go-tdx-guest):

* **Platform level** — levels in canonical order (SGX components, then PCE SVN,
  then TDX components, highest first); the first whose 16 SGX components and PCE
  SVN are all ≤ the PCK certificate's and whose TDX components are all ≤ the TD
  report's ``tee_tcb_svn`` (from index 2 when ``tee_tcb_svn[1] > 0``: bytes 0–1 are
  then the module's SVN and version, appraised by the module identity instead).
* **TDX module** — ``tdxModule`` names the expected MRSIGNERSEAM and SEAM
  attributes (under a mask); when ``tee_tcb_svn[1] > 0`` the ``tdxModuleIdentities``
  entry ``TDX_<version as 2 hex digits>`` overrides them and its levels, matched by
  ISV SVN ``tee_tcb_svn[0]``, give the module's own status.
* **QE** — MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES (masked) against the QE
  identity; its levels, matched by the QE report's ISV SVN, give the QE status.
* **Merge** — worst of the three, where "out of date" and "configuration needed"
  combine into ``OutOfDateConfigurationNeeded`` as Intel's QVL does; advisory IDs
  are the union, in order of first appearance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from veil.attestation.tdx import EnclaveReport, TdReport
from veil.attestation.tdx_collateral import QeIdentity, QeTcbLevel, TcbInfo, TcbLevel, TdxModuleIdentity
from veil.attestation.tdx_pck import PckExtensions

__all__ = [
    "TcbAppraisal",
    "TcbError",
    "match_platform_level",
    "match_qe_identity",
    "match_tdx_module",
    "merge_status",
]

_OUT_OF_DATE = {"OutOfDate", "OutOfDateConfigurationNeeded"}
_CONFIG = {"ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded", "OutOfDateConfigurationNeeded"}
_SW = {"SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"}


class TcbError(Exception):
    """A TCB appraisal step found no acceptable match; the message says which and why.

    Internal to the TDX verifier, which turns it into a failed check.
    """


@dataclass(frozen=True, slots=True)
class TcbAppraisal:
    """A status with its advisory IDs and where it came from."""

    status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str = ""


def merge_status(a: str, b: str) -> str:
    """The worse of two TCB statuses, combining out-of-date with configuration-needed."""
    statuses = {a, b}
    if "Revoked" in statuses:
        return "Revoked"
    out_of_date = bool(statuses & _OUT_OF_DATE)
    config = bool(statuses & _CONFIG)
    if out_of_date:
        return "OutOfDateConfigurationNeeded" if config else "OutOfDate"
    sw = bool(statuses & _SW)
    if config:
        return "ConfigurationAndSWHardeningNeeded" if sw else "ConfigurationNeeded"
    return "SWHardeningNeeded" if sw else "UpToDate"


def merge(appraisals: Iterable[TcbAppraisal]) -> TcbAppraisal:
    status = "UpToDate"
    advisories: list[str] = []
    for a in appraisals:
        status = merge_status(status, a.status)
        advisories += [i for i in a.advisory_ids if i not in advisories]
    return TcbAppraisal(status, tuple(advisories))


def _masked_equal(actual: bytes, expected: bytes, mask: bytes) -> bool:
    return len(actual) == len(expected) == len(mask) and all(
        (x & m) == (y & m) for x, y, m in zip(actual, expected, mask, strict=True)
    )


def _canonical(levels: Iterable[TcbLevel]) -> list[TcbLevel]:
    return sorted(levels, key=lambda lv: (lv.sgx_components, lv.pce_svn, lv.tdx_components), reverse=True)


def match_platform_level(tcb_info: TcbInfo, pck: PckExtensions, td: TdReport) -> TcbAppraisal:
    """The platform's TCB level: PCK TCB components + PCE SVN, and the TD's TEE TCB SVN."""
    start = 2 if td.tee_tcb_svn[1] > 0 else 0
    for level in _canonical(tcb_info.tcb_levels):
        if len(level.tdx_components) != 16:
            raise TcbError("a TCB level of the TDX TCB info has no 16 tdxtcbcomponents")
        if level.pce_svn > pck.pce_svn:
            continue
        if any(have < need for have, need in zip(pck.tcb_components, level.sgx_components, strict=True)):
            continue
        if any(td.tee_tcb_svn[i] < level.tdx_components[i] for i in range(start, 16)):
            continue
        return TcbAppraisal(level.tcb_status, level.advisory_ids, level.tcb_date)
    raise TcbError(
        "no matching TCB level: the platform's CPU SVN, PCE SVN or TEE TCB SVN is below "
        "every level of the TCB info (Intel: TCB_NOT_SUPPORTED)"
    )


def _module_identity(tcb_info: TcbInfo, td: TdReport) -> TdxModuleIdentity:
    version = td.tee_tcb_svn[1]
    if version > 0 and tcb_info.tdx_module_identities:
        wanted = f"TDX_{version:02X}"
        for identity in tcb_info.tdx_module_identities:
            if identity.id.upper() == wanted:
                return identity
        raise TcbError(f"TCB info has no TDX module identity {wanted}")
    if tcb_info.tdx_module is None:
        raise TcbError("TDX TCB info has no tdxModule")
    return tcb_info.tdx_module


def match_tdx_module(tcb_info: TcbInfo, td: TdReport) -> tuple[str, TcbAppraisal | None]:
    """Check MRSIGNERSEAM / SEAM attributes; return (identity id, module level or None)."""
    identity = _module_identity(tcb_info, td)
    name = identity.id or "tdxModule"
    if td.mr_signer_seam != identity.mrsigner:
        raise TcbError(f"MRSIGNERSEAM is not the {name} signer {identity.mrsigner.hex()}")
    if not _masked_equal(td.seam_attributes, identity.attributes, identity.attributes_mask):
        raise TcbError(f"SEAM attributes {td.seam_attributes.hex()} do not match {name} under its mask")
    if not identity.tcb_levels:
        return name, None
    isv_svn = td.tee_tcb_svn[0]
    level = _isv_level(identity.tcb_levels, isv_svn)
    if level is None:
        raise TcbError(f"TDX module ISV SVN {isv_svn} is below every {name} TCB level")
    return name, TcbAppraisal(level.tcb_status, level.advisory_ids, level.tcb_date)


def _isv_level(levels: Iterable[QeTcbLevel], isv_svn: int) -> QeTcbLevel | None:
    return next(
        (lv for lv in sorted(levels, key=lambda lv: lv.isv_svn, reverse=True) if isv_svn >= lv.isv_svn), None
    )


def match_qe_identity(qe: QeIdentity, report: EnclaveReport) -> TcbAppraisal:
    """Check the QE report against the QE identity; return the QE's TCB level."""
    if report.mr_signer != qe.mrsigner:
        raise TcbError(f"QE MRSIGNER {report.mr_signer.hex()} is not {qe.mrsigner.hex()}")
    if report.isv_prod_id != qe.isv_prod_id:
        raise TcbError(f"QE ISVPRODID {report.isv_prod_id} is not {qe.isv_prod_id}")
    if (report.misc_select & qe.miscselect_mask) != (qe.miscselect & qe.miscselect_mask):
        raise TcbError("QE MISCSELECT does not match the QE identity under its mask")
    if not _masked_equal(report.attributes, qe.attributes, qe.attributes_mask):
        raise TcbError("QE ATTRIBUTES do not match the QE identity under its mask")
    level = _isv_level(qe.tcb_levels, report.isv_svn)
    if level is None:
        raise TcbError(f"QE ISV SVN {report.isv_svn} is below every QE identity TCB level")
    return TcbAppraisal(level.tcb_status, level.advisory_ids, level.tcb_date)
