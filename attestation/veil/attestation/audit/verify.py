"""``veil attest verify``: one artifact, its collateral and a policy in; one verdict out.

Each kind is wired to the verifier (``veil.attestation``) that owns it, then to the
matching *validate* step: SEV-SNP → ``verify_snp_bytes`` + ``validate_snp``; Azure
CVM → ``verify_azure_snp`` + ``validate_snp``; TDX → ``verify_tdx`` + ``validate_tdx``;
NVIDIA → ``verify_gpus``; a Veil bundle → ``verify_evidence``. Unless offline, missing
collateral is taken from the :class:`~veil.attestation.collateral.CollateralStore`: its
on-disk cache first, then the vendor services. Offline, only the files given are used
(no network, no cache). Problems with what the auditor gave (a missing
certificate, a nonce of the wrong size) raise :class:`AuditUsageError`; problems with
the evidence are failed checks.

The policy file is the client's TOML policy, read by :class:`veil.attestation.policy.Policy`
(``allow_debug``, ``min_tcb``, ``measurements``, ``[snp]``, ``[tdx]``, ``[gpu]``, ``[roots]``,
…); see ``veil.attestation.audit.cli.POLICY_HELP``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from veil.attestation.collateral import CollateralStore, Endpoints
from veil.attestation.errors import CollateralError, VeilAttestationError
from veil.attestation.nvidia.verify import GpuKind
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import Policy
from veil.attestation.snp.report import Product, SnpReport
from veil.attestation.verdict import Verdict, VerdictBuilder

__all__ = [
    "AuditRequest",
    "AuditUsageError",
    "GpuDevice",
    "collateral_store",
    "verify_azure_artifact",
    "verify_bundle_artifact",
    "verify_gpu_artifact",
    "verify_snp_artifact",
    "verify_tdx_artifact",
]


class AuditUsageError(Exception):
    """What the auditor gave cannot be used (exit status 2); the message says what to do."""


# ---------------------------------------------------------------------------------- request


def collateral_store(*, offline: bool, environ: Mapping[str, str] | None = None) -> CollateralStore:
    """The CLI's collateral store: cache under ``$VEIL_CACHE_DIR`` (default ``~/.cache/veil``),
    vendor base URLs overridable with ``VEIL_AMD_KDS_URL``, ``VEIL_INTEL_PCS_URL``,
    ``VEIL_INTEL_CERTS_URL``, ``VEIL_NVIDIA_RIM_URL``, ``VEIL_NVIDIA_OCSP_URL``."""
    env = os.environ if environ is None else environ
    base = env.get("VEIL_CACHE_DIR") or str(
        Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "veil"
    )
    defaults = Endpoints()
    endpoints = Endpoints(
        amd_kds=env.get("VEIL_AMD_KDS_URL", defaults.amd_kds),
        intel_pcs=env.get("VEIL_INTEL_PCS_URL", defaults.intel_pcs),
        intel_certs=env.get("VEIL_INTEL_CERTS_URL", defaults.intel_certs),
        nvidia_rim=env.get("VEIL_NVIDIA_RIM_URL", defaults.nvidia_rim),
        nvidia_ocsp=env.get("VEIL_NVIDIA_OCSP_URL", defaults.nvidia_ocsp),
    )
    return CollateralStore(cache_dir=Path(base) / "collateral", offline=offline, endpoints=endpoints)


@dataclass(slots=True)
class AuditRequest:
    """Everything ``veil attest verify`` was given besides the artifact itself."""

    now: datetime
    policy: Policy
    store: CollateralStore
    nonce: bytes | None = None
    report_data: bytes | None = None
    certs: list[x509.Certificate] | None = None
    collateral: list[tuple[str, bytes]] = field(default_factory=list)
    product: Product | None = None


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU / NVSwitch report to verify, with its certificate chain (leaf first)."""

    report: bytes
    chain: tuple[x509.Certificate, ...]
    kind: GpuKind
    arch: str


def _pad64(value: bytes, what: str) -> bytes:
    if len(value) > 64:
        raise AuditUsageError(f"{what} is {len(value)} bytes; REPORT_DATA holds 64")
    return value.ljust(64, b"\0")


def _custom(
    roots: tuple[x509.Certificate, ...], vendor: tuple[x509.Certificate, ...]
) -> tuple[x509.Certificate, ...] | None:
    """None when the policy keeps the shipped roots (so pinned intermediates may fill in)."""
    return None if roots == vendor else roots


# ---------------------------------------------------------------------------------- SEV-SNP


def _fetch_vcek(report: SnpReport, req: AuditRequest) -> list[x509.Certificate]:
    from veil.attestation.snp.certs import load_certificates
    from veil.attestation.snp.report import SigningKey

    prod = report.product or req.product
    hint = "give --certs FILE (VCEK first, then ASK and ARK)"
    if prod is None:
        raise AuditUsageError(
            f"this version-{report.version} report names no product (no CPUID): {hint}, or --product"
        )
    if report.signing_key != SigningKey.VCEK:
        raise AuditUsageError(
            f"the report is not VCEK-signed, so its key cannot be looked up at AMD KDS: {hint}"
        )
    if report.mask_chip_key or not any(report.chip_id):
        raise AuditUsageError(f"the report masks its chip ID, so its VCEK cannot be looked up: {hint}")
    t = report.reported_tcb
    tcb = {"bl": t.bootloader, "tee": t.tee, "snp": t.snp, "ucode": t.microcode}
    if t.fmc is not None:
        tcb["fmc"] = t.fmc
    hwid = report.chip_id[:8] if prod is Product.TURIN else report.chip_id
    if req.store.offline:
        raise AuditUsageError(f"offline, and no VCEK given: {hint}")
    try:
        fetched = req.store.amd_vcek(prod.value, hwid, tcb)
    except CollateralError as exc:
        raise AuditUsageError(f"no VCEK for this report ({exc}): {hint}") from None
    return load_certificates(fetched.content)


def _leaf_product(certs: Sequence[x509.Certificate]) -> Product | None:
    from veil.attestation.snp.certs import parse_amd_extensions

    if not certs:
        return None
    try:
        return parse_amd_extensions(certs[0]).product
    except VeilAttestationError:
        return None


def verify_snp_artifact(raw: bytes, req: AuditRequest) -> Verdict:
    """An SEV-SNP report: signature, VCEK/VLEK chain and extensions, then the SNP policy."""
    from veil.attestation.policy import vendor_amd_roots
    from veil.attestation.snp.report import parse_snp_report
    from veil.attestation.snp.validate import validate_snp
    from veil.attestation.snp.verify import verify_snp_bytes

    expected = req.report_data if req.report_data is not None else req.nonce
    expected = _pad64(expected, "--report-data") if expected is not None else None
    certs = req.certs
    if certs is None:
        try:
            parsed = parse_snp_report(raw)
        except VeilAttestationError:
            parsed = None  # verify_snp_bytes reports the parse failure
        certs = _fetch_vcek(parsed, req) if parsed is not None else []
    roots = _custom(req.policy.trusted_roots.amd, vendor_amd_roots())
    if roots == ():  # empty options roots mean the vendor's: never fall back to them
        raise AuditUsageError("the policy trusts no AMD root")
    options = VerifyOptions(now=req.now, trusted_roots=roots or ())
    report, verdict = verify_snp_bytes(raw, certs, options, product=req.product)
    if report is None:
        return verdict
    product = report.product or req.product or _leaf_product(certs)
    snp_policy = req.policy.snp_policy(report, expected)
    return verdict + validate_snp(report, snp_policy, product=product)


# ---------------------------------------------------------------------------------- Azure


def verify_azure_artifact(evidence: Any, req: AuditRequest) -> Verdict:
    """Azure SNP CVM evidence (``AzureSnpEvidence``): HCL binding, vTPM quote, SNP report, policy
    (the SNP fields and ``policy.azure_pcrs``: the vTPM PCRs that measure the guest, pinned).

    ``--nonce`` is the vTPM quote's nonce (extraData); ``--report-data`` the HCL user-data.
    """
    from veil.attestation.policy import vendor_amd_roots
    from veil.attestation.snp.azure_verify import verify_azure_snp
    from veil.attestation.snp.validate import validate_azure_pcrs, validate_snp

    certs = req.certs if req.certs is not None else list(evidence.certs)
    roots = _custom(req.policy.trusted_roots.amd, vendor_amd_roots())
    if roots == ():  # empty options roots mean the vendor's: never fall back to them
        raise AuditUsageError("the policy trusts no AMD root")
    report, verdict = verify_azure_snp(
        evidence.hcl_report,
        evidence.quote,
        certs,
        VerifyOptions(now=req.now, trusted_roots=roots or ()),
        nonce=req.nonce,
        user_data=req.report_data,
        product=req.product,
    )
    if report is None:
        return verdict
    product = report.product or req.product or _leaf_product(certs)
    pcrs = validate_azure_pcrs(
        evidence.quote, req.policy.azure_pcrs, allow_any=req.policy.allow_any_measurement
    )
    return verdict + validate_snp(report, req.policy.snp_policy(report, None), product=product) + pcrs


# ---------------------------------------------------------------------------------- TDX


def verify_tdx_artifact(raw: bytes, req: AuditRequest) -> Verdict:
    """A TDX quote: signatures, PCK chain, QE binding, collateral appraisal, then the TDX policy."""
    from veil.attestation.tdx.collateral import load_collateral
    from veil.attestation.tdx.fetch import fetch_tdx_collateral
    from veil.attestation.tdx.quote import parse_tdx_quote
    from veil.attestation.tdx.validate import validate_tdx
    from veil.attestation.tdx.verify import (
        tcb_advisories_of,
        tcb_status_of,
        tcb_unappraised_reason,
        verify_tdx,
    )

    if req.certs is not None:
        raise AuditUsageError("--certs does not apply to TDX: the quote carries its PCK chain")
    if len(req.collateral) > 1:
        raise AuditUsageError("TDX takes one --collateral file (dcap-qvl QuoteCollateralV3 JSON)")
    b = VerdictBuilder()
    try:
        quote = parse_tdx_quote(raw)
    except VeilAttestationError as exc:
        b.fail("tdx.quote.parse", str(exc))
        return b.build()
    collateral = None
    if req.collateral:
        name, data = req.collateral[0]
        try:
            collateral = load_collateral(data)
        except VeilAttestationError as exc:
            raise AuditUsageError(f"{name}: not dcap-qvl collateral JSON: {exc}") from None
    elif not req.store.offline:
        try:
            collateral = fetch_tdx_collateral(req.store, quote)
        except CollateralError as exc:
            raise AuditUsageError(f"cannot fetch TDX collateral ({exc}); give --collateral FILE") from None
    verdict = verify_tdx(quote, VerifyOptions(now=req.now), collateral=collateral)
    expected = req.report_data if req.report_data is not None else req.nonce
    policy = req.policy.tdx_policy(_pad64(expected, "--report-data") if expected is not None else None)
    return verdict + validate_tdx(
        quote,
        policy,
        tcb_status=tcb_status_of(verdict),
        advisory_ids=tcb_advisories_of(verdict),
        tcb_not_appraised=tcb_unappraised_reason(verdict),
    )


# ---------------------------------------------------------------------------------- NVIDIA


def _rims(devices: Sequence[GpuDevice], req: AuditRequest) -> Any:
    from veil.attestation.nvidia.report import parse_gpu_report
    from veil.attestation.nvidia.rim import RimSet, parse_rim
    from veil.attestation.nvidia.verify import gpu_rim_ids

    rims = []
    for name, data in req.collateral:
        try:
            rims.append(parse_rim(data))
        except VeilAttestationError as exc:
            raise AuditUsageError(f"{name}: not an NVIDIA RIM (swidtag XML): {exc}") from None
    if req.collateral or req.store.offline:
        return RimSet.of(rims) if rims else None
    wanted: set[str] = set()
    for d in devices:
        try:
            wanted.update(gpu_rim_ids(parse_gpu_report(d.report), d.kind).values())
        except VeilAttestationError:
            continue  # the verdict reports the unparsable report
    for rim_id in sorted(wanted):
        try:
            rims.append(parse_rim(req.store.nvidia_rim(rim_id).content))
        except CollateralError as exc:
            raise AuditUsageError(
                f"cannot fetch RIM {rim_id} ({exc}); give --collateral FILE or --offline"
            ) from None
        except VeilAttestationError as exc:
            raise AuditUsageError(f"RIM {rim_id} from the RIM service does not parse: {exc}") from None
    return RimSet.of(rims) if rims else None


def verify_gpu_artifact(devices: Sequence[GpuDevice], req: AuditRequest) -> Verdict:
    """GPU / NVSwitch reports: signature, chain to the NVIDIA root, FWID, nonce, versions, RIMs, OCSP.

    ``--nonce`` is the 32-byte nonce the reports must carry (without it the check is skipped).
    """
    from veil.attestation.nvidia.verify import nvidia_device_root, verify_gpus

    if req.report_data is not None:
        raise AuditUsageError("--report-data does not apply to GPU evidence; use --nonce")
    if req.nonce is not None and len(req.nonce) != 32:
        raise AuditUsageError(f"--nonce must be 32 bytes for GPU evidence, got {len(req.nonce)}")
    roots = req.policy.trusted_roots.nvidia
    root = None
    if roots != (nvidia_device_root(),) and roots:
        top = devices[0].chain[-1] if devices and devices[0].chain else None
        root = next((r for r in roots if top is not None and (top == r or top.issuer == r.subject)), roots[0])
    verdict = verify_gpus(
        [(d.report, d.chain, d.kind) for d in devices],
        VerifyOptions(
            now=req.now,
            trusted_roots=() if root is None else (root,),
            ocsp_post=None if req.store.offline else req.store.nvidia_ocsp,
        ),
        nonce=req.nonce,
        rims=_rims(devices, req),
        policy=req.policy.gpu,
    )
    b = VerdictBuilder()
    count = req.policy.gpu_count
    gpus = sum(1 for d in devices if d.kind == "gpu")
    if count is None:
        b.skip("policy.gpu_count", f"any number allowed ({gpus} GPU report(s))")
    else:
        b.check("policy.gpu_count", gpus == count, f"{gpus} GPU report(s), policy requires {count}")
    return verdict + b.build()


# ---------------------------------------------------------------------------------- bundle


def verify_bundle_artifact(data: bytes, req: AuditRequest) -> Verdict:
    """A Veil ``Evidence`` bundle against the client policy (``--nonce``: the client's nonce)."""
    from veil.attestation.bundle import verify_evidence

    if req.certs is not None or req.collateral:
        raise AuditUsageError("a Veil evidence bundle carries its certificates: drop --certs / --collateral")
    if req.report_data is not None:
        raise AuditUsageError("--report-data does not apply to a bundle (it is derived); use --nonce")
    if req.nonce is not None and len(req.nonce) != 32:
        raise AuditUsageError(
            f"--nonce must be the 32-byte nonce sent with GetEvidence, got {len(req.nonce)} bytes"
        )
    result = verify_evidence(data, VerifyOptions(now=req.now), policy=req.policy, nonce=req.nonce)
    return result.verdict
