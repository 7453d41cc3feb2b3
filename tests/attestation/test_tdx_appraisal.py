"""TCB appraisal cases no real vector covers, on quotes minted by a fake Intel PKI (tdx_fakes).

Every case also runs dcap-qvl (with the fake root) through ``tdx.tcb.dcap_qvl``, so each
status below is one that dcap-qvl reaches independently, or a documented divergence.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from veil.attestation.options import VerifyOptions
from veil.attestation.tdx.fetch import pck_ca_of
from veil.attestation.tdx.quote import parse_tdx_quote
from veil.attestation.tdx.validate import TdxPolicy, validate_tdx
from veil.attestation.tdx.verify import tcb_advisories_of, tcb_status_of, verify_tdx
from veil.attestation.testing.tdx import FakeIntel, TcbLevelSpec
from veil.attestation.verdict import CheckStatus, Verdict

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SGX = (3, 3, 2, 2, 4, 1, 0, 5, *(0,) * 8)
SGX_HIGHER = (4, 4, 2, 2, 4, 1, 0, 5, *(0,) * 8)
TDX = (5, 0, 3, *(0,) * 13)


def status(v: Verdict, name: str) -> CheckStatus:
    check = v.get(name)
    assert check is not None, name
    return check.status


def detail(v: Verdict, name: str) -> str:
    check = v.get(name)
    assert check is not None, name
    return check.detail


@pytest.fixture(scope="module")
def intel() -> FakeIntel:
    return FakeIntel(NOW)


def run(intel: FakeIntel, quote_kw: dict[str, object] | None = None, **collateral_kw: object) -> Verdict:
    raw, _ = intel.quote(**(quote_kw or {}))  # type: ignore[arg-type]
    collateral = intel.collateral(**collateral_kw)  # type: ignore[arg-type]
    return verify_tdx(
        parse_tdx_quote(raw), VerifyOptions(now=NOW, trusted_roots=(intel.root,)), collateral=collateral
    )


def test_baseline_up_to_date(intel: FakeIntel) -> None:
    v = run(intel)
    assert v.ok, v.table()
    assert all(c.status is CheckStatus.PASS for c in v.checks), v.table()
    assert tcb_status_of(v) == "UpToDate"


def test_fake_root_is_not_intel(intel: FakeIntel) -> None:
    raw, _ = intel.quote()
    v = verify_tdx(parse_tdx_quote(raw), VerifyOptions(now=NOW), collateral=intel.collateral())
    assert status(v, "tdx.pck.chain") is CheckStatus.FAIL
    assert status(v, "tdx.collateral.tcb_info") is CheckStatus.FAIL
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS  # dcap-qvl with Intel's root rejects too


def test_platform_out_of_date_with_advisories(intel: FakeIntel) -> None:
    levels = [
        TcbLevelSpec(SGX_HIGHER, 11, TDX, "UpToDate"),
        TcbLevelSpec(SGX, 11, TDX, "OutOfDate", ("INTEL-SA-00837", "INTEL-SA-00960")),
    ]
    v = run(intel, levels=levels)
    assert tcb_status_of(v) == "OutOfDate"
    assert tcb_advisories_of(v) == ("INTEL-SA-00837", "INTEL-SA-00960")
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS, v.table()
    assert v.ok  # verify reports the status; the policy decides
    policy = validate_tdx(parse_tdx_quote(run_raw(intel)), TdxPolicy(), tcb_status=tcb_status_of(v))
    assert status(policy, "policy.tcb_status") is CheckStatus.FAIL


def run_raw(intel: FakeIntel) -> bytes:
    return intel.quote()[0]


def test_tcb_levels_are_matched_in_canonical_order(intel: FakeIntel) -> None:
    """JSON order is not trusted: the lower level listed first must not win."""
    levels = [
        TcbLevelSpec(SGX, 11, TDX, "OutOfDate", ("INTEL-SA-1",)),
        TcbLevelSpec(SGX, 11, (5, 0, 3, 1, *(0,) * 12), "UpToDate"),  # needs tee_tcb_svn[3] >= 1
        TcbLevelSpec(SGX, 12, TDX, "UpToDate"),  # needs PCE SVN 12
    ]
    assert tcb_status_of(run(intel, levels=levels)) == "OutOfDate"
    v = run(intel, {"tee_tcb_svn": bytes([6, 1, 3, 1]) + bytes(12)}, levels=levels)
    assert tcb_status_of(v) == "UpToDate"
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS


def test_pce_svn_below_every_level(intel: FakeIntel) -> None:
    v = run(intel, {"pce_svn": 10})
    assert [c.name for c in v.failed] == ["tdx.tcb.status"]
    assert "no matching TCB level" in v.failed[0].detail
    assert "No matching TCB level" in detail(v, "tdx.tcb.dcap_qvl")


def test_module_identity_out_of_date_merges(intel: FakeIntel) -> None:
    v = run(
        intel,
        {"tee_tcb_svn": bytes([3, 1, 3]) + bytes(13)},
        module_levels=[(6, "UpToDate", ()), (2, "OutOfDate", ("INTEL-SA-01036",))],
    )
    assert tcb_status_of(v) == "OutOfDate"
    assert tcb_advisories_of(v) == ("INTEL-SA-01036",)
    assert detail(v, "tdx.tdx_module") == "TDX_01: ISV SVN 3 OutOfDate"
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS, v.table()


def test_module_components_0_1_are_skipped_when_versioned(intel: FakeIntel) -> None:
    """tee_tcb_svn[1] > 0: bytes 0-1 are the module's SVN/version, appraised by its identity only."""
    levels = [TcbLevelSpec(SGX, 11, TDX, "UpToDate")]
    v = run(
        intel,
        {"tee_tcb_svn": bytes([3, 1, 3]) + bytes(13)},
        levels=levels,
        module_levels=[(3, "UpToDate", ())],
    )
    assert tcb_status_of(v) == "UpToDate"
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS
    unversioned = run(intel, {"tee_tcb_svn": bytes([3, 0, 3]) + bytes(13)}, levels=levels)
    assert status(unversioned, "tdx.tcb.status") is CheckStatus.FAIL  # byte 0 now compared: 3 < 5


def test_missing_module_identity_fails(intel: FakeIntel) -> None:
    v = run(intel, {"tee_tcb_svn": bytes([6, 2, 3]) + bytes(13)})
    assert status(v, "tdx.tdx_module") is CheckStatus.FAIL
    assert "TDX_02" in detail(v, "tdx.tdx_module")
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS


def test_module_signer_mismatch_fails(intel: FakeIntel) -> None:
    v = run(intel, {"mr_signer_seam": b"\x01" * 48})
    assert status(v, "tdx.tdx_module") is CheckStatus.FAIL
    assert "MRSIGNERSEAM" in detail(v, "tdx.tdx_module")
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS


def test_configuration_needed_with_out_of_date_qe(intel: FakeIntel) -> None:
    """Intel's QVL: platform ConfigurationNeeded + QE OutOfDate = OutOfDateConfigurationNeeded."""
    v = run(
        intel,
        {"qe_isv_svn": 3},
        levels=[TcbLevelSpec(SGX, 11, TDX, "ConfigurationNeeded", ("INTEL-SA-00615",))],
        qe_levels=[(4, "UpToDate"), (2, "OutOfDate")],
    )
    assert tcb_status_of(v) == "OutOfDateConfigurationNeeded"
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS, v.table()


def test_revoked_tcb_level_fails(intel: FakeIntel) -> None:
    v = run(intel, levels=[TcbLevelSpec(SGX, 11, TDX, "Revoked", ("INTEL-SA-00001",))])
    assert [c.name for c in v.failed] == ["tdx.tcb.status"]
    assert detail(v, "tdx.tcb.status").startswith("status=Revoked")
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS  # dcap-qvl: TCB status is invalid


def test_qe_identity_mismatch_and_old_qe(intel: FakeIntel) -> None:
    v = run(intel, {"qe_mrsigner": b"\x07" * 32})
    assert status(v, "tdx.qe.identity") is CheckStatus.FAIL and "MRSIGNER" in detail(v, "tdx.qe.identity")
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS
    old = run(intel, {"qe_isv_svn": 1})
    assert status(old, "tdx.qe.identity") is CheckStatus.FAIL and "below every" in detail(
        old, "tdx.qe.identity"
    )


def test_fmspc_mismatch(intel: FakeIntel) -> None:
    v = run(intel, fmspc=bytes.fromhex("90c06f000000"))
    assert status(v, "tdx.collateral.fmspc") is CheckStatus.FAIL
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS


def test_revoked_pck_leaf_and_ca() -> None:
    intel = FakeIntel(NOW)
    raw, leaf = intel.quote()
    intel.revoked_pck.append(leaf.serial_number)
    v = verify_tdx(
        parse_tdx_quote(raw),
        VerifyOptions(now=NOW, trusted_roots=(intel.root,)),
        collateral=intel.collateral(),
    )
    assert [c.name for c in v.failed] == ["tdx.pck.crl"]
    assert "revoked" in v.failed[0].detail
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS  # dcap-qvl rejects too
    intel.revoked_pck.clear()
    intel.revoked_by_root.append(intel.pck_ca.serial_number)
    v = verify_tdx(
        parse_tdx_quote(raw),
        VerifyOptions(now=NOW, trusted_roots=(intel.root,)),
        collateral=intel.collateral(),
    )
    assert "tdx.pck.crl" in {c.name for c in v.failed}
    assert "root CA CRL" in detail(v, "tdx.pck.crl")


def test_processor_ca_chain() -> None:
    intel = FakeIntel(NOW, ca_name="Intel SGX PCK Processor CA")
    raw, _ = intel.quote()
    q = parse_tdx_quote(raw)
    assert pck_ca_of(q) == "processor"
    v = verify_tdx(q, VerifyOptions(now=NOW, trusted_roots=(intel.root,)), collateral=intel.collateral())
    assert v.ok, v.table()


def test_wrong_intermediate_name_fails_chain() -> None:
    intel = FakeIntel(NOW, ca_name="Some Other CA")
    raw, _ = intel.quote()
    v = verify_tdx(parse_tdx_quote(raw), VerifyOptions(now=NOW, trusted_roots=(intel.root,)), collateral=None)
    assert status(v, "tdx.pck.chain") is CheckStatus.FAIL


def test_debug_td_is_left_to_policy(intel: FakeIntel) -> None:
    raw, _ = intel.quote(td_attributes=1 | 1 << 28)
    q = parse_tdx_quote(raw)
    v = verify_tdx(q, VerifyOptions(now=NOW, trusted_roots=(intel.root,)), collateral=intel.collateral())
    assert v.ok and tcb_status_of(v) == "UpToDate"
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.SKIP  # dcap-qvl refuses debug TDs itself
    p = validate_tdx(
        q, TdxPolicy(allow_any_measurement=True), tcb_status=tcb_status_of(v)
    )  # issue #11: MRTD/RTMRs unpinned
    assert [c.name for c in p.failed] == ["policy.debug"]


@pytest.mark.parametrize(("version", "body_type"), [(5, 2), (5, 3)])
def test_quote_v5_bodies(intel: FakeIntel, version: int, body_type: int) -> None:
    v = run(intel, {"version": version, "body_type": body_type})
    assert v.ok, v.table()
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS


def test_collateral_expired_and_not_yet_valid(intel: FakeIntel) -> None:
    raw, _ = intel.quote()
    c = intel.collateral()
    late = verify_tdx(
        parse_tdx_quote(raw),
        VerifyOptions(now=NOW + timedelta(days=40), trusted_roots=(intel.root,)),
        collateral=c,
    )
    assert {"tdx.collateral.tcb_info", "tdx.collateral.qe_identity", "tdx.pck.crl"} <= {
        x.name for x in late.failed
    }
    early = verify_tdx(
        parse_tdx_quote(raw),
        VerifyOptions(now=NOW - timedelta(days=3), trusted_roots=(intel.root,)),
        collateral=c,
    )
    assert "tdx.collateral.tcb_info" in {x.name for x in early.failed}


def test_tcb_signer_from_the_wrong_root(intel: FakeIntel) -> None:
    other = FakeIntel(NOW)
    raw, _ = intel.quote()
    c = other.collateral()
    v = verify_tdx(parse_tdx_quote(raw), VerifyOptions(now=NOW, trusted_roots=(intel.root,)), collateral=c)
    assert status(v, "tdx.collateral.tcb_info") is CheckStatus.FAIL
    assert status(v, "tdx.pck.crl") is CheckStatus.FAIL
    assert isinstance(c.tcb_info_issuer_chain[0], x509.Certificate)


RELAUNCH_LEVELS = [
    TcbLevelSpec(SGX, 11, TDX, "UpToDate"),
    TcbLevelSpec(SGX, 11, (2, 0, 2, *(0,) * 13), "OutOfDate"),
]
RELAUNCH_MODULE = [(6, "UpToDate", ()), (2, "OutOfDate", ("INTEL-SA-01036",))]


@pytest.mark.parametrize(
    ("launch", "current", "first_level", "expected"),
    [
        ("030103", "060103", "UpToDate", "TDRelaunchAdvised"),  # module updated in place to the latest
        ("030103", "060103", "ConfigurationNeeded", "TDRelaunchAdvisedConfigurationNeeded"),
        ("030003", "060003", "UpToDate", "TDRelaunchAdvised"),  # unversioned module: platform level moves
        ("030103", "030103", "UpToDate", "OutOfDate"),  # no update since launch
        ("030103", "060102", "UpToDate", "OutOfDate"),  # current still out of date
        ("060103", "060103", "UpToDate", "UpToDate"),
    ],
)
def test_td15_relaunch_advised(
    intel: FakeIntel, launch: str, current: str, first_level: str, expected: str
) -> None:
    levels = [TcbLevelSpec(SGX, 11, TDX, first_level), RELAUNCH_LEVELS[1]]
    v = run(
        intel,
        {
            "version": 5,
            "body_type": 3,
            "tee_tcb_svn": bytes.fromhex(launch) + bytes(13),
            "tee_tcb_svn2": bytes.fromhex(current) + bytes(13),
        },
        levels=levels,
        module_levels=RELAUNCH_MODULE,
    )
    assert tcb_status_of(v) == expected, v.table()
    assert "current TCB (tee_tcb_svn2)" in detail(v, "tdx.tcb.status")
    assert status(v, "tdx.tcb.dcap_qvl") is CheckStatus.PASS, v.table()


@pytest.mark.parametrize("current", ["060101", "000000"])
def test_td15_current_tcb_must_match_a_level(intel: FakeIntel, current: str) -> None:
    v = run(
        intel,
        {
            "version": 5,
            "body_type": 3,
            "tee_tcb_svn": bytes.fromhex("060103") + bytes(13),
            "tee_tcb_svn2": bytes.fromhex(current) + bytes(13),
        },
        levels=RELAUNCH_LEVELS,
        module_levels=RELAUNCH_MODULE,
    )
    assert [c.name for c in v.failed] == ["tdx.tcb.status"]
    assert detail(v, "tdx.tcb.status").startswith("current TEE TCB (tee_tcb_svn2)")
    assert "TEE_TCB_SVN2" in detail(v, "tdx.tcb.dcap_qvl")


def test_relaunch_statuses_are_policy_choices(intel: FakeIntel) -> None:
    raw, _ = intel.quote(version=5, body_type=3)
    q = parse_tdx_quote(raw)
    assert status(validate_tdx(q, TdxPolicy(), tcb_status="TDRelaunchAdvised"), "policy.tcb_status") is (
        CheckStatus.FAIL
    )
    allowing = TdxPolicy(allowed_tcb_statuses=frozenset({"UpToDate", "TDRelaunchAdvised"}))
    assert status(validate_tdx(q, allowing, tcb_status="TDRelaunchAdvised"), "policy.tcb_status") is (
        CheckStatus.PASS
    )
