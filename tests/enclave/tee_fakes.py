"""Fakes at the TEE I/O seams that speak the real formats, signed by the test authorities.

* :class:`FakeConfigfs` — a configfs-tsm kernel: entries, ``generation`` bumped per write,
  ``outblob`` an SNP report (fake AMD VCEK) or TDX quote (fake Intel PCK) over the ``inblob``
  written, ``auxblob`` the GUID certificate table; knobs for races, permissions, truncation.
* :func:`fake_sev_guest_ioctl` — the ``SNP_GET_EXT_REPORT`` ioctl, reading and writing the
  request through the addresses in it as the kernel does.
* :class:`FakeAzureTpm` — the Azure vTPM: user-data NV index, the HCL report the paravisor
  regenerates around a fresh hardware report, and quotes by the attestation key.
* :class:`FakeNvml` — ``pynvml``'s functions returning its real ctypes structures holding
  SPDM reports signed by the fake NVIDIA authority.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pynvml
from cryptography.hazmat.primitives.asymmetric import ec

from veil.attestation.snp.report import Product, TcbVersion
from veil.attestation.testing.azure import (
    REPORT_TYPE_SNP,
    REPORT_TYPE_TDX,
    FakeVtpm,
    hcl_report,
    runtime_data,
    snp_report_data_for,
    td_report_for_quote,
)
from veil.attestation.testing.nvidia import FakeGpuCa
from veil.attestation.testing.pki import pem
from veil.attestation.testing.snp import FakeAmd, rsa_key, signed_report
from veil.attestation.testing.tdx import FakeIntel
from veil.enclave.tee.cert_table import ARK_GUID, ASK_GUID, VCEK_GUID, build_cert_table
from veil.enclave.tee.sev_guest import EXT_REPORT_REQ, GUEST_REQUEST, RESPONSE_HEADER, SNP_GET_EXT_REPORT

MEASUREMENT = hashlib.sha384(b"veil/test-launch").digest()
MRTD = b"\x11" * 48
TCB = TcbVersion.from_parts(bootloader=4, tee=0, snp=22, microcode=213)
CHIP_ID = hashlib.sha512(b"veil/test-chip").digest()


@dataclass
class FakeSnp:
    """A fake AMD chip: VCEK and chain; signs reports over given report_data."""

    amd: FakeAmd
    vcek_key: ec.EllipticCurvePrivateKey
    vcek: Any

    @classmethod
    def make(cls, amd: FakeAmd) -> FakeSnp:
        key, cert = amd.leaf(TCB, hwid=CHIP_ID)
        return cls(amd, key, cert)

    def report(self, report_data: bytes) -> bytes:
        return signed_report(
            self.vcek_key,
            version=3,
            product=Product.MILAN,
            policy=0x30000,
            reported_tcb=TCB,
            platform_info=0x3,
            report_data=report_data,
            measurement=MEASUREMENT,
            chip_id=CHIP_ID,
        ).to_bytes()

    def table(self) -> bytes:
        return build_cert_table({VCEK_GUID: self.vcek, ASK_GUID: self.amd.ask, ARK_GUID: self.amd.ark})

    def chain_pem(self) -> bytes:
        return pem(self.vcek, self.amd.ask, self.amd.ark)


def tdx_quote(intel: FakeIntel, report_data: bytes) -> bytes:
    return intel.quote(report_data=report_data, mr_td=MRTD)[0]


# ------------------------------------------------------------------------------ configfs-tsm


@dataclass
class FakeConfigfs:
    """configfs-tsm as the kernel behaves (see the module docstring); ``sign(inblob) -> outblob``."""

    provider: str
    sign: Callable[[bytes], bytes]
    auxblob: bytes = b""
    races: int = 0  # attempts on which another writer bumps generation mid-report
    deny: bool = False  # mkdir fails with EACCES
    missing: bool = False  # no tsm/report directory
    truncate: int | None = None  # outblob cut to this many bytes
    other_inblob: bool = False  # outblob made for a different inblob (a kernel bug / race)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def mkdir(self, path: Path) -> None:
        if self.missing:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if self.deny:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        self.entries[path.name] = {"generation": 0, "inblob": b"", "privlevel": None}

    def rmdir(self, path: Path) -> None:
        self.removed.append(path.name)
        del self.entries[path.name]

    def exists(self, path: Path) -> bool:
        return path.name in ("privlevel", "auxblob") and self.provider == "sev_guest"

    def write(self, path: Path, data: bytes) -> None:
        e = self.entries[path.parent.name]
        e[path.name] = data
        e["generation"] += 1

    def read(self, path: Path) -> bytes:
        e = self.entries[path.parent.name]
        if path.name == "generation":
            return b"%d\n" % e["generation"]
        if path.name == "provider":
            return self.provider.encode() + b"\n"
        if path.name == "auxblob":
            return self.auxblob
        if path.name == "outblob":
            if self.races > 0:
                self.races -= 1
                e["generation"] += 1  # another process wrote inblob between our write and read
            inblob = e["inblob"] if not self.other_inblob else bytes(64)
            out = self.sign(inblob)
            return out if self.truncate is None else out[: self.truncate]
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))


# ------------------------------------------------------------------------------ sev-guest


def fake_sev_guest_ioctl(snp: FakeSnp, *, fw_status: int = 0) -> Callable[[int, int, Any, bool], int]:
    """The kernel side of SNP_GET_EXT_REPORT over real struct layouts and user-space addresses."""
    table = snp.table()

    def ioctl(fd: int, request: int, arg: Any, mutate: bool) -> int:
        assert request == SNP_GET_EXT_REPORT and mutate
        version, req_addr, resp_addr, _ = GUEST_REQUEST.unpack(bytes(arg))
        user_data, vmpl, certs_addr, certs_len = EXT_REPORT_REQ.unpack(
            ctypes.string_at(req_addr, EXT_REPORT_REQ.size)
        )
        if certs_len < len(table):
            need = (len(table) + 4095) // 4096 * 4096
            ctypes.memmove(
                req_addr, EXT_REPORT_REQ.pack(user_data, vmpl, certs_addr, need), EXT_REPORT_REQ.size
            )
            arg[:] = GUEST_REQUEST.pack(version, req_addr, resp_addr, 1 << 32)
            raise OSError(errno.EIO, "Input/output error")
        ctypes.memmove(certs_addr, table, len(table))
        report = snp.report(user_data)
        resp = RESPONSE_HEADER.pack(fw_status, len(report)) + report
        ctypes.memmove(resp_addr, resp, len(resp))
        return 0

    return ioctl


# ------------------------------------------------------------------------------ Azure vTPM


@dataclass
class FakeAzureTpm:
    """The Azure paravisor's vTPM: writing user data makes the next HCL report carry it."""

    hardware: Callable[[bytes], bytes]  # report_data -> SNP report or TDX quote
    report_type: int
    vtpm: FakeVtpm = field(default_factory=lambda: FakeVtpm(rsa_key(3)))
    user_data: bytes = bytes(64)
    quotes: dict[bytes, bytes] = field(default_factory=dict)  # TD report -> quote (the IMDS side)

    def nv_write(self, index: int, data: bytes) -> None:
        assert index == 0x01400002
        self.user_data = data

    def nv_read(self, index: int) -> bytes:
        assert index == 0x01400001
        var = runtime_data(self.vtpm.ak.public_key(), self.user_data)
        hw = self.hardware(snp_report_data_for(var))
        if self.report_type == REPORT_TYPE_TDX:
            td = td_report_for_quote(hw)
            self.quotes[td] = hw
            hw = td
        return hcl_report(hw, var, report_type=self.report_type)

    def quote(self, handle: int, nonce: bytes, pcrs: Any) -> tuple[bytes, bytes, list[bytes]]:
        message, signature = self.vtpm.quote(nonce, list(pcrs))
        return message, signature, [self.vtpm.pcrs[i] for i in pcrs]

    def imds_post(self, url: str, body: bytes) -> bytes:
        import base64
        import json

        td = base64.urlsafe_b64decode(json.loads(body)["report"] + "==")
        return json.dumps({"quote": base64.urlsafe_b64encode(self.quotes[td]).decode()}).encode()


__all__ = ["REPORT_TYPE_SNP", "REPORT_TYPE_TDX"]


# ------------------------------------------------------------------------------ NVML


@dataclass
class FakeNvml:
    """pynvml's CC functions over the fake NVIDIA CA; constants and errors are pynvml's own."""

    gpu: FakeGpuCa
    count: int = 1
    cc_on: bool = True
    devtools: bool = False
    library: bool = True
    ready: int = 0
    protected_pcie: bool = False

    def __getattr__(self, name: str) -> Any:
        return getattr(pynvml, name)  # constants, structures, NVMLError

    def nvmlInit(self) -> None:
        if not self.library:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    def nvmlSystemGetConfComputeState(self) -> Any:
        s = pynvml.c_nvmlConfComputeSystemState_t()
        s.environment = pynvml.NVML_CC_SYSTEM_ENVIRONMENT_PROD
        s.ccFeature = (
            pynvml.NVML_CC_SYSTEM_FEATURE_ENABLED if self.cc_on else pynvml.NVML_CC_SYSTEM_FEATURE_DISABLED
        )
        s.devToolsMode = (
            pynvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_ON
            if self.devtools
            else pynvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF
        )
        return s

    def nvmlSystemGetConfComputeSettings(self, settings: Any) -> int:
        settings.multiGpuMode = (
            pynvml.NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE
            if self.protected_pcie
            else pynvml.NVML_CC_SYSTEM_MULTIGPU_NONE
        )
        return int(pynvml.NVML_SUCCESS)

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, handle: int, nonce: bytes) -> Any:
        rep = pynvml.c_nvmlConfComputeGpuAttestationReport_t()
        raw = self.gpu.report(nonce)
        rep.attestationReportSize = len(raw)
        ctypes.memmove(ctypes.addressof(rep) + type(rep).attestationReport.offset, raw, len(raw))
        return rep

    def nvmlDeviceGetConfComputeGpuCertificate(self, handle: int) -> Any:
        cert = pynvml.c_nvmlConfComputeGpuCertificate_t()
        chain = pem(*self.gpu.chain)
        cert.attestationCertChainSize = len(chain)
        ctypes.memmove(ctypes.addressof(cert) + type(cert).attestationCertChain.offset, chain, len(chain))
        return cert

    def nvmlSystemSetConfComputeGpusReadyState(self, state: int) -> None:
        self.ready = state


def later(now: datetime, days: int) -> datetime:
    return now + timedelta(days=days)
