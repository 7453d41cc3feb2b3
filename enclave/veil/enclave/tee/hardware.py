"""A hardware attestation provider: one CPU source, zero or more GPUs, stapled collateral.

The CPU sources (:mod:`.configfs_tsm`, :mod:`.sev_guest`, :mod:`.azure`) turn 64 bytes of
``report_data`` into a signed report; the GPU source (:mod:`.nvidia`) turns the GPU nonce into
SPDM reports. :class:`HardwareProvider` composes them behind the two-phase
:class:`~veil.enclave.tee.provider.AttestationProvider` interface, so the binding is exactly the
simulator's. Every source is blocking and does its own device I/O behind a seam.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from cryptography import x509

from veil.attestation.collateral import CollateralStore
from veil.attestation.errors import VeilAttestationError
from veil.attestation.snp.certs import load_certificates, parse_amd_extensions
from veil.enclave.errors import AttestationProviderError
from veil.enclave.tee.provider import AttestationProvider, CpuEvidencePart, GpuEvidencePart
from veil.proto.v1 import evidence_pb2

__all__ = ["CpuSource", "GpuSource", "HardwareProvider", "start_hardware"]


class CpuSource(Protocol):
    """A CPU TEE: its platform, a name for the log, and a fresh report over ``report_data``."""

    @property
    def platform(self) -> evidence_pb2.Platform: ...
    @property
    def name(self) -> str: ...
    def cpu_evidence(self, report_data: bytes) -> CpuEvidencePart: ...


class GpuSource(Protocol):
    """Confidential-computing GPUs: a name for the log, and fresh SPDM reports for a nonce."""

    @property
    def name(self) -> str: ...
    def gpu_evidence(self, gpu_nonce: bytes) -> Sequence[GpuEvidencePart]: ...


class HardwareProvider(AttestationProvider):
    """Real evidence: ``cpu`` over the bound report_data, ``gpus`` (if any) with the GPU nonce."""

    simulated = False

    def __init__(
        self,
        cpu: CpuSource,
        gpus: GpuSource | None = None,
        *,
        collateral: Callable[[], evidence_pb2.Collateral | None] | None = None,
    ) -> None:
        self.cpu = cpu
        self.gpus = gpus
        self.platform = cpu.platform
        self.name = cpu.name + (f" + {gpus.name}" if gpus is not None else "")
        self._collateral = collateral

    def cpu_evidence(self, report_data: bytes) -> CpuEvidencePart:
        return self.cpu.cpu_evidence(report_data)

    def gpu_evidence(self, gpu_nonce: bytes) -> Sequence[GpuEvidencePart]:
        return () if self.gpus is None else self.gpus.gpu_evidence(gpu_nonce)

    def collateral(self) -> evidence_pb2.Collateral | None:
        return None if self._collateral is None else self._collateral()


def kds_chain_fetcher(store: CollateralStore) -> Callable[[bytes], bytes]:
    """For an SNP host that hands out no certificates: the VCEK for a report's chip and reported
    TCB, then ASK+ARK, from AMD's KDS through ``store`` (cached on disk; PEM). The product comes
    from the report's CPUID fields (version 3+ reports); older reports cannot name it."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from veil.attestation.snp.report import parse_snp_report

    def fetch(report_bytes: bytes) -> bytes:
        try:
            report = parse_snp_report(report_bytes)
        except VeilAttestationError as exc:
            raise AttestationProviderError(f"SNP report unusable for a VCEK lookup: {exc}") from None
        product = report.product
        if product is None:
            raise AttestationProviderError(
                "the host gave no SNP certificates and the report (version < 3) does not name its "
                "product; configure the host's certificate table (snphost import) instead"
            )
        tcb = report.reported_tcb.components()
        names = {"bootloader": "bl", "tee": "tee", "snp": "snp", "microcode": "ucode", "fmc": "fmc"}
        hwid = report.chip_id[:8] if report.reported_tcb.turin else report.chip_id
        try:
            vcek = store.amd_vcek(product.value, hwid, {names[k]: v for k, v in tcb.items()})
            chain = store.amd_cert_chain(product.value, "vcek")
            leaf = x509.load_der_x509_certificate(vcek.content)
        except (VeilAttestationError, ValueError) as exc:
            raise AttestationProviderError(f"AMD KDS: no VCEK for this chip ({exc})") from None
        return leaf.public_bytes(Encoding.PEM) + chain.content

    return fetch


def start_hardware(
    cpu: CpuSource,
    gpus: GpuSource | None,
    state_dir: Path,
    *,
    store: CollateralStore | None = None,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    gpu_roots: tuple[x509.Certificate, ...] = (),
    rim_roots: tuple[x509.Certificate, ...] = (),
) -> HardwareProvider:
    """The provider ``veil serve`` runs with: one sample report names the collateral to staple
    (AMD CRL for the VCEK's product, Intel PCS collateral for a TDX quote, the GPUs' RIMs and OCSP),
    fetched now and cached in ``state_dir/collateral``; GPUs are self-verified, then set ready."""
    from veil.enclave.collateral import CollateralCache, CollateralNeeds, VendorCollateralSource
    from veil.enclave.tee.nvidia import NvmlGpuSource, verify_and_set_ready

    sample = cpu.cpu_evidence(bytes(64))
    product, signer, tdx_quote = None, "vcek", None
    if cpu.platform in (evidence_pb2.PLATFORM_SEV_SNP, evidence_pb2.PLATFORM_AZURE_SEV_SNP):
        try:
            leaf = parse_amd_extensions(load_certificates(sample.cert_chain)[0])
        except (VeilAttestationError, IndexError) as exc:
            raise AttestationProviderError(f"SNP certificate chain unusable: {exc}") from None
        product = leaf.product.value if leaf.product is not None else None
        signer = "vlek" if leaf.is_vlek else "vcek"
    else:
        tdx_quote = sample.report
    nonce = secrets.token_bytes(32)
    gpu_sample = list(gpus.gpu_evidence(nonce)) if gpus is not None else []
    needs = CollateralNeeds(
        amd_product=product,
        amd_signer=signer,
        tdx_quote=tdx_quote,
        gpus=[
            (
                "nvswitch" if g.kind == evidence_pb2.GpuEvidence.KIND_NVSWITCH else "gpu",
                g.report,
                g.cert_chain,
            )
            for g in gpu_sample
        ],
    )
    source = VendorCollateralSource(store or CollateralStore(cache_dir=state_dir / "vendor-cache"), needs)
    cache = CollateralCache(source, state_dir / "collateral", clock=clock)
    collateral = cache.current()
    if isinstance(gpus, NvmlGpuSource):
        verify_and_set_ready(gpus, collateral, nonce=nonce, now=clock(), roots=gpu_roots, rim_roots=rim_roots)
    return HardwareProvider(cpu, gpus, collateral=cache.current)
