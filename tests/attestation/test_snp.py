"""SEV-SNP report parsing and serialising, on the real reports in shared/evidence."""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.attestation.errors import MalformedInputError, UnsupportedError, VeilAttestationError
from veil.attestation.snp.report import (
    REPORT_SIZE,
    Product,
    SigningKey,
    SnpReport,
    TcbVersion,
    build_snp_report,
    parse_snp_report,
    product_from_cpuid,
)


@functools.cache
def real_reports(evidence: Path) -> dict[str, bytes]:
    snp = evidence / "snp"
    reports = {
        "go-sev-guest": (snp / "go-sev-guest/attestation.bin").read_bytes(),
        "virtee": bytes.fromhex((snp / "virtee-sev/report_milan.hex").read_text().strip()),
        "trustee": (snp / "trustee/test-report.bin").read_bytes(),
        "azure-hcl": (snp / "trustee-az-snp-vtpm/hcl-report.bin").read_bytes()[32 : 32 + REPORT_SIZE],
    }
    for name in ("v0", "v1", "v2", "genoa"):
        hcl = (snp / f"trustee-az-snp-vtpm/decoded/evidence-{name}.hcl.bin").read_bytes()
        reports[f"azure-{name}"] = hcl[32 : 32 + REPORT_SIZE]
    return reports


@pytest.fixture(scope="module")
def reports(evidence_dir: Path) -> dict[str, bytes]:
    return real_reports(evidence_dir)


def test_every_real_report_parses_and_round_trips(reports: dict[str, bytes]) -> None:
    for name, raw in reports.items():
        report = parse_snp_report(raw)
        assert report.to_bytes() == raw, name
        assert report.signed_bytes() == raw[:0x2A0]
        assert report.signature_algo == 1
        assert parse_snp_report(report.to_bytes()) == report


def test_go_sev_guest_report_fields(reports: dict[str, bytes]) -> None:
    r = parse_snp_report(reports["go-sev-guest"])
    assert r.version == 2
    assert r.policy == 0xB0000
    assert r.guest_policy.debug and r.guest_policy.smt and not r.guest_policy.migrate_ma
    assert r.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
    assert r.vmpl == 0
    assert r.signing_key == SigningKey.VCEK and not r.mask_chip_key and not r.author_key_en
    assert r.cpuid_fam_id is None and r.product is None  # version 2: no CPUID
    assert r.launch_mit_vector is None
    assert r.reported_tcb == TcbVersion.from_parts(bootloader=2, tee=0, snp=5, microcode=68)
    assert r.reported_tcb.raw == 0x4405000000000002
    assert r.signature_r == reports["go-sev-guest"][0x2A0:0x2E8]
    assert r.platform.smt_en


def test_virtee_and_trustee_fields(reports: dict[str, bytes]) -> None:
    v = parse_snp_report(reports["virtee"])
    assert v.policy == 0x30000 and not v.guest_policy.debug
    assert (v.reported_tcb.bootloader, v.reported_tcb.tee, v.reported_tcb.snp, v.reported_tcb.microcode) == (
        3,
        0,
        8,
        115,
    )
    t = parse_snp_report(reports["trustee"])
    assert t.policy == 0x3001F
    assert any(t.id_key_digest) and any(t.family_id) and any(t.image_id)
    assert t.current_tcb.microcode == 206 and t.committed_tcb.microcode == 115
    assert t.firmware_current == t.firmware_committed


def test_v3_reports_name_their_product(reports: dict[str, bytes]) -> None:
    genoa = parse_snp_report(reports["azure-genoa"])
    assert genoa.version == 3
    assert (genoa.cpuid_fam_id, genoa.cpuid_mod_id, genoa.cpuid_step) == (0x19, 0x11, 0x01)
    assert genoa.product is Product.GENOA
    milan = parse_snp_report(reports["azure-v0"])
    assert milan.product is Product.MILAN


def test_product_from_cpuid() -> None:
    assert product_from_cpuid(0x19, 0x01) is Product.MILAN
    assert product_from_cpuid(0x19, 0x11) is Product.GENOA
    assert product_from_cpuid(0x19, 0xA0) is Product.GENOA
    assert product_from_cpuid(0x1A, 0x02) is Product.TURIN
    assert product_from_cpuid(0x19, 0x21) is None
    assert product_from_cpuid(0x17, 0x31) is None
    assert Product.from_name("Milan-B0") is Product.MILAN
    assert Product.from_name("turin") is Product.TURIN
    with pytest.raises(UnsupportedError):
        Product.from_name("Rome")


def test_turin_tcb_layout() -> None:
    tcb = TcbVersion.from_parts(bootloader=1, tee=2, snp=3, microcode=4, fmc=5)
    assert tcb.raw.to_bytes(8, "little") == bytes([5, 1, 2, 3, 0, 0, 0, 4])
    assert TcbVersion.from_raw(tcb.raw, turin=True) == tcb
    milan = TcbVersion.from_raw(tcb.raw, turin=False)
    assert (milan.bootloader, milan.tee, milan.snp, milan.microcode, milan.fmc) == (5, 1, 0, 4, None)
    assert not milan.at_least(TcbVersion.from_parts(bootloader=0, tee=0, snp=0, microcode=0, fmc=0))
    assert tcb.at_least(TcbVersion.from_parts(bootloader=1, tee=2, snp=3, microcode=4, fmc=5))
    assert not tcb.at_least(TcbVersion.from_parts(bootloader=1, tee=2, snp=3, microcode=4, fmc=6))
    with pytest.raises(MalformedInputError):
        TcbVersion(bootloader=1, tee=0, snp=0, microcode=0, fmc=None, raw=0)
    with pytest.raises(MalformedInputError):
        TcbVersion.from_parts(bootloader=256, tee=0, snp=0, microcode=0)


@pytest.mark.parametrize("version", [2, 3, 4, 5])
@pytest.mark.parametrize("product", list(Product))
def test_builder_round_trips(version: int, product: Product) -> None:
    fmc = 7 if product is Product.TURIN and version >= 3 else None
    tcb = TcbVersion.from_parts(bootloader=3, tee=1, snp=20, microcode=200, fmc=fmc)
    report = build_snp_report(
        version=version,
        product=product,
        reported_tcb=tcb,
        report_data=bytes(range(64)),
        measurement=b"\x11" * 48,
        chip_id=b"\x22" * 64,
        mit_vectors=(3, 4),
    )
    parsed = parse_snp_report(report.to_bytes())
    assert parsed == report
    assert parsed.reported_tcb == tcb
    assert parsed.product is (product if version >= 3 else None)
    assert (parsed.launch_mit_vector, parsed.current_mit_vector) == ((3, 4) if version >= 5 else (None, None))


def test_replace_keeps_raw_in_step(reports: dict[str, bytes]) -> None:
    r = parse_snp_report(reports["virtee"])
    changed = dataclasses.replace(r, report_data=b"\xaa" * 64)
    assert changed.raw[0x50:0x90] == b"\xaa" * 64
    assert changed.raw[:0x50] == r.raw[:0x50]
    signed = r.with_signature(5, 7)
    assert signed.raw[0x2A0] == 5 and signed.raw[0x2E8] == 7
    with pytest.raises(MalformedInputError):
        dataclasses.replace(r, measurement=b"short")


def _set(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


@pytest.mark.parametrize(
    ("offset", "value", "error"),
    [
        (0x00, struct.pack("<I", 1), UnsupportedError),  # version 1
        (0x00, struct.pack("<I", 6), UnsupportedError),  # version 6
        (0x34, struct.pack("<I", 2), UnsupportedError),  # unknown signature algorithm
        (0x08, struct.pack("<Q", 0x10000), MalformedInputError),  # policy bit 17 must be 1
        (0x08, struct.pack("<Q", 0x30000 | 1 << 40), MalformedInputError),  # reserved policy bit
        (0x48, struct.pack("<I", 1 << 5), MalformedInputError),  # reserved signer-info bit
        (0x48, struct.pack("<I", 2 << 2), MalformedInputError),  # reserved SIGNING_KEY value
        (0x4C, b"\x01", MalformedInputError),
        (0x188, b"\x19", MalformedInputError),  # CPUID bytes are reserved in version 2
        (0x1EB, b"\x01", MalformedInputError),
        (0x1F8, b"\x01", MalformedInputError),  # mitigation vector is reserved before version 5
        (0x250, b"\x01", MalformedInputError),
        (0x400, b"\x01", MalformedInputError),  # after r and s
    ],
)
def test_strict_parsing(reports: dict[str, bytes], offset: int, value: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_snp_report(_set(reports["virtee"], offset, value))


def test_wrong_lengths(reports: dict[str, bytes]) -> None:
    raw = reports["virtee"]
    for bad in (b"", raw[:-1], raw + b"\0", raw[:0x2A0]):
        with pytest.raises(MalformedInputError):
            parse_snp_report(bad)


def test_signing_key_none_parses(reports: dict[str, bytes]) -> None:
    report = parse_snp_report(_set(reports["virtee"], 0x48, struct.pack("<I", 7 << 2)))
    assert report.signing_key == SigningKey.NONE


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _parse_or_typed_error(data: bytes) -> SnpReport | None:
    try:
        return parse_snp_report(data)
    except VeilAttestationError:
        return None


@_FUZZ
@given(st.binary(max_size=REPORT_SIZE + 8))
def test_fuzz_random_bytes(data: bytes) -> None:
    _parse_or_typed_error(data)


@_FUZZ
@given(
    st.sampled_from(["go-sev-guest", "virtee", "trustee", "azure-genoa"]),
    st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(1, 255)), min_size=1, max_size=8),
    st.integers(0, REPORT_SIZE),
)
def test_fuzz_mutations_and_truncations(
    evidence_dir: Path, which: str, flips: list[tuple[int, int]], cut: int
) -> None:
    raw = bytearray(real_reports(evidence_dir)[which])
    for offset, mask in flips:
        raw[offset] ^= mask
    report = _parse_or_typed_error(bytes(raw))
    if report is not None:
        assert report.to_bytes() == bytes(raw)
    _parse_or_typed_error(bytes(raw[:cut]))


def test_to_dict_names_every_field(reports: dict[str, bytes]) -> None:
    report = parse_snp_report(reports["azure-genoa"])
    fields = report.to_dict()
    json.dumps(fields)  # JSON-ready
    assert {f.name for f in dataclasses.fields(report)} - {"raw"} <= set(fields)
    assert fields["product"] == "Genoa" and fields["signing_key_name"] == "VCEK"
    assert fields["reported_tcb"] == {
        "bootloader": 10,
        "tee": 0,
        "snp": 23,
        "microcode": 84,
        "raw": "0x541700000000000a",
    }
    assert fields["guest_policy_bits"]["smt"] is True  # type: ignore[index]
    assert fields["measurement"] == report.measurement.hex()
