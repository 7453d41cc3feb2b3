"""A fake Azure vTPM and paravisor: HCL reports, runtime data and signed ``TPM2_Quote`` s.

The byte layouts are Azure's and the TPM's (see :mod:`veil.attestation.snp.azure`): the HCL
report (``HCLA`` header, the hardware report padded to 1184 bytes, IGVM request data, the JSON
variable data with the ``HCLAkPub`` attestation key and ``user-data``), a ``TPMS_ATTEST`` of
type quote signed RSASSA-PKCS1-v1_5 / SHA-256 by the attestation key, and a ``TDREPORT``
(1024 bytes) carrying a quote's REPORTDATA, MRTD and RTMRs. The hardware report inside comes
from the fake AMD (:mod:`.snp`) or the fake Intel (:mod:`.tdx`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from veil.attestation.snp.azure import (
    AK_KEY_ID,
    HCL_HW_REPORT_SIZE,
    IGVM_REQUEST_DATA_SIZE,
    PCR_COUNT,
    REPORT_TYPE_SNP,
    REPORT_TYPE_TDX,
    TPM_ALG_SHA256,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    VAR_DATA_OFFSET,
)
from veil.attestation.tdx.azure_verify import TD_REPORT_MRTD, TD_REPORT_REPORT_DATA, TD_REPORT_RTMRS
from veil.attestation.tdx.quote import parse_tdx_quote

__all__ = [
    "REPORT_TYPE_SNP",
    "REPORT_TYPE_TDX",
    "FakeVtpm",
    "hcl_report",
    "runtime_data",
    "snp_report_data_for",
    "td_report_for_quote",
]


def _b64url(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def runtime_data(ak: rsa.RSAPublicKey, user_data: bytes | None) -> bytes:
    """The HCL variable data: JSON naming the attestation key and the user-data (hex)."""
    nums = ak.public_numbers()
    doc: dict[str, object] = {
        "keys": [
            {"kid": AK_KEY_ID, "key_ops": ["sign"], "kty": "RSA", "e": _b64url(nums.e), "n": _b64url(nums.n)}
        ],
        "vm-configuration": {"console-enabled": False, "secure-boot": True, "tpm-enabled": True},
    }
    if user_data is not None:
        doc["user-data"] = user_data.hex().upper()
    return json.dumps(doc, separators=(",", ":")).encode()


def snp_report_data_for(var_data: bytes) -> bytes:
    """What the hardware signs on Azure: SHA-256(var_data) ‖ 32 zero bytes."""
    return hashlib.sha256(var_data).digest() + bytes(32)


def hcl_report(hw_report: bytes, var_data: bytes, *, report_type: int) -> bytes:
    """An HCL report around ``hw_report`` (SNP report or TDREPORT) and ``var_data`` (SHA-256 bound)."""
    end = VAR_DATA_OFFSET + len(var_data)
    header = b"HCLA" + struct.pack("<4I", 2, end, 2, 0) + bytes(12)
    igvm = struct.pack("<5I", IGVM_REQUEST_DATA_SIZE + len(var_data), 1, report_type, 1, len(var_data))
    return header + hw_report.ljust(HCL_HW_REPORT_SIZE, b"\0") + igvm + var_data


def td_report_for_quote(quote: bytes) -> bytes:
    """A 1024-byte TDREPORT with the quoted TD's REPORTDATA, MRTD and RTMRs (MAC zero: fake)."""
    td = parse_tdx_quote(quote).td_report
    out = bytearray(1024)
    out[TD_REPORT_REPORT_DATA] = td.report_data
    out[TD_REPORT_MRTD] = td.mr_td
    out[TD_REPORT_RTMRS] = b"".join(td.rtmrs)
    return bytes(out)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@dataclass
class FakeVtpm:
    """An attestation key and 24 SHA-256 PCRs; NV indices as a dict (what tpm2-tools would see)."""

    ak: rsa.RSAPrivateKey
    pcrs: list[bytes] = field(
        default_factory=lambda: [hashlib.sha256(b"veil/fake-pcr/%d" % i).digest() for i in range(PCR_COUNT)]
    )
    clock: int = 1_000_000

    def quote(self, nonce: bytes, selection: Sequence[int] = tuple(range(PCR_COUNT))) -> tuple[bytes, bytes]:
        """``TPM2_Quote`` over ``selection`` with ``nonce`` as extraData: (TPMS_ATTEST, signature)."""
        bitmap = bytearray(3)
        for i in selection:
            bitmap[i // 8] |= 1 << (i % 8)
        digest = hashlib.sha256(b"".join(self.pcrs[i] for i in sorted(selection))).digest()
        self.clock += 1
        attest = (
            struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE)
            + _tpm2b(b"\x00\x0b" + hashlib.sha256(b"veil/fake-ak-name").digest())
            + _tpm2b(nonce)
            + struct.pack(">QIIB", self.clock, 1, 0, 1)
            + struct.pack(">Q", 0x2000_0000_0000_0001)
            + struct.pack(">IHB", 1, TPM_ALG_SHA256, 3)
            + bytes(bitmap)
            + _tpm2b(digest)
        )
        signature = self.ak.sign(attest, padding.PKCS1v15(), hashes.SHA256())
        return attest, signature
