"""The identity a client pins: what a verified enclave is, as opposed to which key it holds.

A restarted enclave has a new key but must be the same code, serving the same
model under the same data policy. :class:`EnclaveIdentity` is that "same": the
platform, the hardware-signed launch measurements (SEV-SNP ``MEASUREMENT`` and
``HOST_DATA``; TDX ``MRTD`` and ``RTMR0``–``RTMR3``), and the claimed server build,
model and data-policy digests (bound into the signed ``report_data``). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.attestation import errors as att_errors
from veil.attestation.binding import Claims
from veil.attestation.snp.report import parse_snp_report
from veil.attestation.tdx.quote import parse_tdx_quote
from veil.proto.v1 import evidence_pb2

__all__ = ["EnclaveIdentity", "identity_of"]

_SNP = ("PLATFORM_SEV_SNP", "PLATFORM_SIMULATED_SEV_SNP")
_TDX = ("PLATFORM_TDX",)


@dataclass(frozen=True, slots=True)
class EnclaveIdentity:
    """What a pinned enclave must still be after a re-attestation (every field compared exactly).

    ``measurements`` are the platform's launch measurements by name, in report
    order (``measurement``, ``host_data`` for SEV-SNP; ``mr_td``, ``rtmr0``… for TDX).
    """

    platform: str
    measurements: tuple[tuple[str, bytes], ...]
    server_build_digest: bytes
    model_digest: bytes
    data_policy_digest: bytes

    def fields(self) -> dict[str, str]:
        """Every compared field by name, values as lowercase hex (the platform as its name)."""
        out = {"platform": self.platform}
        out.update({name: value.hex() for name, value in self.measurements})
        out["server_build_digest"] = self.server_build_digest.hex()
        out["model_digest"] = self.model_digest.hex()
        out["data_policy_digest"] = self.data_policy_digest.hex()
        return out

    def changes(self, new: EnclaveIdentity) -> tuple[str, ...]:
        """``"field: old → new"`` for every field that differs in ``new`` (empty when the same)."""
        old, now = self.fields(), new.fields()
        return tuple(
            f"{name}: {old.get(name, '(none)')} → {now.get(name, '(none)')}"
            for name in dict.fromkeys([*old, *now])
            if old.get(name) != now.get(name)
        )


def identity_of(evidence: evidence_pb2.Evidence, claims: Claims) -> EnclaveIdentity:
    """The identity of verified ``evidence``; raises ``VeilAttestationError`` for a platform it cannot pin.

    Call only on evidence whose verdict is good: the report is re-parsed here, not re-verified.
    """
    platform = (
        evidence_pb2.Platform.Name(evidence.platform)
        if evidence.platform in evidence_pb2.Platform.values()
        else ""
    )
    measurements: tuple[tuple[str, bytes], ...]
    if platform in _SNP:
        report = parse_snp_report(bytes(evidence.cpu_report))
        measurements = (("measurement", report.measurement), ("host_data", report.host_data))
    elif platform in _TDX:
        td = parse_tdx_quote(bytes(evidence.cpu_report)).td_report
        measurements = (("mr_td", td.mr_td), *((f"rtmr{i}", r) for i, r in enumerate(td.rtmrs)))
    else:
        raise att_errors.MalformedInputError(
            f"cannot pin the identity of platform {platform or evidence.platform}: "
            "no known launch measurement"
        )
    return EnclaveIdentity(
        platform=platform.removeprefix("PLATFORM_"),
        measurements=measurements,
        server_build_digest=claims.server_build_digest,
        model_digest=claims.model_digest,
        data_policy_digest=claims.data_policy_digest,
    )
