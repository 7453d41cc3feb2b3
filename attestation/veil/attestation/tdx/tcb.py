"""TDX TCB appraisal: which TCB level a quote's platform, TDX module and QE sit at.

Follows Intel's Quote Verification Library (``checkTcbLevel`` / ``tdxEvaluateTCB``),
as dcap-qvl 0.7 does:

* **Platform level** — levels in canonical order (SGX components, then PCE SVN,
  then TDX components, highest first); the first whose 16 SGX components and PCE
  SVN are all ≤ the PCK certificate's and whose TDX components are all ≤ the TEE
  TCB SVN (from index 2 when ``tee_tcb_svn[1] > 0``: bytes 0–1 are then the TDX
  module's ISV SVN and version, appraised by its module identity instead).
* **TDX module** — ``tdxModule`` names the expected MRSIGNERSEAM and SEAM attributes
  (under a mask); when ``tee_tcb_svn[1] > 0`` the ``tdxModuleIdentities`` entry
  ``TDX_<version, 2 hex digits>`` replaces them and its levels, matched by ISV SVN
  ``tee_tcb_svn[0]``, give the module's status.
* **QE** — MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES (masked) against the QE
  identity; its levels, matched by the QE report's ISV SVN, give the QE's status.
* **Convergence** — the platform status, worsened by a component (module, then QE)
  that is ``OutOfDate`` (``ConfigurationNeeded`` platforms become
  ``OutOfDateConfigurationNeeded``) or ``Revoked``; other component statuses leave
  it as it is. Advisory IDs are the union, in order of first appearance.
* **Relaunch** (TD report 1.5) — the same evaluation runs on ``tee_tcb_svn2``, the
  *current* TEE TCB after TD-preserving module updates (it must match a level too);
  when the launch TCB is out of date but the current one is not, the status is
  ``TDRelaunchAdvised`` (or ``TDRelaunchAdvisedConfigurationNeeded``): relaunching
  the TD would make it current. Advisories stay those of the launch TCB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from veil.attestation.tdx.collateral import QeIdentity, QeTcbLevel, TcbInfo, TcbLevel, TdxModuleIdentity
from veil.attestation.tdx.pck import PckExtensions
from veil.attestation.tdx.quote import EnclaveReport, TdReport

__all__ = [
    "RELAUNCH_STATUSES",
    "TcbAppraisal",
    "TcbError",
    "TdxTcbEvaluation",
    "check_for_relaunch",
    "converge",
    "evaluate_tdx_tcb",
    "match_platform_level",
    "match_qe_identity",
    "match_tdx_module",
]

_OUT_OF_DATE = ("OutOfDate", "OutOfDateConfigurationNeeded")
_CONFIG = (
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDateConfigurationNeeded",
    "TDRelaunchAdvisedConfigurationNeeded",
)
_CURRENT_OK = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded")
RELAUNCH_STATUSES = ("TDRelaunchAdvised", "TDRelaunchAdvisedConfigurationNeeded")


class TcbError(Exception):
    """A TCB appraisal step found no acceptable match; the message says which and why.

    Internal to the TDX verifier, which turns it into a failed check.
    """


@dataclass(frozen=True, slots=True)
class TcbAppraisal:
    """A status with its advisory IDs and the TCB date of the level it came from."""

    status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str = ""


def converge(platform: TcbAppraisal, component: TcbAppraisal | None) -> TcbAppraisal:
    """Intel's convergence of a platform status with a component's (TDX module or QE)."""
    if component is None:
        return platform
    status = platform.status
    if component.status == "Revoked":
        status = "Revoked"
    elif component.status == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded"):
            status = "OutOfDate"
        elif status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            status = "OutOfDateConfigurationNeeded"
    advisories = platform.advisory_ids + tuple(
        i for i in component.advisory_ids if i not in platform.advisory_ids
    )
    return TcbAppraisal(status, advisories, platform.tcb_date)


def check_for_relaunch(launch: TcbAppraisal, current: TcbAppraisal) -> TcbAppraisal:
    """Intel's ``checkForRelaunch``: an out-of-date launch TCB whose current TCB is not."""
    if launch.status not in _OUT_OF_DATE or current.status not in _CURRENT_OK:
        return launch
    config = launch.status in _CONFIG or current.status in _CONFIG
    return TcbAppraisal(
        RELAUNCH_STATUSES[1] if config else RELAUNCH_STATUSES[0], launch.advisory_ids, launch.tcb_date
    )


def _masked_equal(actual: bytes, expected: bytes, mask: bytes) -> bool:
    return len(actual) == len(expected) == len(mask) and all(
        (x & m) == (y & m) for x, y, m in zip(actual, expected, mask, strict=True)
    )


def _canonical(levels: Iterable[TcbLevel]) -> list[TcbLevel]:
    return sorted(levels, key=lambda lv: (lv.sgx_components, lv.pce_svn, lv.tdx_components), reverse=True)


def match_platform_level(tcb_info: TcbInfo, pck: PckExtensions, tee_tcb_svn: bytes) -> TcbAppraisal:
    """The platform's TCB level: PCK TCB components + PCE SVN, and a TEE TCB SVN."""
    start = 2 if tee_tcb_svn[1] > 0 else 0
    for level in _canonical(tcb_info.tcb_levels):
        if len(level.tdx_components) != 16:
            raise TcbError("a TCB level of the TDX TCB info has no 16 tdxtcbcomponents")
        if level.pce_svn > pck.pce_svn:
            continue
        if any(have < need for have, need in zip(pck.tcb_components, level.sgx_components, strict=True)):
            continue
        if any(tee_tcb_svn[i] < level.tdx_components[i] for i in range(start, 16)):
            continue
        return TcbAppraisal(level.tcb_status, level.advisory_ids, level.tcb_date)
    raise TcbError(
        f"no matching TCB level for TEE TCB SVN {tee_tcb_svn.hex()}: the platform's CPU SVN, PCE SVN "
        "or TEE TCB SVN is below every level of the TCB info (Intel: TCB_NOT_SUPPORTED)"
    )


def _module_identity(tcb_info: TcbInfo, version: int) -> TdxModuleIdentity:
    if version > 0 and tcb_info.tdx_module_identities:
        wanted = f"TDX_{version:02X}"
        for identity in tcb_info.tdx_module_identities:
            if identity.id.upper() == wanted:
                return identity
        raise TcbError(f"TCB info has no TDX module identity {wanted}")
    if tcb_info.tdx_module is None:
        raise TcbError("TDX TCB info has no tdxModule")
    return tcb_info.tdx_module


def match_tdx_module(tcb_info: TcbInfo, td: TdReport, tee_tcb_svn: bytes) -> tuple[str, TcbAppraisal | None]:
    """Check MRSIGNERSEAM / SEAM attributes; return (identity id, the module's level or None)."""
    identity = _module_identity(tcb_info, tee_tcb_svn[1])
    name = identity.id or "tdxModule"
    if td.mr_signer_seam != identity.mrsigner:
        raise TcbError(f"MRSIGNERSEAM is not the {name} signer {identity.mrsigner.hex()}")
    if not _masked_equal(td.seam_attributes, identity.attributes, identity.attributes_mask):
        raise TcbError(f"SEAM attributes {td.seam_attributes.hex()} do not match {name} under its mask")
    if not identity.tcb_levels:
        return name, None
    level = _isv_level(identity.tcb_levels, tee_tcb_svn[0])
    if level is None:
        raise TcbError(f"TDX module ISV SVN {tee_tcb_svn[0]} is below every {name} TCB level")
    return name, TcbAppraisal(level.tcb_status, level.advisory_ids, level.tcb_date)


def _isv_level(levels: Iterable[QeTcbLevel], isv_svn: int) -> QeTcbLevel | None:
    ordered = sorted(levels, key=lambda lv: lv.isv_svn, reverse=True)
    return next((lv for lv in ordered if isv_svn >= lv.isv_svn), None)


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


@dataclass(frozen=True, slots=True)
class TdxTcbEvaluation:
    """The appraisal of one TEE TCB SVN: its parts and the converged result."""

    platform: TcbAppraisal
    module_id: str
    module: TcbAppraisal | None
    result: TcbAppraisal


def _evaluate(
    tcb_info: TcbInfo, pck: PckExtensions, td: TdReport, qe: TcbAppraisal, tee_tcb_svn: bytes
) -> TdxTcbEvaluation:
    platform = match_platform_level(tcb_info, pck, tee_tcb_svn)
    module_id, module = match_tdx_module(tcb_info, td, tee_tcb_svn)
    return TdxTcbEvaluation(platform, module_id, module, converge(converge(platform, module), qe))


def evaluate_tdx_tcb(
    tcb_info: TcbInfo, pck: PckExtensions, td: TdReport, qe: TcbAppraisal
) -> tuple[TdxTcbEvaluation, TdxTcbEvaluation | None, TcbAppraisal]:
    """(launch evaluation, current evaluation for TD 1.5 or None, final status)."""
    launch = _evaluate(tcb_info, pck, td, qe, td.tee_tcb_svn)
    if td.tee_tcb_svn2 is None:
        return launch, None, launch.result
    try:
        current = _evaluate(tcb_info, pck, td, qe, td.tee_tcb_svn2)
    except TcbError as exc:
        raise TcbError(f"current TEE TCB (tee_tcb_svn2): {exc}") from None
    return launch, current, check_for_relaunch(launch.result, current.result)
