"""NVIDIA GPU / NVSwitch **validate**: a genuine report's fields against what the caller expects.

The field half of NVIDIA attestation (the signature, chain and RIM checks are
:mod:`veil.attestation.nvidia.verify`, which calls these for :func:`~.verify.verify_gpu`):

* ``{p}.nonce`` — the request's nonce is the one the verifier asked for.
* ``{p}.driver_version`` / ``{p}.vbios_version`` — reported, and allowed by the :class:`GpuPolicy`.
* ``{p}.measurements`` — :func:`compare_measurements`, NVIDIA's appraisal: driver and VBIOS
  active indices must not collide, and every active golden measurement of the (verified)
  RIMs must equal one of its alternatives in the report.

Pure: no I/O, no cryptography.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veil.attestation.errors import MalformedInputError
from veil.attestation.nvidia.report import GpuKind, GpuReport, OpaqueFieldType
from veil.attestation.nvidia.rim import Rim, RimMeasurement
from veil.attestation.verdict import VerdictBuilder

__all__ = [
    "NVDEC0_DISABLED",
    "NVDEC0_ENABLED",
    "GpuPolicy",
    "compare_measurements",
    "validate_measurements",
    "validate_nonce",
    "validate_versions",
]

NVDEC0_ENABLED = 0xAA
NVDEC0_DISABLED = 0x55  # NVIDIA skips golden index 35 when NVDEC0 is disabled
_NVDEC_INDEX = 35


@dataclass(frozen=True, slots=True)
class GpuPolicy:
    """What a GPU report must state beyond being genuine. Strict by default (fail closed).

    ``driver_versions`` / ``vbios_versions``: allowed versions (empty: any; the check still
    passes only when the version is reported, and names it). ``require_rims`` (default True):
    every GPU needs a verified driver and VBIOS RIM (an NVSwitch its BIOS RIM) and its
    measurements compared with them; a missing RIM fails. ``require_ocsp`` (default True):
    the device chain and every RIM signing chain need OCSP status ``good`` (stapled, or online
    for auditors); none fails. Setting either to False is the opt-out for auditors exploring
    evidence (:meth:`exploring`): the checks are then skipped, never passed.
    """

    driver_versions: frozenset[str] = frozenset()
    vbios_versions: frozenset[str] = frozenset()
    require_rims: bool = True
    require_ocsp: bool = True

    @classmethod
    def exploring(cls, **changes: Any) -> GpuPolicy:
        """The LOUD opt-out: RIMs and OCSP skipped when absent (auditing unknown evidence only)."""
        return cls(**{"require_rims": False, "require_ocsp": False, **changes})

    @staticmethod
    def from_mapping(data: Mapping[str, Any]) -> GpuPolicy:
        """A policy from a TOML-style table: ``driver_versions`` / ``vbios_versions`` as lists of
        strings, ``require_rims`` / ``require_ocsp`` as booleans. Unknown keys and wrong types
        are an error."""
        unknown = sorted(set(data) - {"driver_versions", "vbios_versions", "require_rims", "require_ocsp"})
        if unknown:
            raise MalformedInputError(f"unknown GPU policy key(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key in ("driver_versions", "vbios_versions"):
            if key in data:
                value = data[key]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise MalformedInputError(f"{key} must be a list of strings")
                kwargs[key] = frozenset(value)
        for key in ("require_rims", "require_ocsp"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise MalformedInputError(f"{key} must be true or false")
                kwargs[key] = data[key]
        return GpuPolicy(**kwargs)


def validate_nonce(v: VerdictBuilder, p: str, report: GpuReport, nonce: bytes | None) -> None:
    """``{p}.nonce``: the report carries ``nonce`` (skipped when None, which a policy must not accept)."""
    if nonce is None:
        v.skip(f"{p}.nonce", f"no expected nonce given (report carries {report.nonce.hex()})")
    elif len(nonce) != len(report.nonce):
        v.fail(f"{p}.nonce", f"expected nonce must be {len(report.nonce)} bytes, got {len(nonce)}")
    elif hmac.compare_digest(bytes(nonce), report.nonce):
        v.passed(f"{p}.nonce", report.nonce.hex())
    else:
        v.fail(f"{p}.nonce", f"report nonce {report.nonce.hex()} != expected {bytes(nonce).hex()}")


def validate_versions(v: VerdictBuilder, p: str, report: GpuReport, kind: GpuKind, policy: GpuPolicy) -> None:
    """``{p}.driver_version`` (GPUs) and ``{p}.vbios_version``: reported, and allowed by ``policy``."""
    for name, allowed, needed in (
        ("driver_version", policy.driver_versions, kind == "gpu"),
        ("vbios_version", policy.vbios_versions, True),
    ):
        try:
            version = (
                report.opaque.driver_version if name == "driver_version" else report.opaque.vbios_version
            )
        except MalformedInputError as exc:
            v.fail(f"{p}.{name}", str(exc))
            continue
        if version is None:
            if needed:
                v.fail(f"{p}.{name}", "not reported")
            else:
                v.skip(f"{p}.{name}", f"not reported by {kind}")
        elif allowed and version not in allowed:
            v.fail(f"{p}.{name}", f"{version} not in allowed {sorted(allowed)}")
        else:
            v.passed(f"{p}.{name}", version)


def validate_measurements(
    v: VerdictBuilder,
    p: str,
    report: GpuReport,
    *,
    driver: Rim | None,
    vbios: Rim | None,
    missing: tuple[str, ...] = (),
    require_all: bool = True,
) -> None:
    """``{p}.measurements``: the report's blocks against the golden values of verified RIMs.

    ``missing`` names the RIMs (``"driver"``, ``"VBIOS"``) that should have been given but
    were not verified: what was given is still compared, index by index, and the check then
    fails (``require_all``) or is skipped, naming the missing RIM; it never passes.
    """
    nvdec = report.opaque.get(OpaqueFieldType.NVDEC0_STATUS)
    problems = compare_measurements(
        report.measurements,
        driver=driver,
        vbios=vbios,
        nvdec0_status=nvdec[0] if nvdec and len(nvdec) == 1 else None,
    )
    compared = ", ".join(
        f"{name} indices {_ranges(sorted(rim.active))}"
        for name, rim in (("driver", driver), ("VBIOS", vbios))
        if rim is not None
    )
    if problems:
        more = f"; … and {len(problems) - 8} more" if len(problems) > 8 else ""
        v.fail(f"{p}.measurements", "; ".join(problems[:8]) + more)
    elif missing:
        done = f"{compared} match; " if compared else ""
        (v.fail if require_all else v.skip)(
            f"{p}.measurements", f"{done}not compared: no verified {' or '.join(missing)} RIM"
        )
    else:
        v.passed(f"{p}.measurements", f"{len(report.measurements)} blocks; {compared} match the RIMs")


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2, 5"``."""
    out: list[str] = []
    for i in indices:
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out) or "none"


def compare_measurements(
    measurements: Mapping[int, bytes],
    *,
    driver: Rim | None,
    vbios: Rim | None,
    nvdec0_status: int | None = None,
) -> list[str]:
    """NVIDIA's measurement appraisal; returns the problems (empty: all match).

    ``measurements`` maps SPDM block index (1-based) to value. Golden index ``i`` is compared
    with block ``i + 1``. Index 35 is skipped when ``nvdec0_status`` is ``0x55`` (disabled).
    """
    golden: dict[int, tuple[str, RimMeasurement]] = {}
    problems: list[str] = []
    for source, rim in (("driver", driver), ("vbios", vbios)):
        if rim is None:
            continue
        for index, m in rim.active.items():
            if index in golden:
                problems.append(f"index {index} active in both driver and VBIOS RIMs")
            golden[index] = (source, m)
    if problems:
        return problems
    if nvdec0_status not in (None, NVDEC0_ENABLED, NVDEC0_DISABLED):
        return [f"unknown NVDEC0 status 0x{nvdec0_status:02x}"]
    for index in sorted(golden):
        source, m = golden[index]
        if index == _NVDEC_INDEX and nvdec0_status == NVDEC0_DISABLED:
            continue
        value = measurements.get(index + 1)
        if value is None:
            problems.append(f"index {index} ({source}): no runtime measurement")
        elif value not in m.alternatives:
            problems.append(
                f"index {index} ({source}): {value.hex()[:16]}… matches none of {len(m.alternatives)}"
            )
    return problems
