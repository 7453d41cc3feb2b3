"""Azure confidential VMs (SEV-SNP and TDX): evidence through the vTPM the paravisor exposes.

On an Azure CVM the guest sees no ``/dev/sev-guest``; the paravisor (HCL) does. Per report:

1. write Veil's 64-byte ``report_data`` to the vTPM NV index ``0x01400002`` (user data); the
   paravisor then requests a fresh hardware report whose REPORT_DATA binds the runtime data
   that carries it (``H(var_data)``);
2. read the HCL report from NV index ``0x01400001`` and check its ``user-data`` is ours;
3. ``TPM2_Quote`` with the attestation key (persistent handle ``0x81000003``) over SHA-256 PCRs
   0-23 with ``binding.tpm_nonce(report_data)`` as qualifying data;
4. SEV-SNP: the VCEK chain from the instance metadata service (THIM,
   ``http://169.254.169.254/metadata/THIM/amd/certification``); TDX: the quote for the HCL's TD
   report from ``http://169.254.169.254/acc/tdquote``.

TPM access is behind :class:`Tpm`. The implementation here drives **tpm2-tools**
(``tpm2_nvdefine``/``tpm2_nvwrite``/``tpm2_nvread``/``tpm2_quote``/``tpm2_pcrread``) through the
kernel's resource manager ``/dev/tpmrm0``. Why tpm2-tools rather than tpm2-pytss: tpm2-pytss
builds against the tss2 C libraries (``libtss2-dev``) at install time, which a slim enclave image
and this project's locked pip install do not have; tpm2-tools is one distro package
(``apt install tpm2-tools``), is what Azure's own guest attestation documentation uses, and keeps
the TPM out of the Python process. The HTTP endpoints are behind ``http_get`` / ``http_post``
(link-local, never reached in tests).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from veil.attestation.binding import tpm_nonce
from veil.attestation.errors import VeilAttestationError
from veil.attestation.snp.azure import (
    PCR_COUNT,
    REPORT_TYPE_SNP,
    parse_hcl_report,
    parse_runtime_data,
)
from veil.enclave.errors import AttestationProviderError, TeeUnavailableError
from veil.enclave.tee.provider import CpuEvidencePart
from veil.proto.v1 import evidence_pb2

__all__ = [
    "AK_HANDLE",
    "NV_HCL_REPORT",
    "NV_USER_DATA",
    "AzureVtpmSource",
    "Tpm",
    "Tpm2Tools",
    "imds_get",
    "imds_post",
]

NV_HCL_REPORT = 0x01400001
NV_USER_DATA = 0x01400002
AK_HANDLE = 0x81000003
THIM_URL = "http://169.254.169.254/metadata/THIM/amd/certification"
TDQUOTE_URL = "http://169.254.169.254/acc/tdquote"
TPM_DEVICE = Path("/dev/tpmrm0")


class Tpm(Protocol):
    """The vTPM operations Azure evidence needs (tpm2-tools here, a fake in tests)."""

    def nv_read(self, index: int) -> bytes: ...
    def nv_write(self, index: int, data: bytes) -> None: ...
    def quote(self, handle: int, nonce: bytes, pcrs: Sequence[int]) -> tuple[bytes, bytes, list[bytes]]:
        """(TPMS_ATTEST, RSA signature, SHA-256 values of ``pcrs``)."""
        ...


class Tpm2Tools:
    """:class:`Tpm` through the tpm2-tools commands (see the module docstring)."""

    def __init__(self, device: Path = TPM_DEVICE, *, timeout_s: float = 30.0) -> None:
        self.device = Path(device)
        self.tcti = f"device:{self.device}"
        self.timeout_s = timeout_s
        if shutil.which("tpm2_quote") is None:
            raise TeeUnavailableError("TPM: tpm2-tools is not installed (apt install tpm2-tools)")
        if not self.device.exists():
            raise TeeUnavailableError(f"TPM: {self.device} does not exist (no vTPM)")

    def _run(self, *args: str, stdin: bytes | None = None) -> bytes:
        try:
            done = subprocess.run(
                [*args, "-T", self.tcti],
                input=stdin,
                capture_output=True,
                timeout=self.timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AttestationProviderError(f"TPM: {args[0]} failed to run: {type(exc).__name__}") from None
        if done.returncode != 0:
            first = done.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
            if b"permission" in done.stderr.lower() or b"EACCES" in done.stderr:
                raise TeeUnavailableError(f"TPM: permission denied on {self.device} (tss group or root)")
            raise AttestationProviderError(f"TPM: {args[0]} exited {done.returncode}: {' '.join(first)}")
        return done.stdout

    def nv_read(self, index: int) -> bytes:
        return self._run("tpm2_nvread", "-C", "o", f"0x{index:08x}")

    def nv_write(self, index: int, data: bytes) -> None:
        try:
            self._run("tpm2_nvreadpublic", f"0x{index:08x}")
        except AttestationProviderError:
            self._run(
                "tpm2_nvdefine",
                "-C",
                "o",
                "-s",
                str(len(data)),
                "-a",
                "ownerread|ownerwrite|authread|authwrite",
                f"0x{index:08x}",
            )
        self._run("tpm2_nvwrite", "-C", "o", "-i", "-", f"0x{index:08x}", stdin=data)

    def quote(self, handle: int, nonce: bytes, pcrs: Sequence[int]) -> tuple[bytes, bytes, list[bytes]]:
        selection = "sha256:" + ",".join(map(str, pcrs))
        with tempfile.TemporaryDirectory(prefix="veil-tpm-") as tmp:
            msg, sig, values = Path(tmp, "msg"), Path(tmp, "sig"), Path(tmp, "pcrs")
            self._run(
                "tpm2_quote", "-c", f"0x{handle:08x}", "-l", selection, "-q", nonce.hex(), "-m", str(msg),
                "-s", str(sig), "-f", "plain", "-o", str(values), "-F", "values", "-g", "sha256",
            )  # fmt: skip
            raw = values.read_bytes()
            return msg.read_bytes(), sig.read_bytes(), [raw[i : i + 32] for i in range(0, len(raw), 32)]


def imds_get(url: str) -> bytes:
    """GET from the instance metadata service (link-local; never reached in tests)."""
    req = urllib.request.Request(url, headers={"Metadata": "true"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # fixed link-local URL
        return bytes(resp.read())


def imds_post(url: str, body: bytes) -> bytes:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:  # fixed link-local URL
        return bytes(resp.read())


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AzureVtpmSource:
    """A :class:`~veil.enclave.tee.hardware.CpuSource` for Azure SNP or TDX CVMs (module docstring)."""

    def __init__(
        self,
        tpm: Tpm,
        *,
        http_get: Callable[[str], bytes] = imds_get,
        http_post: Callable[[str, bytes], bytes] = imds_post,
        attempts: int = 3,
    ) -> None:
        self.tpm = tpm
        self._get = http_get
        self._post = http_post
        self.attempts = attempts
        try:
            hcl = parse_hcl_report(tpm.nv_read(NV_HCL_REPORT))
        except VeilAttestationError as exc:
            raise TeeUnavailableError(
                f"TPM: NV index 0x{NV_HCL_REPORT:08x} holds no HCL report: {exc}"
            ) from None
        self.snp = hcl.report_type == REPORT_TYPE_SNP
        self.platform = evidence_pb2.PLATFORM_AZURE_SEV_SNP if self.snp else evidence_pb2.PLATFORM_AZURE_TDX
        self.name = f"Azure {'SEV-SNP' if self.snp else 'TDX'} CVM (vTPM HCL report)"
        self._chain: bytes | None = None

    def cpu_evidence(self, report_data: bytes) -> CpuEvidencePart:
        if len(report_data) != 64:
            raise AttestationProviderError(f"report_data must be 64 bytes, got {len(report_data)}")
        raw = self._hcl_for(report_data)
        hcl = parse_hcl_report(raw)
        message, signature, pcrs = self.tpm.quote(AK_HANDLE, tpm_nonce(report_data), range(PCR_COUNT))
        if len(pcrs) != PCR_COUNT or any(len(p) != 32 for p in pcrs):
            raise AttestationProviderError(f"TPM: expected {PCR_COUNT} SHA-256 PCR values")
        azure = evidence_pb2.AzureVtpmEvidence(
            hcl_report=raw, tpm_quote_message=message, tpm_quote_signature=signature, pcrs=pcrs
        )
        if self.snp:
            return CpuEvidencePart(hcl.snp_report_bytes, self._vcek_chain(), azure)
        return CpuEvidencePart(self._td_quote(hcl.td_report_bytes), b"", azure)

    def _hcl_for(self, report_data: bytes) -> bytes:
        for _ in range(self.attempts):
            self.tpm.nv_write(NV_USER_DATA, report_data)
            raw = self.tpm.nv_read(NV_HCL_REPORT)
            try:
                hcl = parse_hcl_report(raw)
                user = parse_runtime_data(hcl.variable_data).user_data
            except VeilAttestationError as exc:
                raise AttestationProviderError(f"TPM: the HCL report does not parse: {exc}") from None
            if user is not None and user[: len(report_data)] == report_data:
                return raw
        raise AttestationProviderError("TPM: the HCL report never carried our user data (another writer?)")

    def _vcek_chain(self) -> bytes:
        if self._chain is None:
            try:
                doc = json.loads(self._get(THIM_URL))
                self._chain = (doc["vcekCert"] + doc["certificateChain"]).encode()
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AttestationProviderError(f"Azure THIM: no VCEK chain ({type(exc).__name__})") from None
        return self._chain

    def _td_quote(self, td_report: bytes) -> bytes:
        body = json.dumps({"report": base64.urlsafe_b64encode(td_report).rstrip(b"=").decode()}).encode()
        try:
            doc = json.loads(self._post(TDQUOTE_URL, body))
            return _b64url_decode(doc["quote"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AttestationProviderError(
                f"Azure quote endpoint: no TD quote ({type(exc).__name__})"
            ) from None
