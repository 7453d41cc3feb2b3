"""TDX policy validation on real quotes: defaults are strict, each field fails its named check."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from veil.attestation.errors import MalformedInputError
from veil.attestation.options import VerifyOptions
from veil.attestation.tdx.collateral import load_collateral
from veil.attestation.tdx.quote import TdxQuote, parse_tdx_quote
from veil.attestation.tdx.validate import TdxPolicy, validate_tdx
from veil.attestation.tdx.verify import tcb_advisories_of, tcb_status_of, verify_tdx
from veil.attestation.verdict import CheckStatus, Verdict

REPORT_DATA_OFFSET = 48 + 520  # quote v4: header, then report_data at 520 in the TD report
MRTD_OFFSET = 48 + 136
TD_ATTRIBUTES_OFFSET = 48 + 120


def status(v: Verdict, name: str) -> CheckStatus:
    check = v.get(name)
    assert check is not None, name
    return check.status


@pytest.fixture(scope="module")
def raw(evidence_dir: Path) -> bytes:
    return (evidence_dir / "tdx" / "dcap-qvl" / "tdx_quote").read_bytes()


@pytest.fixture(scope="module")
def quote(raw: bytes) -> TdxQuote:
    return parse_tdx_quote(raw)


def exact_policy(q: TdxQuote, **kw: object) -> TdxPolicy:
    td = q.td_report
    fields: dict[str, object] = {
        "mrtd": frozenset({td.mr_td}),
        "rtmr": tuple(frozenset({r}) for r in td.rtmrs),
        "mrseam": frozenset({td.mr_seam}),
        "report_data": td.report_data,
        "mr_config_id": td.mr_config_id,
    }
    fields.update(kw)
    return TdxPolicy(**fields)  # type: ignore[arg-type]


def test_verify_then_validate_the_real_quote(evidence_dir: Path, quote: TdxQuote) -> None:
    collateral = load_collateral((evidence_dir / "tdx/dcap-qvl/tdx_quote_collateral.json").read_bytes())
    verified = verify_tdx(quote, VerifyOptions(now=datetime(2025, 7, 1, tzinfo=UTC)), collateral=collateral)
    v = validate_tdx(
        quote,
        exact_policy(quote),
        tcb_status=tcb_status_of(verified),
        advisory_ids=tcb_advisories_of(verified),
    )
    assert (verified + v).ok
    assert all(c.status is CheckStatus.PASS for c in v.checks), v.table()


def test_default_policy_fails_closed_on_the_code_identity(quote: TdxQuote) -> None:
    """Issue #11: an empty MRTD or RTMR allow-list fails (was: skip); MRSEAM stays optional."""
    v = validate_tdx(quote, TdxPolicy(), tcb_status="UpToDate")
    assert {c.name for c in v.failed} == {
        "policy.mrtd",
        "policy.rtmr0",
        "policy.rtmr1",
        "policy.rtmr2",
        "policy.rtmr3",
    }
    assert "release manifest" in (v.get("policy.mrtd") or pytest.fail()).detail
    check = v.get("policy.mrseam")
    assert check is not None and check.status is CheckStatus.SKIP and check.detail == "no allow-list"
    assert status(v, "policy.report_data") is CheckStatus.SKIP
    explore = validate_tdx(quote, TdxPolicy(allow_any_measurement=True), tcb_status="UpToDate")
    assert explore.ok
    for name in ("policy.mrtd", "policy.rtmr0", "policy.rtmr3"):
        assert (
            status(explore, name) is CheckStatus.SKIP
            and "UNPINNED" in (explore.get(name) or pytest.fail()).detail
        )


def test_tcb_status_default_is_up_to_date_only(quote: TdxQuote) -> None:
    strict = TdxPolicy()
    assert status(validate_tdx(quote, strict, tcb_status="UpToDate"), "policy.tcb_status") is CheckStatus.PASS
    for other in ("SWHardeningNeeded", "OutOfDate", "ConfigurationNeeded", "Revoked"):
        assert status(validate_tdx(quote, strict, tcb_status=other), "policy.tcb_status") is CheckStatus.FAIL
    relaxed = TdxPolicy(allowed_tcb_statuses=frozenset({"UpToDate", "SWHardeningNeeded"}))
    assert status(validate_tdx(quote, relaxed, tcb_status="SWHardeningNeeded"), "policy.tcb_status") is (
        CheckStatus.PASS
    )
    assert (
        status(validate_tdx(quote, relaxed, tcb_status="OutOfDate"), "policy.tcb_status") is CheckStatus.FAIL
    )


def test_missing_tcb_status_fails_unless_allowed(quote: TdxQuote) -> None:
    assert status(validate_tdx(quote, TdxPolicy(), tcb_status=None), "policy.tcb_status") is CheckStatus.FAIL
    lenient = TdxPolicy(allow_missing_tcb_status=True)
    assert status(validate_tdx(quote, lenient, tcb_status=None), "policy.tcb_status") is CheckStatus.SKIP


def test_rejected_advisories(quote: TdxQuote) -> None:
    p = TdxPolicy(
        allowed_tcb_statuses=frozenset({"OutOfDate"}), rejected_advisories=frozenset({"INTEL-SA-01036"})
    )
    v = validate_tdx(quote, p, tcb_status="OutOfDate", advisory_ids=("INTEL-SA-01036", "INTEL-SA-01099"))
    assert status(v, "policy.advisories") is CheckStatus.FAIL
    assert status(validate_tdx(quote, p, tcb_status="OutOfDate"), "policy.advisories") is CheckStatus.PASS


def _tamper(raw: bytes, offset: int, value: int) -> TdxQuote:
    buf = bytearray(raw)
    buf[offset] ^= value
    return parse_tdx_quote(bytes(buf))


@pytest.mark.parametrize(
    ("offset", "check"),
    [
        (REPORT_DATA_OFFSET + 5, "policy.report_data"),
        (MRTD_OFFSET + 3, "policy.mrtd"),
        (48 + 330, "policy.rtmr0"),  # one check per RTMR since issue #11
    ],
)
def test_changed_field_fails_named_check_and_signature(
    raw: bytes, quote: TdxQuote, offset: int, check: str
) -> None:
    tampered = _tamper(raw, offset, 0x40)
    v = validate_tdx(tampered, exact_policy(quote), tcb_status="UpToDate")
    assert [c.name for c in v.failed] == [check]
    verified = verify_tdx(tampered, VerifyOptions(now=datetime(2025, 7, 1, tzinfo=UTC)), collateral=None)
    assert status(verified, "tdx.ak.signature") is CheckStatus.FAIL


def test_debug_attribute_fails_policy_debug(raw: bytes, quote: TdxQuote) -> None:
    debug = _tamper(raw, TD_ATTRIBUTES_OFFSET, 0x01)
    assert debug.td_report.debug and not quote.td_report.debug
    v = validate_tdx(debug, exact_policy(quote), tcb_status="UpToDate")
    assert [c.name for c in v.failed] == ["policy.debug"]
    allowed = validate_tdx(debug, exact_policy(quote, allow_debug=True), tcb_status="UpToDate")
    assert status(allowed, "policy.debug") is CheckStatus.PASS
    assert status(
        verify_tdx(debug, VerifyOptions(now=datetime(2025, 7, 1, tzinfo=UTC)), collateral=None),
        "tdx.ak.signature",
    ) is (CheckStatus.FAIL)


def test_rtmr_checks_name_each_unpinned_rtmr(quote: TdxQuote) -> None:
    """Was: one policy.rtmr check naming the unconstrained RTMRs; since issue #11 each RTMR has its
    own check and an unconstrained one fails."""
    p = TdxPolicy(rtmr=(frozenset({quote.td_report.rtmr0}), frozenset(), frozenset(), frozenset()))
    v = validate_tdx(quote, p, tcb_status="UpToDate")
    assert status(v, "policy.rtmr0") is CheckStatus.PASS
    for i in (1, 2, 3):
        check = v.get(f"policy.rtmr{i}")
        assert check is not None and check.status is CheckStatus.FAIL and f"no RTMR{i} pinned" in check.detail


def test_bad_policy_values_are_typed() -> None:
    with pytest.raises(MalformedInputError):
        TdxPolicy(mrtd=frozenset({b"short"}))
    with pytest.raises(MalformedInputError):
        TdxPolicy(report_data=b"x" * 63)
    with pytest.raises(MalformedInputError):
        TdxPolicy(allowed_tcb_statuses=frozenset({"Fine"}))
    with pytest.raises(MalformedInputError):
        TdxPolicy(rtmr=(frozenset(),))  # type: ignore[arg-type]
