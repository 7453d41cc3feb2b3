"""Azure SEV-SNP confidential VMs: HCL report, vTPM quote, and the SNP report inside, on real evidence."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.attestation.errors import MalformedInputError, UnsupportedError, VeilAttestationError
from veil.attestation.options import VerifyOptions
from veil.attestation.snp.azure import (
    AzureSnpEvidence,
    TpmQuote,
    parse_azure_evidence_json,
    parse_hcl_report,
    parse_runtime_data,
    parse_tpms_attest,
    tpms_attest_to_dict,
)
from veil.attestation.snp.azure_verify import verify_azure_snp
from veil.attestation.snp.certs import load_certificates
from veil.attestation.snp.report import Product
from veil.attestation.snp.validate import SnpPolicy, validate_snp
from veil.attestation.verdict import CheckStatus, Verdict

AZ = "snp/trustee-az-snp-vtpm"
NOW = datetime(
    2026, 1, 1, tzinfo=UTC
)  # inside every VCEK window (latest start 2025-01-24, earliest end 2030-05-02)
V2_NONCE = bytes.fromhex(
    "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9aa398f647caa2338748cd0fd9f5f819ef"
)
GENOA_NONCE = bytes.fromhex(
    "0218488bae25d2509232bf676f1a66a30d7372add909109b36016ef136f2938ca05475f8b46094de6b64270ea35d950f"
)
VECTORS = {"v0": b"challenge", "v1": b"challenge", "v2": V2_NONCE, "genoa": GENOA_NONCE}
AZURE_CHECKS = (
    "azure.hcl.parse",
    "azure.hcl.binding",
    "azure.runtime_data",
    "azure.tpm.parse",
    "azure.tpm.signature",
    "azure.tpm.nonce",
    "azure.tpm.pcr_digest",
)
SNP_CHECKS = ("snp.signature", "snp.chain.ark", "snp.chain.ask", "snp.chain.leaf", "snp.chain.validity")


def status(verdict: Verdict, name: str) -> CheckStatus:
    check = verdict.get(name)
    assert check is not None, f"{name} missing"
    return check.status


def failed(verdict: Verdict) -> set[str]:
    return {c.name for c in verdict.failed}


@functools.cache
def evidence(root: Path, name: str) -> AzureSnpEvidence:
    return parse_azure_evidence_json((root / AZ / f"evidence-{name}.json").read_bytes())


@functools.cache
def standalone(root: Path) -> AzureSnpEvidence:
    """hcl-report.bin + tpm-quote-v1.json + vcek.pem (VCEK, ASK, ARK)."""
    doc = json.loads((root / AZ / "tpm-quote-v1.json").read_text())
    quote = TpmQuote(
        message=bytes.fromhex(doc["message"]),
        signature=bytes.fromhex(doc["signature"]),
        pcrs=tuple(bytes.fromhex(p) for p in doc["pcrs"]),
    )
    return AzureSnpEvidence(
        hcl_report=(root / AZ / "hcl-report.bin").read_bytes(),
        quote=quote,
        certs=tuple(load_certificates((root / AZ / "vcek.pem").read_bytes())),
    )


def all_vectors(root: Path) -> list[tuple[str, AzureSnpEvidence, bytes]]:
    out = [(name, evidence(root, name), nonce) for name, nonce in VECTORS.items()]
    out.append(("hcl-report.bin", standalone(root), b"challenge"))
    return out


def test_every_azure_vector_passes(evidence_dir: Path) -> None:
    for name, ev, nonce in all_vectors(evidence_dir):
        report, verdict = verify_azure_snp(
            ev.hcl_report, ev.quote, ev.certs, VerifyOptions(now=NOW), nonce=nonce
        )
        assert report is not None
        assert verdict.ok, f"{name}\n{verdict.table()}"
        for check in (*AZURE_CHECKS, *SNP_CHECKS):
            assert status(verdict, check) is CheckStatus.PASS, (name, check)


def test_decoded_files_match_the_json(evidence_dir: Path) -> None:
    for name in VECTORS:
        ev = evidence(evidence_dir, name)
        assert ev.hcl_report == (evidence_dir / AZ / f"decoded/evidence-{name}.hcl.bin").read_bytes()
        quote = json.loads((evidence_dir / AZ / f"decoded/evidence-{name}.tpmquote.json").read_text())
        assert ev.quote.signature == bytes.fromhex(quote["signature"])
        assert ev.quote.message == bytes.fromhex(quote["message"])


def test_products_and_versions(evidence_dir: Path) -> None:
    genoa, _ = verify_azure_snp(
        evidence(evidence_dir, "genoa").hcl_report,
        evidence(evidence_dir, "genoa").quote,
        evidence(evidence_dir, "genoa").certs,
        VerifyOptions(now=NOW),
    )
    assert genoa is not None and genoa.version == 3 and genoa.product is Product.GENOA
    v0 = parse_hcl_report(evidence(evidence_dir, "v0").hcl_report)
    assert v0.version == 1 and v0.report_type == 2 and v0.report_data_hash_type == 1
    assert json.loads(json.dumps(v0.to_dict()))["report_data_hash_type"] == "SHA-256"
    attest = tpms_attest_to_dict(parse_tpms_attest(evidence(evidence_dir, "v0").quote.message))
    assert attest["extra_data"] == b"challenge".hex() and attest["pcr_select"] == [
        {"hash_alg": "0x000b", "pcrs": list(range(24))}
    ]
    runtime = parse_runtime_data(v0.variable_data)
    assert runtime.attestation_key.key_size == 2048
    assert runtime.vm_configuration.get("tpm-enabled") is True


def test_v2_user_data_carries_the_nonce(evidence_dir: Path) -> None:
    ev = evidence(evidence_dir, "v2")
    _, verdict = verify_azure_snp(
        ev.hcl_report, ev.quote, ev.certs, VerifyOptions(now=NOW), nonce=V2_NONCE, user_data=V2_NONCE
    )
    assert status(verdict, "azure.user_data") is CheckStatus.PASS
    _, bad = verify_azure_snp(
        ev.hcl_report, ev.quote, ev.certs, VerifyOptions(now=NOW), user_data=b"\x01" * 48
    )
    assert failed(bad) == {"azure.user_data"}


def test_the_snp_report_meets_a_production_policy(evidence_dir: Path) -> None:
    for name in VECTORS:
        ev = evidence(evidence_dir, name)
        report, _ = verify_azure_snp(ev.hcl_report, ev.quote, ev.certs, VerifyOptions(now=NOW))
        assert report is not None
        # Issue #11: production-strict but for the measurement, which the default now requires pinned.
        assert validate_snp(report, SnpPolicy(measurements=frozenset({report.measurement}))).ok, name
        assert {c.name for c in validate_snp(report, SnpPolicy()).failed} == {"policy.measurement"}, name


def test_outside_the_validity_window(evidence_dir: Path) -> None:
    for name, ev, nonce in all_vectors(evidence_dir):
        _, verdict = verify_azure_snp(
            ev.hcl_report,
            ev.quote,
            ev.certs,
            VerifyOptions(now=datetime(2060, 1, 1, tzinfo=UTC)),
            nonce=nonce,
        )
        assert failed(verdict) == {"snp.chain.validity"}, name


def test_wrong_nonce(evidence_dir: Path) -> None:
    ev = evidence(evidence_dir, "v1")
    _, verdict = verify_azure_snp(
        ev.hcl_report, ev.quote, ev.certs, VerifyOptions(now=NOW), nonce=b"challengf"
    )
    assert failed(verdict) == {"azure.tpm.nonce"}
    _, skipped = verify_azure_snp(ev.hcl_report, ev.quote, ev.certs, VerifyOptions(now=NOW))
    assert status(skipped, "azure.tpm.nonce") is CheckStatus.SKIP


def test_tampered_pcr_value(evidence_dir: Path) -> None:
    ev = evidence(evidence_dir, "v0")
    pcrs = list(ev.quote.pcrs)
    pcrs[7] = hashlib.sha256(b"another boot").digest()
    quote = dataclasses.replace(ev.quote, pcrs=tuple(pcrs))
    _, verdict = verify_azure_snp(ev.hcl_report, quote, ev.certs, VerifyOptions(now=NOW), nonce=b"challenge")
    assert failed(verdict) == {"azure.tpm.pcr_digest"}
    short = dataclasses.replace(ev.quote, pcrs=ev.quote.pcrs[:23])
    assert "azure.tpm.pcr_digest" in failed(
        verify_azure_snp(ev.hcl_report, short, ev.certs, VerifyOptions(now=NOW))[1]
    )


def test_tampered_quote(evidence_dir: Path) -> None:
    ev = evidence(evidence_dir, "v0")
    for offset in range(0, len(ev.quote.message), 7):
        message = bytearray(ev.quote.message)
        message[offset] ^= 0x01
        quote = dataclasses.replace(ev.quote, message=bytes(message))
        _, verdict = verify_azure_snp(
            ev.hcl_report, quote, ev.certs, VerifyOptions(now=NOW), nonce=b"challenge"
        )
        assert status(verdict, "azure.tpm.signature") is CheckStatus.FAIL, offset
    signature = bytearray(ev.quote.signature)
    signature[-1] ^= 1
    quote = dataclasses.replace(ev.quote, signature=bytes(signature))
    assert failed(verify_azure_snp(ev.hcl_report, quote, ev.certs, VerifyOptions(now=NOW))[1]) == {
        "azure.tpm.signature"
    }
    # Another vector's quote is signed by another attestation key.
    other = evidence(evidence_dir, "v2").quote
    assert "azure.tpm.signature" in failed(
        verify_azure_snp(ev.hcl_report, other, ev.certs, VerifyOptions(now=NOW))[1]
    )


def test_tampered_variable_data_breaks_the_binding(evidence_dir: Path) -> None:
    ev = evidence(evidence_dir, "v1")
    hcl = parse_hcl_report(ev.hcl_report)
    raw = bytearray(ev.hcl_report)
    # Swap the attestation key's first base64url digit for another: still valid JSON and a valid key.
    start = 32 + 1184 + 20 + hcl.variable_data.index(b'"n":"') + 5
    raw[start] = ord("A") if raw[start] != ord("A") else ord("B")
    _, verdict = verify_azure_snp(bytes(raw), ev.quote, ev.certs, VerifyOptions(now=NOW), nonce=b"challenge")
    assert {"azure.hcl.binding", "azure.tpm.signature"} <= failed(verdict)


def test_tampered_snp_report_in_the_hcl(evidence_dir: Path) -> None:
    ev = evidence(evidence_dir, "genoa")
    for offset in (0x10, 0x90, 0x180, 0x29F):
        raw = bytearray(ev.hcl_report)
        raw[32 + offset] ^= 0x04
        _, verdict = verify_azure_snp(bytes(raw), ev.quote, ev.certs, VerifyOptions(now=NOW))
        assert status(verdict, "snp.signature") is CheckStatus.FAIL, hex(offset)
    report_data = bytearray(ev.hcl_report)
    report_data[32 + 0x50] ^= 1
    _, verdict = verify_azure_snp(bytes(report_data), ev.quote, ev.certs, VerifyOptions(now=NOW))
    assert {"snp.signature", "azure.hcl.binding"} <= failed(verdict)


def test_a_foreign_vcek_fails(evidence_dir: Path) -> None:
    ev = evidence(evidence_dir, "v0")
    _, verdict = verify_azure_snp(
        ev.hcl_report, ev.quote, evidence(evidence_dir, "genoa").certs, VerifyOptions(now=NOW)
    )
    assert "snp.signature" in failed(verdict)


def _set(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


def test_hcl_parse_errors(evidence_dir: Path) -> None:
    raw = evidence(evidence_dir, "v0").hcl_report
    cases: list[tuple[bytes, type[Exception]]] = [
        (b"XCLA" + raw[4:], MalformedInputError),
        (raw[:1000], MalformedInputError),
        (_set(raw, 20, b"\x01"), MalformedInputError),  # reserved header bytes
        (_set(raw, 32 + 1184 + 8, struct.pack("<I", 4)), UnsupportedError),  # claims TDX: SNP bytes then
        (_set(raw, 32 + 1184 + 8, struct.pack("<I", 3)), UnsupportedError),  # unknown report type
        (_set(raw, 32 + 1184 + 12, struct.pack("<I", 9)), UnsupportedError),  # unknown hash
        (_set(raw, 32 + 1184 + 16, struct.pack("<I", 5000)), MalformedInputError),  # var data size
        (_set(raw, len(raw) - 1, b"\x01"), MalformedInputError),  # trailing garbage
        (_set(raw, 8, struct.pack("<I", 2000)), MalformedInputError),  # report_size
    ]
    for data, error in cases[:4]:
        with pytest.raises(error):
            parsed = parse_hcl_report(data)
            parsed.snp_report_bytes  # noqa: B018
    for data, error in cases[4:]:
        with pytest.raises(error):
            parse_hcl_report(data)
        _, verdict = verify_azure_snp(data, evidence(evidence_dir, "v0").quote, [], VerifyOptions(now=NOW))
        assert failed(verdict) == {"azure.hcl.parse"}


def test_runtime_data_errors() -> None:
    good_key = {"kid": "HCLAkPub", "kty": "RSA", "e": "AQAB", "n": "x" * 342}
    for bad in (
        b"not json",
        b"[]",
        json.dumps({"keys": []}).encode(),
        json.dumps({"keys": [good_key, good_key]}).encode(),
        json.dumps({"keys": [{**good_key, "kty": "EC"}]}).encode(),
        json.dumps({"keys": [{**good_key, "n": "AQAB"}]}).encode(),  # tiny modulus
        json.dumps({"keys": [{**good_key, "e": "Ag"}]}).encode(),  # even exponent
        json.dumps({"keys": [{**good_key, "n": 5}]}).encode(),
        json.dumps({"keys": [good_key], "user-data": "xyz"}).encode(),
        json.dumps({"keys": [good_key], "vm-configuration": []}).encode(),
    ):
        with pytest.raises(MalformedInputError):
            parse_runtime_data(bad)
    assert parse_runtime_data(json.dumps({"keys": [good_key]}).encode()).user_data is None


def test_tpms_attest_fields_and_errors(evidence_dir: Path) -> None:
    quote = evidence(evidence_dir, "v2").quote.message
    attest = parse_tpms_attest(quote)
    assert attest.extra_data == V2_NONCE
    assert len(attest.pcr_select) == 1 and attest.pcr_select[0].hash_alg == 0x000B
    assert attest.pcr_select[0].pcrs == tuple(range(24))
    assert len(attest.pcr_digest) == 32 and len(attest.qualified_signer) == 34
    with pytest.raises(MalformedInputError):
        parse_tpms_attest(b"\x00" + quote[1:])
    with pytest.raises(UnsupportedError):
        parse_tpms_attest(quote[:4] + b"\x80\x14" + quote[6:])  # TPM_ST_ATTEST_CERTIFY
    with pytest.raises(MalformedInputError):
        parse_tpms_attest(quote + b"\x00")
    with pytest.raises(MalformedInputError):
        parse_tpms_attest(quote[:-1])


def test_evidence_json_errors(evidence_dir: Path) -> None:
    doc = json.loads((evidence_dir / AZ / "evidence-v1.json").read_text())
    mutations: tuple[Callable[[dict[str, Any]], object], ...] = (
        lambda d: d.update(version=7),
        lambda d: d.update(version=True),
        lambda d: d.pop("vcek"),
        lambda d: d.update(vcek=5),
        lambda d: d.update(hcl_report="%%%"),
        lambda d: d["tpm_quote"].update(pcrs="x"),
        lambda d: d["tpm_quote"].update(message=[1, 256]),
        lambda d: d["tpm_quote"].update(signature="zz"),
    )
    for mutate in mutations:
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        with pytest.raises(MalformedInputError):
            parse_azure_evidence_json(json.dumps(bad).encode())
    for blob in (b"", b"[]", b"\xff", b"{" * 100000):
        with pytest.raises(MalformedInputError):
            parse_azure_evidence_json(blob)


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(
    st.sampled_from(list(VECTORS)),
    st.lists(st.tuples(st.integers(0, 2599), st.integers(1, 255)), max_size=6),
    st.integers(0, 2600),
)
def test_fuzz_hcl_report(evidence_dir: Path, name: str, flips: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(evidence(evidence_dir, name).hcl_report)
    for offset, mask in flips:
        raw[offset] ^= mask
    for data in (bytes(raw), bytes(raw[:cut])):
        with contextlib.suppress(VeilAttestationError):
            parse_runtime_data(parse_hcl_report(data).variable_data)
        ev = evidence(evidence_dir, name)
        verify_azure_snp(
            data, ev.quote, ev.certs, VerifyOptions(now=NOW)
        )  # never raises: failures are checks


@_FUZZ
@given(
    st.sampled_from(list(VECTORS)),
    st.lists(st.tuples(st.integers(0, 160), st.integers(1, 255)), max_size=4),
    st.integers(0, 161),
)
def test_fuzz_tpms_attest(evidence_dir: Path, name: str, flips: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(evidence(evidence_dir, name).quote.message)
    for offset, mask in flips:
        if offset < len(raw):
            raw[offset] ^= mask
    for data in (bytes(raw), bytes(raw[:cut])):
        with contextlib.suppress(VeilAttestationError):
            parse_tpms_attest(data)


@_FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_inputs(data: bytes) -> None:
    for parse in (parse_tpms_attest, parse_hcl_report, parse_runtime_data, parse_azure_evidence_json):
        with contextlib.suppress(VeilAttestationError):
            parse(data)


@_FUZZ
@given(st.sampled_from(["v0", "v1", "v2", "genoa"]), st.integers(0, 10_000), st.integers(0, 255))
def test_fuzz_evidence_json(evidence_dir: Path, name: str, offset: int, value: int) -> None:
    raw = bytearray((evidence_dir / AZ / f"evidence-{name}.json").read_bytes())
    raw[offset % len(raw)] = value
    with contextlib.suppress(VeilAttestationError):
        parse_azure_evidence_json(bytes(raw))


def test_unpaired_quote_files_do_not_verify(evidence_dir: Path) -> None:
    # tpm-quote.msg / .sig ship beside hcl-report.bin but were made by another attestation key.
    message = (evidence_dir / AZ / "tpm-quote.msg").read_bytes()
    assert parse_tpms_attest(message).extra_data == b"challenge"
    ev = standalone(evidence_dir)
    quote = TpmQuote(message, (evidence_dir / AZ / "tpm-quote.sig").read_bytes(), ev.quote.pcrs)
    _, verdict = verify_azure_snp(ev.hcl_report, quote, ev.certs, VerifyOptions(now=NOW), nonce=b"challenge")
    assert status(verdict, "azure.tpm.signature") is CheckStatus.FAIL
    assert not verdict.ok
