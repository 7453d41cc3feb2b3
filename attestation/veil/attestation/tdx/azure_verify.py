"""Azure confidential VMs (TDX) **verify**: the TD quote, the HCL report it binds, the vTPM quote.

On an Azure TDX CVM the paravisor publishes an HCL report (vTPM NV index 0x01400001) whose
hardware part is the 1024-byte ``TDREPORT`` (report type 4), and the guest turns that TD
report into a quote at Azure's quote endpoint (``http://169.254.169.254/acc/tdquote``). The
TD's ``REPORTDATA`` is ``H(var_data) ‖ zeros``, which binds the vTPM attestation key (and the
``user-data``) in the HCL variable data to the Intel-signed quote; the vTPM quote then binds
the PCRs and the caller's nonce. So :func:`verify_azure_tdx` runs:

* :func:`~veil.attestation.tdx.verify.verify_tdx` on the quote (``tdx.*``);
* ``azure.hcl.parse`` — the HCL report parses and carries a TD report;
* ``azure.hcl.td_report`` — the HCL's TD report is the one quoted: its ``REPORTDATA``, MRTD and
  RTMRs equal the quote's (the ``TDREPORT`` MAC is not verifiable outside the TD; the quote is);
* ``azure.hcl.binding`` — the quoted ``REPORTDATA`` is H(var_data) ‖ zeros;
* the vTPM checks of :func:`~veil.attestation.snp.azure_verify.verify_vtpm`.

``TDREPORT`` layout (Intel TDX module ABI): ``REPORTMACSTRUCT`` (256 bytes, ``REPORTDATA`` at
128), ``TEE_TCB_INFO`` (239) + 17 reserved, ``TDINFO`` at 512: ATTRIBUTES, XFAM, MRTD (at 528),
MRCONFIGID, MROWNER, MROWNERCONFIG, RTMR0-3 (at 720).
"""

from __future__ import annotations

import hmac

from veil.attestation.errors import MalformedInputError, UnsupportedError
from veil.attestation.options import VerifyOptions
from veil.attestation.snp.azure import TpmQuote, parse_hcl_report
from veil.attestation.snp.azure_verify import check_hcl_binding, verify_vtpm
from veil.attestation.tdx.collateral import TdxCollateral
from veil.attestation.tdx.quote import TdxQuote
from veil.attestation.tdx.verify import verify_tdx
from veil.attestation.verdict import Verdict, VerdictBuilder

__all__ = ["TD_REPORT_MRTD", "TD_REPORT_REPORT_DATA", "TD_REPORT_RTMRS", "verify_azure_tdx"]

TD_REPORT_REPORT_DATA = slice(128, 192)
TD_REPORT_MRTD = slice(528, 576)
TD_REPORT_RTMRS = slice(720, 912)


def verify_azure_tdx(
    quote: TdxQuote,
    hcl_report: bytes,
    tpm_quote: TpmQuote,
    options: VerifyOptions,
    *,
    collateral: TdxCollateral | None,
    nonce: bytes | None = None,
    user_data: bytes | None = None,
) -> Verdict:
    """Verify Azure TDX CVM evidence end to end (see the module docstring).

    ``nonce`` is the vTPM quote's expected ``extraData`` and ``user_data`` the HCL user-data
    (each skipped when None), as for :func:`~veil.attestation.snp.azure_verify.verify_azure_snp`.
    Never raises for bad evidence.
    """
    b = VerdictBuilder()
    b.extend(verify_tdx(quote, options, collateral=collateral).checks)
    try:
        hcl = parse_hcl_report(hcl_report)
        td_report = hcl.td_report_bytes
    except (MalformedInputError, UnsupportedError) as exc:
        b.fail("azure.hcl.parse", str(exc))
        return b.build()
    b.passed("azure.hcl.parse", f"HCL report v{hcl.version}, TDX")
    td = quote.td_report
    same = (
        hmac.compare_digest(td_report[TD_REPORT_REPORT_DATA], td.report_data)
        and hmac.compare_digest(td_report[TD_REPORT_MRTD], td.mr_td)
        and hmac.compare_digest(td_report[TD_REPORT_RTMRS], b"".join(td.rtmrs))
    )
    b.check(
        "azure.hcl.td_report",
        same,
        "the HCL's TD report is the quoted one (REPORTDATA, MRTD, RTMRs)"
        if same
        else "the HCL's TD report differs from the quoted TD report",
    )
    check_hcl_binding(b, hcl, td.report_data)
    verify_vtpm(b, hcl, tpm_quote, nonce=nonce, user_data=user_data)
    return b.build()
