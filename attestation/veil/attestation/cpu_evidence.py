"""The CPU half of :func:`veil.attestation.bundle.verify_evidence`: one verifier per platform.

SEV-SNP (real and simulated) — :func:`~veil.attestation.snp.verify.verify_snp` and
:func:`~veil.attestation.snp.validate.validate_snp` over REPORT_DATA; TDX —
:func:`~veil.attestation.tdx.verify.verify_tdx` with the stapled Intel collateral
(``collateral.intel``) and :func:`~veil.attestation.tdx.validate.validate_tdx`; Azure SEV-SNP / TDX
— the hardware report inside the HCL report (``azure.*``), where Veil's 64 bytes are the HCL
user-data and the vTPM quote carries ``binding.tpm_nonce(report_data)``; ``azure.cpu_report``:
``Evidence.cpu_report`` is the HCL's SNP report. Each returns a :class:`CpuResult` (where the
bound 64 bytes sit, the measurement, the policy appraisal) or None. Pure: no I/O.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, replace

from cryptography import x509

from veil.attestation.binding import tpm_nonce
from veil.attestation.errors import MalformedInputError, VeilAttestationError
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import PlatformName, Policy, vendor_amd_roots
from veil.attestation.snp.azure import TpmQuote, parse_hcl_report, parse_runtime_data
from veil.attestation.snp.azure_verify import verify_azure_snp
from veil.attestation.snp.certs import load_certificates
from veil.attestation.snp.validate import validate_snp
from veil.attestation.snp.verify import verify_snp_bytes
from veil.attestation.stapled import stapled_amd_crl, stapled_intel
from veil.attestation.tdx.azure_verify import verify_azure_tdx
from veil.attestation.tdx.collateral import TdxCollateral
from veil.attestation.tdx.quote import TdxQuote, parse_tdx_quote
from veil.attestation.tdx.validate import validate_tdx
from veil.attestation.tdx.verify import (
    intel_sgx_root_ca,
    tcb_advisories_of,
    tcb_status_of,
    tcb_unappraised_reason,
    verify_tdx,
)
from veil.attestation.verdict import Verdict, VerdictBuilder
from veil.proto.v1 import evidence_pb2

__all__ = ["CpuResult", "azure_tpm_quote", "verify_cpu"]

_SNP_PLATFORMS = (PlatformName.SEV_SNP, PlatformName.SIMULATED_SEV_SNP)


@dataclass(frozen=True, slots=True)
class CpuResult:
    """A verified CPU report, whatever the platform: where Veil's 64 bytes sit, and its appraisal."""

    report_data: bytes  # the SNP/TDX REPORT_DATA, or on Azure the HCL user-data (hardware-bound)
    measurement: bytes  # SNP launch measurement / TDX MRTD
    appraise: Callable[[Policy, bytes | None], Verdict]  # the policy.* checks of the CPU fields


def verify_cpu(
    v: VerdictBuilder,
    msg: evidence_pb2.Evidence,
    *,
    platform: PlatformName | None,
    policy: Policy,
    options: VerifyOptions,
    expected: bytes | None,
) -> CpuResult | None:
    if platform in _SNP_PLATFORMS or platform is PlatformName.AZURE_SEV_SNP:
        return _verify_snp(v, msg, platform=platform, policy=policy, options=options, expected=expected)
    if platform in (PlatformName.TDX, PlatformName.AZURE_TDX):
        return _verify_tdx(v, msg, platform=platform, policy=policy, options=options, expected=expected)
    name = platform.value if platform else f"unknown platform {msg.platform}"
    v.fail("platform.verify", f"{name}: verification of this platform is not supported by this client")
    return None


def azure_tpm_quote(msg: evidence_pb2.Evidence) -> TpmQuote:
    azure = msg.azure
    return TpmQuote(bytes(azure.tpm_quote_message), bytes(azure.tpm_quote_signature), tuple(azure.pcrs))


def _azure_user_data(msg: evidence_pb2.Evidence) -> bytes | None:
    """The HCL user-data (Veil's report_data on Azure); None when it is missing or unparsable
    (``azure.*`` checks have said why)."""
    try:
        return parse_runtime_data(parse_hcl_report(bytes(msg.azure.hcl_report)).variable_data).user_data
    except VeilAttestationError:
        return None


def _verify_snp(
    v: VerdictBuilder,
    msg: evidence_pb2.Evidence,
    *,
    platform: PlatformName | None,
    policy: Policy,
    options: VerifyOptions,
    expected: bytes | None,
) -> CpuResult | None:
    roots: tuple[x509.Certificate, ...]
    if platform is PlatformName.SIMULATED_SEV_SNP:
        roots = policy.trusted_roots.simulation_roles()[0]
        if not roots:
            v.fail("snp.chain.ark", "simulated evidence, and the policy trusts no simulation root")
            return None
    else:
        amd = policy.trusted_roots.amd
        if not amd:
            v.fail("snp.chain.ark", "the policy trusts no AMD root")
            return None
        # The package's own ARKs (no roots in the options): verify_snp fills in a missing ASK too.
        roots = () if amd == vendor_amd_roots() else amd
    try:
        certs = load_certificates(bytes(msg.cpu_cert_chain)) if msg.cpu_cert_chain else []
    except MalformedInputError as exc:
        v.fail("snp.chain.parse", str(exc))
        certs = []
    try:
        crl = stapled_amd_crl(msg.collateral)
    except MalformedInputError as exc:
        v.fail("snp.chain.crl", str(exc))
        crl, crl_problem = None, True
    else:
        crl_problem = False
    snp_options = replace(options, trusted_roots=roots)
    azure = platform is PlatformName.AZURE_SEV_SNP
    if azure:
        _check_azure_cpu_report(v, msg)
        report, verdict = verify_azure_snp(
            bytes(msg.azure.hcl_report),
            azure_tpm_quote(msg),
            certs,
            snp_options,
            nonce=tpm_nonce(expected) if expected is not None else None,
            user_data=expected,
            crl=crl,
        )
    else:
        report, verdict = verify_snp_bytes(bytes(msg.cpu_report), certs, snp_options, crl=crl)
    for check in verdict.checks:
        if check.name != "snp.chain.crl" or crl is not None:
            v.extend([check])
        elif crl_problem:
            continue  # already failed above, naming why
        elif policy.require_crl:
            v.fail(
                "snp.chain.crl",
                "no AMD CRL stapled (Evidence.collateral.amd.crl): the policy requires the "
                "ASK/ASVK checked against a current ARK-signed CRL",
            )
        else:
            v.skip("snp.chain.crl", "no AMD CRL stapled, and the policy does not require one")
    if report is None:
        return None
    snp = report
    if azure:
        # The SNP report's REPORT_DATA is H(var_data); Veil's 64 bytes are the bound user-data.
        user_data = _azure_user_data(msg)
        if user_data is None:
            return None
        return CpuResult(user_data, snp.measurement, lambda p, _e: validate_snp(snp, p.snp_policy(snp, None)))
    return CpuResult(snp.report_data, snp.measurement, lambda p, e: validate_snp(snp, p.snp_policy(snp, e)))


def _check_azure_cpu_report(v: VerdictBuilder, msg: evidence_pb2.Evidence) -> None:
    """``azure.cpu_report``: ``Evidence.cpu_report`` is the SNP report inside the HCL report (the one
    verified), so no unverified copy travels beside it."""
    try:
        inner = parse_hcl_report(bytes(msg.azure.hcl_report)).snp_report_bytes
    except VeilAttestationError as exc:
        v.fail("azure.cpu_report", f"no SNP report in the HCL report: {exc}")
        return
    same = hmac.compare_digest(bytes(msg.cpu_report), inner)
    v.check(
        "azure.cpu_report",
        same,
        "cpu_report is the HCL report's SNP report"
        if same
        else "cpu_report differs from the HCL report's SNP report",
    )


def _verify_tdx(
    v: VerdictBuilder,
    msg: evidence_pb2.Evidence,
    *,
    platform: PlatformName,
    policy: Policy,
    options: VerifyOptions,
    expected: bytes | None,
) -> CpuResult | None:
    roots = policy.trusted_roots.intel
    if not roots:
        v.fail("tdx.pck.chain", "the policy trusts no Intel root")
        return None
    try:
        quote = parse_tdx_quote(bytes(msg.cpu_report))
    except VeilAttestationError as exc:
        v.fail("tdx.quote.parse", str(exc))
        return None
    collateral: TdxCollateral | None = None
    try:
        collateral = stapled_intel(msg.collateral)
    except VeilAttestationError as exc:
        v.fail("collateral.intel", f"the stapled Intel collateral does not parse: {exc}")
    else:
        if collateral is None:
            v.skip("collateral.intel", "no Intel collateral stapled: the TCB status cannot be appraised")
        else:
            v.passed("collateral.intel", "TCB info, QE identity and CRLs stapled")
    # The shipped Intel root: no roots in the options (verify_tdx pins it itself).
    tdx_options = replace(options, trusted_roots=() if roots == (intel_sgx_root_ca(),) else roots)
    azure = platform is PlatformName.AZURE_TDX
    if azure:
        verdict = verify_azure_tdx(
            quote,
            bytes(msg.azure.hcl_report),
            azure_tpm_quote(msg),
            tdx_options,
            collateral=collateral,
            nonce=tpm_nonce(expected) if expected is not None else None,
            user_data=expected,
        )
        bound = _azure_user_data(msg)
    else:
        verdict = verify_tdx(quote, tdx_options, collateral=collateral)
        bound = quote.td_report.report_data
    v.extend(verdict.checks)
    if bound is None:
        return None

    def appraise(p: Policy, e: bytes | None) -> Verdict:
        return _validate_tdx(quote, verdict, p, None if azure else e)

    return CpuResult(bound, quote.td_report.mr_td, appraise)


def _validate_tdx(quote: TdxQuote, verdict: Verdict, policy: Policy, report_data: bytes | None) -> Verdict:
    return validate_tdx(
        quote,
        policy.tdx_policy(report_data),
        tcb_status=tcb_status_of(verdict),
        advisory_ids=tcb_advisories_of(verdict),
        tcb_not_appraised=tcb_unappraised_reason(verdict),
    )
