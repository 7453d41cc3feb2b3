"""SEV-SNP reports through ``/dev/sev-guest`` (``SNP_GET_EXT_REPORT``), for kernels without configfs-tsm.

The ioctl ABI of ``include/uapi/linux/sev-guest.h`` (as go-sev-guest uses it)::

    struct snp_guest_request_ioctl { u8 msg_version; u64 req_data; u64 resp_data; u64 exitinfo2; }  // 32 B
    struct snp_ext_report_req { u8 user_data[64]; u32 vmpl; u8 rsvd[28]; u64 certs_address; u32 certs_len; }
    struct snp_report_resp { u8 data[4000]; }  // status u32, report_size u32, 24 reserved, report
    SNP_GET_EXT_REPORT = _IOWR('S', 0x2, struct snp_guest_request_ioctl) = 0xC0205302

``certs_len`` is a multiple of the page size; when it is too small the ioctl fails with
``exitinfo2``'s VMM error ``SNP_GUEST_VMM_ERR_INVALID_LEN`` (1) and the needed length in
``certs_len``, and we ask again with that much. The seam is ``ioctl`` (``fcntl.ioctl``'s
signature) and ``open``: a fake reads the request through the addresses in it, as the kernel does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from veil.attestation.errors import VeilAttestationError
from veil.attestation.snp.report import REPORT_SIZE, parse_snp_report
from veil.enclave.errors import AttestationProviderError, TeeUnavailableError
from veil.enclave.tee.cert_table import cert_table_to_pem
from veil.enclave.tee.provider import CpuEvidencePart
from veil.proto.v1 import evidence_pb2

__all__ = ["SEV_GUEST_DEVICE", "SNP_GET_EXT_REPORT", "SevGuestSource"]

SEV_GUEST_DEVICE = Path("/dev/sev-guest")
SNP_GET_EXT_REPORT = 0xC0205302
GUEST_REQUEST = struct.Struct("<B7xQQQ")  # msg_version, req_data, resp_data, exitinfo2
EXT_REPORT_REQ = struct.Struct("<64sI28xQI4x")  # user_data, vmpl, certs_address, certs_len
RESPONSE_SIZE = 4000
RESPONSE_HEADER = struct.Struct("<II24x")  # status, report_size
VMM_ERR_INVALID_LEN = 1
PAGE = 4096
Ioctl = Callable[[int, int, Any, bool], int]


class SevGuestSource:
    """A :class:`~veil.enclave.tee.hardware.CpuSource` over ``/dev/sev-guest`` (see the module docstring)."""

    platform = evidence_pb2.PLATFORM_SEV_SNP

    def __init__(
        self,
        device: Path = SEV_GUEST_DEVICE,
        *,
        vmpl: int = 0,
        ioctl: Ioctl = fcntl.ioctl,
        open_device: Callable[[Path], int] = lambda p: os.open(p, os.O_RDWR),
        fetch_chain: Callable[[bytes], bytes] | None = None,
        certs_len: int = 4 * PAGE,
    ) -> None:
        self.device = Path(device)
        self.vmpl = vmpl
        self.name = f"SEV-SNP ({self.device}, SNP_GET_EXT_REPORT)"
        self._ioctl = ioctl
        self._open = open_device
        self._fetch_chain = fetch_chain
        self._certs_len = certs_len

    def cpu_evidence(self, report_data: bytes) -> CpuEvidencePart:
        if len(report_data) != 64:
            raise AttestationProviderError(f"report_data must be 64 bytes, got {len(report_data)}")
        try:
            fd = self._open(self.device)
        except FileNotFoundError:
            raise TeeUnavailableError(
                f"sev-guest: {self.device} does not exist (sev-guest driver not loaded)"
            ) from None
        except PermissionError:
            raise TeeUnavailableError(
                f"sev-guest: permission denied opening {self.device} "
                "(run as root or grant the service user access)"
            ) from None
        try:
            report, table = self._request(fd, report_data)
        finally:
            os.close(fd)
        try:
            signed = parse_snp_report(report).report_data
        except VeilAttestationError as exc:
            raise AttestationProviderError(f"sev-guest returned an unusable report: {exc}") from None
        if signed != report_data:
            raise AttestationProviderError("sev-guest report was made for other report_data")
        chain = b""
        if any(table):
            chain = cert_table_to_pem(table)
        elif self._fetch_chain is not None:
            chain = self._fetch_chain(report)
        return CpuEvidencePart(report, chain)

    def _request(self, fd: int, report_data: bytes) -> tuple[bytes, bytes]:
        certs_len = self._certs_len
        for _ in range(2):
            certs = ctypes.create_string_buffer(certs_len)
            req = ctypes.create_string_buffer(
                EXT_REPORT_REQ.pack(report_data, self.vmpl, ctypes.addressof(certs), certs_len),
                EXT_REPORT_REQ.size,
            )
            resp = ctypes.create_string_buffer(RESPONSE_SIZE)
            arg = bytearray(GUEST_REQUEST.pack(1, ctypes.addressof(req), ctypes.addressof(resp), 0))
            try:
                self._ioctl(fd, SNP_GET_EXT_REPORT, arg, True)
            except OSError as exc:
                exitinfo2 = GUEST_REQUEST.unpack(bytes(arg))[3]
                fw_error, vmm_error = exitinfo2 & 0xFFFFFFFF, exitinfo2 >> 32
                if exc.errno == errno.EIO and vmm_error == VMM_ERR_INVALID_LEN:
                    certs_len = EXT_REPORT_REQ.unpack(req.raw)[3]
                    if not 0 < certs_len <= 64 * PAGE:
                        raise AttestationProviderError(
                            f"sev-guest asks for {certs_len} bytes of certificates"
                        ) from None
                    continue
                if exc.errno in (errno.EPERM, errno.EACCES):
                    raise TeeUnavailableError(f"sev-guest: permission denied on {self.device}") from None
                raise AttestationProviderError(
                    f"sev-guest SNP_GET_EXT_REPORT failed: {exc.strerror} (firmware error 0x{fw_error:x}, "
                    f"VMM error 0x{vmm_error:x})"
                ) from None
            status, size = RESPONSE_HEADER.unpack_from(resp.raw)
            if status != 0:
                raise AttestationProviderError(f"sev-guest: firmware status 0x{status:x}")
            if size < REPORT_SIZE or size > RESPONSE_SIZE - RESPONSE_HEADER.size:
                raise AttestationProviderError(f"sev-guest: report of {size} bytes is truncated or malformed")
            report = resp.raw[RESPONSE_HEADER.size : RESPONSE_HEADER.size + REPORT_SIZE]
            return report, certs.raw
        raise AttestationProviderError("sev-guest: the certificate buffer was still too small")
