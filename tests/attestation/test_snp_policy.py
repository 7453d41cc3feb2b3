"""SEV-SNP validate: report fields against a policy, on the real reports."""

from __future__ import annotations

import dataclasses
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from veil.attestation.errors import MalformedInputError
from veil.attestation.options import VerifyOptions
from veil.attestation.snp.certs import load_certificates
from veil.attestation.snp.report import (
    Product,
    SigningKey,
    SnpReport,
    TcbVersion,
    build_snp_report,
    parse_snp_report,
)
from veil.attestation.snp.validate import SnpPolicy, TcbRule, validate_snp
from veil.attestation.snp.verify import verify_snp
from veil.attestation.verdict import CheckStatus, Verdict


def load(evidence: Path, which: str) -> SnpReport:
    snp = evidence / "snp"
    if which == "gsg":
        return parse_snp_report((snp / "go-sev-guest/attestation.bin").read_bytes())
    if which == "virtee":
        return parse_snp_report(bytes.fromhex((snp / "virtee-sev/report_milan.hex").read_text().strip()))
    if which == "trustee":
        return parse_snp_report((snp / "trustee/test-report.bin").read_bytes())
    hcl = (snp / f"trustee-az-snp-vtpm/decoded/evidence-{which}.hcl.bin").read_bytes()
    return parse_snp_report(hcl[32 : 32 + 0x4A0])


def explore(**fields: object) -> SnpPolicy:
    """The production defaults with the measurement unpinned (the loud opt-out): these tests are
    about the other fields. Since issue #11 an unpinned measurement fails the default policy
    (test_default_policy_fails_closed_on_the_measurement)."""
    return SnpPolicy(allow_any_measurement=True, **fields)  # type: ignore[arg-type]


def failed(verdict: Verdict) -> set[str]:
    return {c.name for c in verdict.failed}


def status(verdict: Verdict, name: str) -> CheckStatus:
    check = verdict.get(name)
    assert check is not None, name
    return check.status


def test_go_sev_guest_report_fails_production_policy_only_on_debug(evidence_dir: Path) -> None:
    report = load(evidence_dir, "gsg")
    vcek = load_certificates((evidence_dir / "snp/go-sev-guest/vcek.testcer").read_bytes())
    verified = verify_snp(
        report, vcek, VerifyOptions(now=datetime(2022, 9, 24, 1, tzinfo=UTC)), product="Milan"
    )
    validated = validate_snp(report, explore(), product=Product.MILAN)
    combined = verified + validated
    assert failed(combined) == {"policy.debug"}, combined.table()
    assert "DEBUG=1" in (combined.get("policy.debug") or pytest.fail()).detail
    # Allowing debug (never the default) makes it pass.
    assert validate_snp(report, explore(allow_debug=True)).ok


def test_virtee_report_passes_production_policy(evidence_dir: Path) -> None:
    verdict = validate_snp(load(evidence_dir, "virtee"), explore())
    assert verdict.ok, verdict.table()
    assert status(verdict, "policy.measurement") is CheckStatus.SKIP
    assert "UNPINNED" in verdict.get("policy.measurement").detail  # type: ignore[union-attr]


def test_default_policy_fails_closed_on_the_measurement(evidence_dir: Path) -> None:
    """Issue #11: no allow-list is a failing check that says how to pin, never a skip; VMPL 0 by default."""
    report = load(evidence_dir, "virtee")
    verdict = validate_snp(report, SnpPolicy())
    assert failed(verdict) == {"policy.measurement"}
    detail = verdict.get("policy.measurement").detail  # type: ignore[union-attr]
    assert "release manifest" in detail and "allow_any_measurement" in detail
    assert validate_snp(report, SnpPolicy(measurements=frozenset({report.measurement}))).ok
    assert SnpPolicy().vmpls == {0}
    assert failed(
        validate_snp(
            dataclasses.replace(report, vmpl=1), SnpPolicy(measurements=frozenset({report.measurement}))
        )
    ) == {"policy.vmpl"}


def test_tcb_floor_per_product(evidence_dir: Path) -> None:
    report = load(evidence_dir, "virtee")  # Milan, reported bl3 tee0 snp8 ucode115
    floors = {
        Product.MILAN: TcbVersion.from_parts(bootloader=4, tee=0, snp=22, microcode=213),
        Product.GENOA: TcbVersion.from_parts(bootloader=0, tee=0, snp=0, microcode=0),
    }
    policy = explore(minimum_tcbs=floors)
    assert failed(validate_snp(report, policy, product=Product.MILAN)) == {"policy.min_tcb"}
    assert "no TCB floor" in validate_snp(report, policy).get("policy.min_tcb").detail  # type: ignore[union-attr]
    assert failed(validate_snp(report, policy)) == {"policy.min_tcb"}  # v2 report: product unknown
    low = {Product.MILAN: TcbVersion.from_parts(bootloader=3, tee=0, snp=8, microcode=115)}
    assert validate_snp(report, explore(minimum_tcbs=low), product=Product.MILAN).ok


def test_exact_matches(evidence_dir: Path) -> None:
    report = load(evidence_dir, "virtee")
    good = explore(
        report_data=report.report_data,
        host_data=report.host_data,
        measurements=frozenset({b"\0" * 48, report.measurement}),
        family_id=report.family_id,
        image_id=report.image_id,
        vmpls=frozenset({0}),
        products=frozenset({Product.MILAN}),
    )
    verdict = validate_snp(report, good, product=Product.MILAN)
    assert verdict.ok, verdict.table()
    for name in (
        "policy.report_data",
        "policy.host_data",
        "policy.measurement",
        "policy.vmpl",
        "policy.product",
    ):
        assert status(verdict, name) is CheckStatus.PASS

    def changed(**fields: object) -> SnpReport:
        return dataclasses.replace(report, **fields)  # type: ignore[arg-type]

    flip = bytes([report.report_data[0] ^ 1]) + report.report_data[1:]
    assert failed(validate_snp(changed(report_data=flip), good, product=Product.MILAN)) == {
        "policy.report_data"
    }
    other = bytes([report.measurement[0] ^ 1]) + report.measurement[1:]
    assert failed(validate_snp(changed(measurement=other), good, product=Product.MILAN)) == {
        "policy.measurement"
    }
    assert failed(validate_snp(changed(host_data=b"\x01" * 32), good, product=Product.MILAN)) == {
        "policy.host_data"
    }
    assert failed(validate_snp(changed(vmpl=1), good, product=Product.MILAN)) == {"policy.vmpl"}
    assert failed(validate_snp(report, good, product=Product.GENOA)) == {"policy.product"}
    assert failed(validate_snp(report, good)) == {"policy.product"}  # version 2: product unknown unless given
    assert validate_snp(report, good, product="Milan-B0").ok
    assert failed(validate_snp(report, good, product="Rome")) == {"policy.product"}


@pytest.mark.parametrize(
    ("bit", "check"),
    [(19, "policy.debug"), (18, "policy.migration_agent")],
)
def test_policy_bits(evidence_dir: Path, bit: int, check: str) -> None:
    report = load(evidence_dir, "virtee")
    flipped = dataclasses.replace(report, policy=report.policy | 1 << bit)
    assert failed(validate_snp(flipped, explore())) == {check}
    # The same bit set in the raw report's bytes is what the signature covers.
    assert struct.unpack_from("<Q", flipped.raw, 8)[0] >> bit & 1


def test_smt(evidence_dir: Path) -> None:
    milan = load(evidence_dir, "v0")  # platform SMT enabled
    genoa = load(evidence_dir, "genoa")  # platform SMT disabled
    strict = explore(require_smt_disabled=True)
    assert failed(validate_snp(milan, strict)) == {"policy.smt"}
    assert status(validate_snp(genoa, strict), "policy.smt") is CheckStatus.PASS
    assert status(validate_snp(milan, explore()), "policy.smt") is CheckStatus.SKIP


def test_minimum_tcb_and_tcb_rule(evidence_dir: Path) -> None:
    report = load(evidence_dir, "trustee")  # reported = committed = ucode 115, current ucode 206
    at = TcbVersion.from_parts(bootloader=3, tee=0, snp=8, microcode=115)
    above = TcbVersion.from_parts(bootloader=3, tee=0, snp=8, microcode=150)
    base = explore(permit_provisional_firmware=True)
    assert validate_snp(report, dataclasses.replace(base, minimum_tcb=at)).ok
    for rule in TcbRule:
        verdict = validate_snp(report, dataclasses.replace(base, minimum_tcb=above, tcb_rule=rule))
        assert failed(verdict) == {"policy.min_tcb"}, rule
    # A current-only upgrade does not satisfy the reported rule: the VCEK certifies ucode 115.
    low_current = dataclasses.replace(report, current_tcb=at)
    assert validate_snp(low_current, dataclasses.replace(base, minimum_tcb=at, tcb_rule=TcbRule.CURRENT)).ok
    turin_min = TcbVersion.from_parts(bootloader=0, tee=0, snp=0, microcode=0, fmc=0)
    assert "policy.min_tcb" in failed(validate_snp(report, dataclasses.replace(base, minimum_tcb=turin_min)))


def test_provisional_firmware(evidence_dir: Path) -> None:
    report = load(evidence_dir, "trustee")
    verdict = validate_snp(report, explore())
    assert failed(verdict) == {"policy.provisional_firmware"}
    assert validate_snp(report, explore(permit_provisional_firmware=True)).ok
    # committed above current is never consistent
    backwards = dataclasses.replace(
        report, current_tcb=TcbVersion.from_parts(bootloader=3, tee=0, snp=7, microcode=115)
    )
    assert "policy.tcb_order" in failed(validate_snp(backwards, explore(permit_provisional_firmware=True)))
    newer_fw = dataclasses.replace(
        report, current_tcb=report.committed_tcb, current_build=report.committed_build + 1
    )
    assert failed(validate_snp(newer_fw, explore())) == {"policy.provisional_firmware"}
    assert (
        status(
            validate_snp(report, explore(minimum_firmware=(1, 52, 4), permit_provisional_firmware=True)),
            "policy.min_firmware",
        )
        is CheckStatus.PASS
    )
    assert "policy.min_firmware" in failed(validate_snp(report, explore(minimum_firmware=(1, 55, 0))))


def test_id_block_and_author_key(evidence_dir: Path) -> None:
    with_id = load(evidence_dir, "trustee")
    without = load(evidence_dir, "virtee")
    base = explore(permit_provisional_firmware=True)
    assert (
        status(validate_snp(with_id, dataclasses.replace(base, require_id_block=True)), "policy.id_key")
        is CheckStatus.PASS
    )
    assert failed(validate_snp(without, dataclasses.replace(base, require_id_block=True))) == {
        "policy.id_key"
    }
    listed = dataclasses.replace(base, id_key_digests=frozenset({with_id.id_key_digest}))
    assert validate_snp(with_id, listed).ok
    assert failed(validate_snp(without, listed)) == {"policy.id_key"}
    author = dataclasses.replace(base, author_key_digests=frozenset({with_id.author_key_digest}))
    assert not with_id.author_key_en  # the digest alone, without AUTHOR_KEY_EN, is not an author key
    assert failed(validate_snp(with_id, author)) == {"policy.author_key"}
    enabled = dataclasses.replace(with_id, author_key_en=True)
    assert validate_snp(enabled, author).ok
    assert failed(validate_snp(with_id, dataclasses.replace(base, family_id=b"\x01" * 16))) == {
        "policy.family_id"
    }
    assert failed(validate_snp(with_id, dataclasses.replace(base, image_id=b"\x01" * 16))) == {
        "policy.image_id"
    }
    assert validate_snp(
        with_id, dataclasses.replace(base, image_id=with_id.image_id, family_id=with_id.family_id)
    ).ok


def test_guest_svn_and_signing_keys() -> None:
    report = build_snp_report(guest_svn=3, signing_key=SigningKey.VLEK)
    assert failed(validate_snp(report, explore(minimum_guest_svn=4))) == {"policy.guest_svn"}
    assert validate_snp(report, explore(minimum_guest_svn=3)).ok
    assert failed(validate_snp(report, explore(signing_keys=frozenset({SigningKey.VCEK})))) == {
        "policy.signing_key"
    }
    unsigned = build_snp_report(signing_key=SigningKey.NONE)
    assert "policy.signing_key" in failed(validate_snp(unsigned, explore()))


def test_policy_field_sizes_are_checked() -> None:
    for bad in (
        {"report_data": b"x" * 63},
        {"host_data": b"x" * 64},
        {"measurements": frozenset({b"x" * 32})},
        {"id_key_digests": frozenset({b"x"})},
        {"family_id": b"x"},
        {"vmpls": frozenset({4})},
    ):
        with pytest.raises(MalformedInputError):
            SnpPolicy(**bad)


def test_from_mapping(evidence_dir: Path) -> None:
    report = load(evidence_dir, "genoa")
    policy = SnpPolicy.from_mapping(
        {
            "measurements": [report.measurement.hex()],
            "report_data": report.report_data.hex(),
            "minimum_tcb": {"bootloader": 10, "tee": 0, "snp": 23, "microcode": 84},
            "tcb_rule": "current",
            "products": ["Genoa"],
            "signing_keys": ["vcek"],
            "vmpls": [0],
            "minimum_firmware": [1, 55, 0],
            "require_smt_disabled": True,
        }
    )
    assert policy.tcb_rule is TcbRule.CURRENT and policy.products == frozenset({Product.GENOA})
    verdict = validate_snp(report, policy)
    assert verdict.ok, verdict.table()
    for bad in (
        {"no_such_key": True},
        {"allow_debug": "yes"},
        {"report_data": "zz"},
        {"minimum_tcb": {"bootloader": 1}},
        {"tcb_rule": "sometimes"},
        {"products": ["Rome"]},
        {"signing_keys": ["ARK"]},
        {"minimum_firmware": [1, 2]},
    ):
        with pytest.raises(MalformedInputError):
            SnpPolicy.from_mapping(bad)
