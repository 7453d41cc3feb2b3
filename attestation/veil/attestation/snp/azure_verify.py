"""Azure confidential VMs (SEV-SNP) **verify**: the SNP report, the HCL binding, the vTPM quote.

:func:`verify_azure_snp` checks Azure SNP CVM evidence (parsed by
:mod:`veil.attestation.snp.azure`) end to end: the SNP report inside the HCL report exactly
as :func:`veil.attestation.snp.verify.verify_snp` does, that the report binds the HCL
variable data (and so the vTPM attestation key), and the vTPM quote signed by that key.
Clock and roots come in one :class:`~veil.attestation.options.VerifyOptions`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from veil.attestation.errors import MalformedInputError
from veil.attestation.options import VerifyOptions
from veil.attestation.snp.azure import (
    AK_KEY_ID,
    PCR_COUNT,
    TPM_ALG_SHA256,
    HclReport,
    RuntimeData,
    TpmQuote,
    TpmsAttest,
    parse_hcl_report,
    parse_runtime_data,
    parse_tpms_attest,
)
from veil.attestation.snp.report import Product, SnpReport
from veil.attestation.snp.verify import verify_snp_bytes
from veil.attestation.verdict import Verdict, VerdictBuilder

__all__ = ["check_hcl_binding", "verify_azure_snp", "verify_vtpm"]

_SNP_REPORT_DATA = slice(0x50, 0x90)


def check_hcl_binding(b: VerdictBuilder, hcl: HclReport, report_data: bytes) -> None:
    """``azure.hcl.binding``: the hardware-signed ``report_data`` is H(var_data) ‖ zeros."""
    digest = hcl.variable_data_digest()
    ok = report_data[: len(digest)] == digest and not any(report_data[len(digest) :])
    b.check(
        "azure.hcl.binding",
        ok,
        f"report_data = {hcl.hash_name}(var_data) ‖ zeros"
        if ok
        else "report_data does not equal the hash of the HCL variable data",
    )


def _check_quote(
    b: VerdictBuilder, quote: TpmQuote, ak: rsa.RSAPublicKey | None, nonce: bytes | None
) -> TpmsAttest | None:
    attest: TpmsAttest | None = None
    try:
        parsed = parse_tpms_attest(quote.message)
    except MalformedInputError as exc:
        b.fail("azure.tpm.parse", str(exc))
    else:
        b.passed("azure.tpm.parse", f"TPM2_Quote, {len(parsed.pcr_select)} PCR bank(s)")
        attest = parsed

    if ak is None:
        b.fail("azure.tpm.signature", "no attestation key (HCL variable data did not parse)")
    else:
        try:
            ak.verify(quote.signature, quote.message, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            b.fail("azure.tpm.signature", "RSASSA-PKCS1-v1_5/SHA-256 signature does not verify with HCLAkPub")
        else:
            b.passed(
                "azure.tpm.signature",
                "RSASSA-PKCS1-v1_5/SHA-256 by the attestation key bound in the HCL report",
            )

    if attest is None:
        b.fail("azure.tpm.nonce", "quote did not parse")
        b.fail("azure.tpm.pcr_digest", "quote did not parse")
        return None
    if nonce is None:
        b.skip("azure.tpm.nonce", "no expected nonce given")
    else:
        ok = attest.extra_data == nonce
        b.check(
            "azure.tpm.nonce",
            ok,
            "extraData = expected nonce" if ok else "extraData differs from the expected nonce",
        )

    problem = None
    selected = attest.pcr_select[0].pcrs if len(attest.pcr_select) == 1 else ()
    if len(attest.pcr_select) != 1 or attest.pcr_select[0].hash_alg != TPM_ALG_SHA256:
        problem = "quote must select one SHA-256 PCR bank"
    elif len(quote.pcrs) != PCR_COUNT or any(len(p) != 32 for p in quote.pcrs):
        problem = f"expected {PCR_COUNT} SHA-256 PCR values"
    elif max(selected, default=0) >= PCR_COUNT:
        problem = "quote selects a PCR beyond 23"
    elif hashlib.sha256(b"".join(quote.pcrs[i] for i in selected)).digest() != attest.pcr_digest:
        problem = "SHA-256 over the given PCR values does not equal the quote's pcrDigest"
    b.check(
        "azure.tpm.pcr_digest",
        problem is None,
        problem or f"PCRs {_ranges(selected)} match the quoted digest",
    )
    return attest


def _ranges(indices: Sequence[int]) -> str:
    if not indices:
        return "none"
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return ",".join(map(str, indices))


def verify_azure_snp(
    hcl_report: bytes,
    quote: TpmQuote,
    certs: Sequence[x509.Certificate],
    options: VerifyOptions,
    *,
    nonce: bytes | None = None,
    user_data: bytes | None = None,
    product: Product | str | None = None,
    crl: x509.CertificateRevocationList | None = None,
) -> tuple[SnpReport | None, Verdict]:
    """Verify Azure SNP CVM evidence end to end.

    The SNP report inside the HCL report is verified with ``options`` exactly as
    :func:`~veil.attestation.snp.verify.verify_snp` does (``snp.*`` checks; a bare VCEK
    suffices with the pinned roots); then ``azure.hcl.binding`` (H(var_data) =
    report_data), ``azure.runtime_data`` (the attestation key), ``azure.tpm.signature``,
    ``azure.tpm.nonce`` (extraData equals ``nonce``; skipped when None), ``azure.tpm.pcr_digest`` and
    ``azure.user_data`` (var_data "user-data" equals ``user_data`` zero-padded to
    its length; skipped when None). Returns the SNP report (None when it did not
    parse) for :func:`veil.attestation.snp.validate.validate_snp`.

    On Azure the SNP report's own ``report_data`` is H(var_data), so a caller binding
    its own 64 bytes (Veil's ``report_data``) passes them as ``user_data`` (the guest
    writes them to the vTPM's user-data index before reading the HCL report; they
    are then bound by the hardware through var_data) and leaves ``SnpPolicy.report_data``
    unset; ``nonce`` binds the vTPM quote (and so the PCRs) to the same exchange. ``crl`` is the
    ARK-signed CRL for ``snp.chain.crl``, as in :func:`~veil.attestation.snp.verify.verify_snp`.
    """
    b = VerdictBuilder()
    try:
        hcl = parse_hcl_report(hcl_report)
        snp_bytes = hcl.snp_report_bytes
    except MalformedInputError as exc:
        b.fail("azure.hcl.parse", str(exc))
        return None, b.build()
    b.passed("azure.hcl.parse", f"HCL report v{hcl.version}, SEV-SNP")
    report, snp_verdict = verify_snp_bytes(snp_bytes, certs, options, product=product, crl=crl)
    b.extend(snp_verdict.checks)
    check_hcl_binding(b, hcl, hcl.hw_report[_SNP_REPORT_DATA])
    verify_vtpm(b, hcl, quote, nonce=nonce, user_data=user_data)
    return report, b.build()


def verify_vtpm(
    b: VerdictBuilder, hcl: HclReport, quote: TpmQuote, *, nonce: bytes | None, user_data: bytes | None
) -> RuntimeData | None:
    """The vTPM half of Azure CVM evidence (SNP or TDX): ``azure.runtime_data`` (the attestation
    key in var_data), ``azure.tpm.*`` (quote signed by it, nonce, PCR digest) and
    ``azure.user_data``; returns the runtime data when it parsed."""
    ak: rsa.RSAPublicKey | None = None
    runtime: RuntimeData | None = None
    try:
        runtime = parse_runtime_data(hcl.variable_data)
    except MalformedInputError as exc:
        b.fail("azure.runtime_data", str(exc))
    else:
        ak = runtime.attestation_key
        b.passed("azure.runtime_data", f"{AK_KEY_ID} RSA-{ak.key_size}")
    _check_quote(b, quote, ak, nonce)

    if user_data is None:
        b.skip("azure.user_data", "no expected user-data given")
    elif runtime is None or runtime.user_data is None:
        b.fail("azure.user_data", "HCL variable data carries no user-data")
    else:
        padded = user_data.ljust(len(runtime.user_data), b"\0")
        ok = runtime.user_data == padded
        b.check(
            "azure.user_data", ok, "user-data matches" if ok else "user-data differs from the expected value"
        )
    return runtime
