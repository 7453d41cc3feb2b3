"""Attestation providers: where the enclave's hardware evidence comes from.

One small interface, two phases, because ``report_data`` commits to the GPU reports
(DESIGN.md, "Trust and binding"): the GPU reports are taken first, with the GPU nonce,
then the CPU report is taken over ``report_data = H(nonce, claims, gpu reports)``.

* :meth:`AttestationProvider.gpu_evidence` ``(gpu_nonce) -> GpuEvidencePart…``
* :meth:`AttestationProvider.cpu_evidence` ``(report_data) -> CpuEvidencePart``
* :meth:`AttestationProvider.evidence` ``(nonce, claims_bytes, public_key_bytes) ->
  EvidenceParts`` runs both phases with the binding of :mod:`veil.attestation.binding`.

Providers are blocking (real ones do device I/O); the server calls them in a worker
thread. They must produce a fresh report for every call, never a cached one.

Implementations:

* :class:`veil.enclave.tee.simulated.SimulatedTeeProvider` — software SEV-SNP + H100
  layouts signed by a simulation chain (development and CI).
* :class:`veil.enclave.tee.hardware.HardwareProvider` — one CPU source
  (:mod:`~veil.enclave.tee.configfs_tsm`, :mod:`~veil.enclave.tee.sev_guest`,
  :mod:`~veil.enclave.tee.azure`) and optionally NVIDIA GPUs (:mod:`~veil.enclave.tee.nvidia`),
  chosen by :mod:`~veil.enclave.tee.probe` (``veil serve --tee auto``). What they read:

  - **SEV-SNP / TDX via configfs-tsm** (Linux ≥ 6.7): ``mkdir
    /sys/kernel/config/tsm/report/<name>``, write the 64 bytes to ``inblob``, read
    ``outblob`` (the SNP ``ATTESTATION_REPORT`` or the TDX quote), ``provider``
    (``sev_guest`` / ``tdx_guest``), ``generation`` (to detect a concurrent writer) and,
    for SNP, ``auxblob`` (the GUID-keyed certificate table holding VCEK/VLEK, ASK, ARK —
    converted to the PEM chain of ``Evidence.cpu_cert_chain``); ``rmdir`` afterwards.
    Platform: ``PLATFORM_SEV_SNP`` / ``PLATFORM_TDX`` (or the Azure variants, which
    read the HCL report from the vTPM NV index 0x01400001 and fill ``Evidence.azure``).
  - **NVIDIA GPUs via NVML** (CC mode): per device,
    ``nvmlDeviceGetConfComputeGpuAttestationReport(handle, gpu_nonce)`` gives the SPDM
    request ‖ response (``attestationReport``), and
    ``nvmlDeviceGetConfComputeGpuCertificate`` the device certificate chain
    (``attestationCertChain``), which becomes the PEM ``GpuEvidence.cert_chain``.

  A combined provider composes one CPU source with zero or more GPU sources.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from veil.attestation.binding import gpu_nonce, report_data
from veil.enclave.errors import AttestationProviderError
from veil.proto.v1 import evidence_pb2

__all__ = [
    "AttestationProvider",
    "CpuEvidencePart",
    "EvidenceParts",
    "GpuEvidencePart",
]


@dataclass(frozen=True, slots=True)
class GpuEvidencePart:
    """One GPU's (or NVSwitch's) SPDM report and its PEM certificate chain (leaf first)."""

    kind: evidence_pb2.GpuEvidence.Kind
    arch: str
    report: bytes
    cert_chain: bytes
    index: int

    def to_proto(self) -> evidence_pb2.GpuEvidence:
        return evidence_pb2.GpuEvidence(
            kind=self.kind, arch=self.arch, report=self.report, cert_chain=self.cert_chain, index=self.index
        )


@dataclass(frozen=True, slots=True)
class CpuEvidencePart:
    """The CPU TEE report over ``report_data`` and its PEM chain (VCEK, ASK, ARK)."""

    report: bytes
    cert_chain: bytes
    azure: evidence_pb2.AzureVtpmEvidence | None = None  # Azure CVMs: HCL report and vTPM quote


@dataclass(frozen=True, slots=True)
class EvidenceParts:
    """What a provider produced for one nonce (the server adds key, claims and nonce)."""

    platform: evidence_pb2.Platform
    cpu: CpuEvidencePart
    gpus: tuple[GpuEvidencePart, ...]
    simulated: bool
    collateral: evidence_pb2.Collateral | None = None  # stapled vendor collateral


class AttestationProvider(abc.ABC):
    """A source of attestation evidence (see the module docstring)."""

    #: ``evidence_pb2.Platform`` of the CPU report.
    platform: evidence_pb2.Platform
    #: True for software providers; stated in the claims and in ``Evidence.simulated``.
    simulated: bool
    #: A short human-readable name for start-up output.
    name: str

    @abc.abstractmethod
    def gpu_evidence(self, gpu_nonce: bytes) -> Sequence[GpuEvidencePart]:
        """A fresh report from every GPU, each requested with ``gpu_nonce`` (32 bytes)."""

    @abc.abstractmethod
    def cpu_evidence(self, report_data: bytes) -> CpuEvidencePart:
        """A fresh CPU TEE report whose REPORT_DATA is ``report_data`` (64 bytes)."""

    def collateral(self) -> evidence_pb2.Collateral | None:
        """The vendor collateral to staple (``veil.enclave.collateral``); None: none (the client's
        default policy then refuses the evidence, which needs it)."""
        return None

    def evidence(self, nonce: bytes, claims: bytes, public_key: bytes) -> EvidenceParts:
        """Both phases for one client nonce, bound as DESIGN.md says, and the stapled collateral."""
        gpus = tuple(self.gpu_evidence(gpu_nonce(nonce, public_key)))
        data = report_data(nonce, claims, gpus)
        cpu = self.cpu_evidence(data)
        if not cpu.report:
            raise AttestationProviderError(f"{self.name}: empty CPU report")
        return EvidenceParts(self.platform, cpu, gpus, self.simulated, self.collateral())
