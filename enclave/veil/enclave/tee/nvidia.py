"""NVIDIA Hopper/Blackwell GPUs in confidential-computing mode, through NVML (``nvidia-ml-py``).

:class:`NvmlGpuSource` opens NVML and refuses to start unless the system is in CC mode
(``nvmlSystemGetConfComputeState``: feature enabled, production environment, dev-tools mode off;
``nvmlSystemGetConfComputeSettings`` says the multi-GPU mode: none, protected PCIe or NVLink
encryption). Per request it asks every GPU for an SPDM report with the GPU nonce
(``nvmlDeviceGetConfComputeGpuAttestationReport``: request ‖ response) and its attestation
certificate chain (``nvmlDeviceGetConfComputeGpuCertificate``, PEM).

NVIDIA's CC flow keeps the GPUs closed to work until someone attested them:
:func:`verify_and_set_ready` verifies the enclave's own GPU evidence with the client's verifier
(:func:`veil.attestation.nvidia.verify.verify_gpu`: device chain to the NVIDIA root, signature,
nonce, RIMs and OCSP from the stapled collateral) and only then calls
``nvmlSystemSetConfComputeGpusReadyState(1)``.

NVSwitch evidence (HGX systems in protected-PCIe / multi-GPU mode): NVML does not expose it;
NVIDIA's ``nvattest`` tool (nvTrust) collects it from the fabric manager. When ``nvattest`` is
on ``PATH`` a :class:`NvattestSwitches` collector adds each switch's SPDM report as a
``KIND_NVSWITCH`` entry; without it, a system whose multi-GPU mode needs switches refuses to start.

The seam is the NVML module (``pynvml``'s functions and constants); tests pass a fake that
returns the real ctypes structures holding reports signed by the fake NVIDIA authority.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from veil.attestation.binding import NONCE_SIZE
from veil.attestation.nvidia.validate import GpuPolicy
from veil.attestation.nvidia.verify import GpuKind, load_cert_chain, nvidia_device_root, verify_gpu
from veil.attestation.options import VerifyOptions
from veil.attestation.stapled import stapled_nvidia
from veil.enclave.errors import AttestationProviderError, TeeUnavailableError
from veil.enclave.tee.provider import GpuEvidencePart
from veil.proto.v1 import evidence_pb2

__all__ = ["NvattestSwitches", "NvmlGpuSource", "load_nvml", "verify_and_set_ready"]

log = logging.getLogger("veil.enclave.tee")


def load_nvml() -> Any:
    """The ``pynvml`` module of nvidia-ml-py (NVIDIA's own bindings); TeeUnavailableError without it."""
    try:
        import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no stubs
    except ImportError:
        raise TeeUnavailableError(
            "NVML: nvidia-ml-py is not installed (pip install 'veil[enclave]')"
        ) from None
    return pynvml


class NvattestSwitches:
    """NVSwitch SPDM reports through NVIDIA's ``nvattest`` (JSON: one entry per switch)."""

    def __init__(self, run: Callable[[list[str]], bytes] | None = None) -> None:
        self._run = run or (
            lambda argv: subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout
        )

    @staticmethod
    def available() -> bool:
        return shutil.which("nvattest") is not None

    def evidence(self, nonce: bytes) -> list[GpuEvidencePart]:
        try:
            doc = json.loads(
                self._run(
                    [
                        "nvattest",
                        "collect-evidence",
                        "--device",
                        "nvswitch",
                        "--nonce",
                        nonce.hex(),
                        "--format",
                        "json",
                    ]
                )
            )
            items = doc["evidences"] if isinstance(doc, dict) else doc
            return [
                GpuEvidencePart(
                    evidence_pb2.GpuEvidence.KIND_NVSWITCH,
                    str(item.get("arch", "LS10")),
                    bytes.fromhex(item["evidence"]),
                    item["certificate"].encode(),
                    i,
                )
                for i, item in enumerate(items)
            ]
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AttestationProviderError(f"nvattest: no NVSwitch evidence ({type(exc).__name__})") from None


class NvmlGpuSource:
    """A :class:`~veil.enclave.tee.hardware.GpuSource` over NVML (see the module docstring)."""

    def __init__(
        self, nvml: Any, *, expected: int | None = None, switches: NvattestSwitches | None = None
    ) -> None:
        self.nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise TeeUnavailableError(
                f"NVML: cannot initialise ({_nvml_text(exc)}); is the NVIDIA driver loaded?"
            ) from None
        state = nvml.nvmlSystemGetConfComputeState()
        if state.ccFeature != nvml.NVML_CC_SYSTEM_FEATURE_ENABLED:
            raise TeeUnavailableError(
                "NVML: confidential-computing mode is off (nvidia-smi conf-compute -srs / set CC mode on)"
            )
        if state.devToolsMode != nvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF:
            raise TeeUnavailableError(
                "NVML: CC dev-tools mode is on: GPU memory is readable by the host; turn it off"
            )
        if state.environment != nvml.NVML_CC_SYSTEM_ENVIRONMENT_PROD:
            raise TeeUnavailableError(f"NVML: CC environment is {state.environment}, not production")
        settings = nvml.c_nvmlSystemConfComputeSettings_v1_t()
        self.multi_gpu_mode = nvml.NVML_CC_SYSTEM_MULTIGPU_NONE
        if nvml.nvmlSystemGetConfComputeSettings(settings) == nvml.NVML_SUCCESS:
            self.multi_gpu_mode = settings.multiGpuMode
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise TeeUnavailableError("NVML: CC mode is on but no GPU is visible")
        if expected is not None and count != expected:
            raise TeeUnavailableError(f"NVML: {count} GPU(s) visible, --gpus asked for {expected}")
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        mode = {nvml.NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE: "protected PCIe"}.get(self.multi_gpu_mode)
        self.switches = switches
        if mode is not None and switches is None:
            if not NvattestSwitches.available():
                # Fail closed: in protected-PCIe mode the NVSwitches carry the GPUs' traffic, and
                # a client could not see whether they are genuine without their evidence.
                raise TeeUnavailableError(
                    "NVML: multi-GPU mode is protected PCIe, whose NVSwitch evidence only NVIDIA's "
                    "`nvattest` collects; install it (nvTrust) and put it on PATH"
                )
            self.switches = NvattestSwitches()
        self.name = f"{count} NVIDIA GPU(s) in CC mode (NVML{', ' + mode if mode else ''}" + (
            ", NVSwitches via nvattest)" if self.switches else ")"
        )

    def gpu_evidence(self, gpu_nonce: bytes) -> Sequence[GpuEvidencePart]:
        if len(gpu_nonce) != NONCE_SIZE:
            raise AttestationProviderError(f"GPU nonce must be {NONCE_SIZE} bytes")
        nvml, out = self.nvml, []
        for index, handle in enumerate(self.handles):
            try:
                rep = nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, gpu_nonce)
                cert = nvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
            except nvml.NVMLError as exc:
                raise AttestationProviderError(
                    f"NVML: GPU {index} gave no evidence ({_nvml_text(exc)})"
                ) from None
            report = bytes(rep.attestationReport[: rep.attestationReportSize])
            chain = bytes(cert.attestationCertChain[: cert.attestationCertChainSize])
            if not report or not chain:
                raise AttestationProviderError(f"NVML: GPU {index} returned an empty report or chain")
            out.append(GpuEvidencePart(evidence_pb2.GpuEvidence.KIND_GPU, "HOPPER", report, chain, index))
        if self.switches is not None:
            out.extend(self.switches.evidence(gpu_nonce))
        return out

    def set_ready(self) -> None:
        self.nvml.nvmlSystemSetConfComputeGpusReadyState(1)


def _nvml_text(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def verify_and_set_ready(
    source: NvmlGpuSource,
    collateral: evidence_pb2.Collateral | None,
    *,
    nonce: bytes,
    now: dt.datetime,
    roots: tuple[Any, ...] = (),
    rim_roots: tuple[Any, ...] = (),
    policy: GpuPolicy | None = None,
) -> int:
    """Verify the enclave's own GPUs as a client would, then open them for work; returns the count.

    Raises :class:`TeeUnavailableError` naming the failed checks; the GPUs stay not-ready then.
    """
    stapled = stapled_nvidia(collateral or evidence_pb2.Collateral())
    options = VerifyOptions(
        now=now, trusted_roots=roots or (nvidia_device_root(),), ocsp_post=stapled.ocsp_post
    )
    failed: list[str] = []
    parts = source.gpu_evidence(nonce)
    for part in parts:
        kind: GpuKind = "nvswitch" if part.kind == evidence_pb2.GpuEvidence.KIND_NVSWITCH else "gpu"
        verdict = verify_gpu(
            part.report,
            load_cert_chain(part.cert_chain),
            replace(options),
            nonce=nonce,
            kind=kind,
            prefix=f"gpu[{part.index}]",
            rims=stapled.rims,
            policy=policy or GpuPolicy(),
            rim_roots=rim_roots,
        )
        failed += [f"{c.name}: {c.detail}" for c in verdict.failed]
    if failed:
        raise TeeUnavailableError("GPU self-attestation failed, GPUs left not ready: " + "; ".join(failed))
    source.set_ready()
    log.info("GPU self-attestation passed for %d device(s); CC ready state set", len(parts))
    return len(parts)
