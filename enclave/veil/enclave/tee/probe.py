"""`veil serve --tee auto|snp|tdx|azure --gpus auto|none|N`: find the TEE and GPUs before the model loads.

Every interface is probed and reported, found or not, in this order:

* **configfs-tsm** — ``/sys/kernel/config/tsm/report`` (SEV-SNP or TDX, Linux ≥ 6.7); a test
  report over 64 zero bytes says which (``provider``) and that we may write there;
* **sev-guest** — ``/dev/sev-guest`` (SEV-SNP, older kernels);
* **TPM** — ``/dev/tpmrm0`` with an Azure HCL report in NV index ``0x01400001`` (Azure CVMs);
* **NVML** — nvidia-ml-py and the NVIDIA driver, CC mode on, dev-tools off.

Nothing here loads the model; a machine without a TEE gets :class:`TeeUnavailableError` whose
message lists each probe and why it failed, within seconds. The seams are the file system root,
the TPM factory and the NVML loader (tests pass fakes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.enclave.errors import AttestationProviderError, TeeUnavailableError
from veil.enclave.tee.azure import AzureVtpmSource, Tpm, Tpm2Tools
from veil.enclave.tee.configfs_tsm import ConfigfsFiles, ConfigfsTsm, ConfigfsTsmSource
from veil.enclave.tee.hardware import CpuSource
from veil.enclave.tee.nvidia import NvmlGpuSource, load_nvml
from veil.enclave.tee.sev_guest import SevGuestSource

__all__ = [
    "TEE_CHOICES",
    "Probe",
    "ProbeReport",
    "Seams",
    "parse_gpus",
    "select_cpu",
    "select_gpus",
    "select_hardware",
]

TEE_CHOICES = ("auto", "snp", "tdx", "azure", "simulated")
_ACCEPTS = {
    "auto": ("configfs-tsm", "sev-guest", "TPM"),
    "snp": ("configfs-tsm", "sev-guest"),
    "tdx": ("configfs-tsm",),
    "azure": ("TPM",),
}


@dataclass(frozen=True, slots=True)
class Probe:
    interface: str  # configfs-tsm, sev-guest, TPM, NVML
    found: bool
    detail: str

    def line(self) -> str:
        return f"  {self.interface}: {'found' if self.found else 'no'} — {self.detail}"


@dataclass
class ProbeReport:
    probes: list[Probe] = field(default_factory=list)

    def add(self, interface: str, found: bool, detail: str) -> None:
        self.probes.append(Probe(interface, found, detail))

    def text(self) -> str:
        return "\n".join(p.line() for p in self.probes)


@dataclass
class Seams:
    """Where the probes look: the file system root, the TPM and NVML (tests replace them)."""

    root: Path = Path("/")
    tpm: Callable[[Path], Tpm] = Tpm2Tools
    nvml: Callable[[], Any] = load_nvml
    fetch_chain: Callable[[bytes], bytes] | None = None  # SNP certificates when the host gives none
    configfs: ConfigfsFiles | None = None  # configfs file operations (None: the real file system)

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


def _platform_of(source: CpuSource) -> str:
    return "snp" if source.name.startswith("SEV-SNP") else "tdx"


def select_cpu(tee: str, seams: Seams, report: ProbeReport) -> CpuSource:
    """The first usable CPU source ``tee`` accepts; probes each interface and records why not."""
    if tee not in _ACCEPTS:
        raise TeeUnavailableError(f"unknown --tee {tee!r} (choose from {', '.join(TEE_CHOICES)})")
    chosen: CpuSource | None = None
    tsm_root = seams.path("/sys/kernel/config/tsm/report")
    try:
        tsm = ConfigfsTsm(tsm_root, files=seams.configfs)
        test = tsm.report(bytes(64))
        source = ConfigfsTsmSource(tsm, test.provider, fetch_chain=seams.fetch_chain)
        wanted = tee in ("auto", _platform_of(source))
        report.add(
            "configfs-tsm",
            True,
            f"{tsm_root}, provider {test.provider}" + ("" if wanted else f" (not {tee})"),
        )
        if wanted:
            chosen = source
    except AttestationProviderError as exc:
        report.add("configfs-tsm", False, str(exc).removeprefix("configfs-tsm: "))

    device = seams.path("/dev/sev-guest")
    if not device.exists():
        report.add("sev-guest", False, f"{device} does not exist")
    elif tee not in ("auto", "snp"):
        report.add("sev-guest", True, f"{device} (not {tee})")
    elif chosen is None:
        sev = SevGuestSource(device, fetch_chain=seams.fetch_chain)
        try:
            sev.cpu_evidence(bytes(64))
            report.add("sev-guest", True, f"{device}, SNP_GET_EXT_REPORT works")
            chosen = sev
        except AttestationProviderError as exc:
            report.add("sev-guest", False, str(exc).removeprefix("sev-guest: "))
    else:
        report.add("sev-guest", True, f"{device} (configfs-tsm preferred)")

    tpm_device = seams.path("/dev/tpmrm0")
    if not tpm_device.exists():
        report.add("TPM", False, f"{tpm_device} does not exist (no vTPM, so not an Azure CVM)")
    elif tee not in ("auto", "azure") or chosen is not None:
        report.add(
            "TPM", True, f"{tpm_device} (not used: {'configfs-tsm/sev-guest chosen' if chosen else tee})"
        )
    else:
        try:
            azure = AzureVtpmSource(seams.tpm(tpm_device))
            report.add("TPM", True, f"{tpm_device}, {azure.name}")
            chosen = azure
        except AttestationProviderError as exc:
            report.add("TPM", False, str(exc).removeprefix("TPM: "))
    if chosen is None:
        accepted = ", ".join(_ACCEPTS[tee])
        raise TeeUnavailableError(
            f"no usable TEE for --tee {tee} (accepts {accepted}); probed:\n{report.text()}"
        )
    return chosen


def parse_gpus(text: str) -> int | str | None:
    """``auto`` → ``"auto"``, ``none`` → 0, ``N`` → N (0..64)."""
    if text in ("auto", "none"):
        return "auto" if text == "auto" else 0
    if not text.isdigit() or not 0 <= int(text) <= 64:
        raise ValueError("--gpus takes auto, none or a number of GPUs (0..64)")
    return int(text)


def select_gpus(gpus: int | str | None, seams: Seams, report: ProbeReport) -> NvmlGpuSource | None:
    """NVML GPUs per ``--gpus``: ``auto`` uses them when CC mode is on (none found: CPU only);
    a number requires exactly that many; 0 uses none."""
    if gpus == 0:
        report.add("NVML", False, "not probed (--gpus none)")
        return None
    try:
        source = NvmlGpuSource(seams.nvml(), expected=None if gpus == "auto" else int(gpus or 0))
    except TeeUnavailableError as exc:
        report.add("NVML", False, str(exc).removeprefix("NVML: "))
        if gpus == "auto" and ("not installed" in str(exc) or "cannot initialise" in str(exc)):
            return None  # no NVIDIA driver: a CPU-only enclave
        raise TeeUnavailableError(f"GPUs unusable for --gpus {gpus}; probed:\n{report.text()}") from None
    report.add("NVML", True, source.name)
    return source


def select_hardware(
    tee: str, gpus: str, seams: Seams | None = None
) -> tuple[CpuSource, NvmlGpuSource | None, str]:
    """Probe every interface (CPU TEEs, then NVML) and pick the sources; the probe report's text
    comes back for the start-up log. Raises :class:`TeeUnavailableError` listing every probe."""
    seams = seams or Seams()
    report = ProbeReport()
    try:
        wanted = parse_gpus(gpus)
    except ValueError as exc:
        raise TeeUnavailableError(str(exc)) from None
    cpu: CpuSource | None = None
    cpu_error: TeeUnavailableError | None = None
    try:
        cpu = select_cpu(tee, seams, report)
    except TeeUnavailableError as exc:
        cpu_error = exc
    gpu_error: TeeUnavailableError | None = None
    gpu_source: NvmlGpuSource | None = None
    try:
        gpu_source = select_gpus(wanted, seams, report)
    except TeeUnavailableError as exc:
        gpu_error = exc
    if cpu is None or gpu_error is not None:
        what = "no usable TEE" if cpu is None else "GPUs unusable"
        raise TeeUnavailableError(f"{what} (--tee {tee} --gpus {gpus}); probed:\n{report.text()}") from (
            cpu_error or gpu_error
        )
    return cpu, gpu_source, report.text()
