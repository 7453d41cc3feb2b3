"""Validate a verified TDX quote against a policy (*validate*; *verify* is :mod:`.verify`).

The defaults are production-strict and fail closed: debug TDs are refused, only
``UpToDate`` is an acceptable TCB status, a missing TCB status (no collateral) fails, and
the code identity must be pinned: an empty MRTD allow-list fails ``policy.mrtd`` and an
empty RTMR*i* allow-list fails ``policy.rtmr<i>`` (RTMR0–3 measure the firmware
configuration, kernel and command line, and the OS), unless the loud opt-out
``allow_any_measurement`` is set. An empty MRSEAM list is ``skip: no allow-list`` (the TDX
module is Intel's, appraised through the TCB status).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from veil.attestation.errors import MalformedInputError
from veil.attestation.tdx.collateral import TCB_STATUSES
from veil.attestation.tdx.quote import TdxQuote
from veil.attestation.tdx.tcb import RELAUNCH_STATUSES
from veil.attestation.verdict import Verdict, VerdictBuilder

__all__ = ["TdxPolicy", "validate_tdx"]

_NO_ALLOW_LIST = "no allow-list"


def _digests(values: Iterable[bytes], size: int, what: str) -> frozenset[bytes]:
    out = frozenset(bytes(v) for v in values)
    if any(len(v) != size for v in out):
        raise MalformedInputError(f"{what} allow-list entries must be {size} bytes")
    return out


@dataclass(frozen=True)
class TdxPolicy:
    """What a TD must look like to be trusted.

    ``rtmr`` holds one allow-list per RTMR (0–3); an empty list (like an empty ``mrtd``)
    fails its check unless ``allow_any_measurement``. ``report_data`` None skips the check
    (the caller binds the nonce elsewhere, e.g. through :mod:`veil.attestation.binding`).
    """

    allow_debug: bool = False
    mrtd: frozenset[bytes] = frozenset()
    rtmr: tuple[frozenset[bytes], frozenset[bytes], frozenset[bytes], frozenset[bytes]] = (
        frozenset(),
        frozenset(),
        frozenset(),
        frozenset(),
    )
    mrseam: frozenset[bytes] = frozenset()
    allowed_tcb_statuses: frozenset[str] = field(default_factory=lambda: frozenset({"UpToDate"}))
    allow_missing_tcb_status: bool = False
    rejected_advisories: frozenset[str] = frozenset()
    report_data: bytes | None = None
    allow_any_measurement: bool = False
    # MRCONFIGID a release names: a Confidential Containers pod's initdata digest
    # (veil.attestation.initdata). None: the release names none and the check is skipped.
    mr_config_id: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrtd", _digests(self.mrtd, 48, "MRTD"))
        object.__setattr__(self, "mrseam", _digests(self.mrseam, 48, "MRSEAM"))
        if len(self.rtmr) != 4:
            raise MalformedInputError("rtmr must hold four allow-lists (RTMR0–3)")
        rtmr = tuple(_digests(r, 48, f"RTMR{i}") for i, r in enumerate(self.rtmr))
        object.__setattr__(self, "rtmr", rtmr)
        statuses = frozenset(self.allowed_tcb_statuses)
        unknown = statuses - {*TCB_STATUSES, *RELAUNCH_STATUSES}
        if unknown:
            raise MalformedInputError(f"unknown TCB statuses in policy: {sorted(unknown)}")
        object.__setattr__(self, "allowed_tcb_statuses", statuses)
        object.__setattr__(self, "rejected_advisories", frozenset(self.rejected_advisories))
        if self.report_data is not None and len(self.report_data) != 64:
            raise MalformedInputError("report_data must be 64 bytes")
        if self.mr_config_id is not None and len(self.mr_config_id) != 48:
            raise MalformedInputError("mr_config_id must be 48 bytes")

    @staticmethod
    def from_mapping(data: Mapping[str, Any]) -> TdxPolicy:
        """A policy from a TOML-style table: ``rtmr0``…``rtmr3`` and ``mrseam`` as lists of hex,
        ``allowed_tcb_statuses`` / ``rejected_advisories`` as lists of strings,
        ``allow_missing_tcb_status`` as a boolean. Unknown keys and wrong types are an error.
        (MRTD and debug are the client policy's top-level ``measurements`` / ``allow_debug``.)
        """
        known = {f"rtmr{i}" for i in range(4)} | {
            "mrseam", "allowed_tcb_statuses", "allow_missing_tcb_status", "rejected_advisories",
        }  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise MalformedInputError(f"unknown TDX policy key(s): {', '.join(unknown)}")
        rtmr = tuple(_hex_list(data, f"rtmr{i}") if f"rtmr{i}" in data else frozenset() for i in range(4))
        kwargs: dict[str, Any] = {"rtmr": rtmr}
        if "mrseam" in data:
            kwargs["mrseam"] = _hex_list(data, "mrseam")
        for key in ("allowed_tcb_statuses", "rejected_advisories"):
            if key in data:
                kwargs[key] = frozenset(_string_list(data, key))
        if "allow_missing_tcb_status" in data:
            if not isinstance(data["allow_missing_tcb_status"], bool):
                raise MalformedInputError("allow_missing_tcb_status must be true or false")
            kwargs["allow_missing_tcb_status"] = data["allow_missing_tcb_status"]
        return TdxPolicy(**kwargs)


def _string_list(data: Mapping[str, Any], key: str) -> list[str]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedInputError(f"{key} must be a list of strings")
    return value


def _hex_list(data: Mapping[str, Any], key: str) -> frozenset[bytes]:
    try:
        return frozenset(bytes.fromhex(v.removeprefix("0x")) for v in _string_list(data, key))
    except ValueError:
        raise MalformedInputError(f"{key}: entries must be hex") from None


ANY_MEASUREMENT = "UNPINNED: any code identity accepted (allow_any_measurement opt-out; never in production)"
_UNPINNED = (
    "no {what} pinned: pin it with a signed release manifest (Policy.from_release, "
    "--release/--publisher-key) or an allow-list ({key} = [...]); to explore unknown evidence "
    "only, opt out with allow_any_measurement = true (--any-measurement)"
)


def _pinned(
    b: VerdictBuilder,
    name: str,
    value: bytes,
    allowed: frozenset[bytes],
    *,
    what: str,
    key: str,
    any_ok: bool,
) -> None:
    """An identity allow-list: empty fails (or, with the opt-out, skips loudly)."""
    if allowed:
        _in_list(b, name, value, allowed, what)
    elif any_ok:
        b.skip(name, f"{ANY_MEASUREMENT}; {what} {value.hex()}")
    else:
        b.fail(name, _UNPINNED.format(what=what, key=key) + f" ({what} {value.hex()})")


def _in_list(b: VerdictBuilder, name: str, value: bytes, allowed: frozenset[bytes], what: str) -> None:
    if not allowed:
        b.skip(name, _NO_ALLOW_LIST)
    elif value in allowed:
        b.passed(name, f"{what} {value.hex()} is allowed")
    else:
        b.fail(name, f"{what} {value.hex()} is not in the allow-list ({len(allowed)} entries)")


def validate_tdx(
    quote: TdxQuote,
    policy: TdxPolicy,
    *,
    tcb_status: str | None,
    advisory_ids: Iterable[str] = (),
    tcb_not_appraised: str | None = None,
) -> Verdict:
    """Check the quote's fields against ``policy``.

    ``tcb_status`` / ``advisory_ids`` come from :func:`~veil.attestation.tdx.verify.verify_tdx`
    (see ``tcb_status_of``); None means no collateral was appraised. ``tcb_not_appraised``
    (``tcb_unappraised_reason`` of that verdict): collateral was given, but the verify step's
    ``"tdx.tcb.status failed"`` (or a prerequisite did): ``policy.tcb_status`` is then skipped,
    naming it; pass it only together with that failing verdict.
    """
    td = quote.td_report
    b = VerdictBuilder()
    if td.debug:
        b.check(
            "policy.debug",
            policy.allow_debug,
            "TD DEBUG attribute is set" + ("; allowed" if policy.allow_debug else ""),
        )
    else:
        b.passed("policy.debug", "TD DEBUG attribute is off")
    any_ok = policy.allow_any_measurement
    _pinned(b, "policy.mrtd", td.mr_td, policy.mrtd, what="MRTD", key="measurements", any_ok=any_ok)
    for i in range(4):
        _pinned(
            b,
            f"policy.rtmr{i}",
            td.rtmrs[i],
            policy.rtmr[i],
            what=f"RTMR{i}",
            key=f"[tdx] rtmr{i}",
            any_ok=any_ok,
        )
    _in_list(b, "policy.mrseam", td.mr_seam, policy.mrseam, "MRSEAM")
    if policy.mr_config_id is None:
        b.skip("policy.mrconfigid", "no MRCONFIGID named (the release pins no initdata)")
    else:
        b.check(
            "policy.mrconfigid",
            hmac.compare_digest(td.mr_config_id, policy.mr_config_id),
            f"MRCONFIGID {td.mr_config_id.hex()}"
            + (" is the pinned one" if td.mr_config_id == policy.mr_config_id else " is not the pinned one"),
        )

    if tcb_status is None:
        if tcb_not_appraised is not None:
            b.skip("policy.tcb_status", f"not checked: {tcb_not_appraised}")
        elif policy.allow_missing_tcb_status:
            b.skip("policy.tcb_status", "no TCB status (no collateral appraised); policy allows that")
        else:
            b.fail("policy.tcb_status", "no TCB status: verify with collateral to appraise the TCB")
    else:
        allowed = sorted(policy.allowed_tcb_statuses)
        b.check(
            "policy.tcb_status",
            tcb_status in policy.allowed_tcb_statuses,
            f"TCB status {tcb_status}; allowed: {', '.join(allowed)}",
        )
    if policy.rejected_advisories:
        hit = sorted(set(advisory_ids) & policy.rejected_advisories)
        b.check(
            "policy.advisories", not hit, f"rejected advisories present: {hit}" if hit else "none rejected"
        )

    if policy.report_data is None:
        b.skip("policy.report_data", "no expected report_data given")
    else:
        match = hmac.compare_digest(td.report_data, policy.report_data)
        b.check(
            "policy.report_data",
            match,
            "report_data matches"
            if match
            else f"report_data {td.report_data.hex()} is not the expected value",
        )
    return b.build()
