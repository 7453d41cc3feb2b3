"""Issue #11: signed release manifests and the fail-closed default policy, on genuine (fake-AMD) chains."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from veil.attestation.binding import EVIDENCE_FORMAT_VERSION, report_data
from veil.attestation.bundle import verify_evidence
from veil.attestation.errors import PolicyError, ReleaseError
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import PlatformName, Policy, TrustedRoots
from veil.attestation.release import (
    PlatformRelease,
    Release,
    load_publisher_key,
    public_key_pem,
    sign_release,
    verify_release,
)
from veil.attestation.snp.report import TcbVersion
from veil.attestation.testing.ocsp import amd_crl
from veil.attestation.testing.pki import pem
from veil.attestation.testing.snp import FakeAmd, make_fake_amd, signed_report
from veil.enclave.keys import EnclaveIdentity, create_identity
from veil.proto.v1 import evidence_pb2

NOW = datetime(2026, 6, 1, tzinfo=UTC)
BUILD = hashlib.sha256(b"veil build").digest()
MODEL = hashlib.sha256(b"weights").digest()
DATA_POLICY = hashlib.sha256(b"data policy").digest()
TCB = TcbVersion.from_parts(bootloader=4, tee=0, snp=22, microcode=213)  # meets the shipped Milan floor


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return make_fake_amd("Milan")


@pytest.fixture(scope="module")
def publisher() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _roots(amd: FakeAmd) -> TrustedRoots:
    return TrustedRoots(amd=(amd.ark,), nvidia=TrustedRoots.vendor().nvidia)


def _identity() -> EnclaveIdentity:
    return create_identity(
        model_digest=MODEL,
        engine_version="test",
        data_policy_digest=DATA_POLICY,
        server_build_digest=BUILD,
        simulated=False,
    )


def _bundle(amd: FakeAmd, nonce: bytes, measurement: bytes, *, vmpl: int = 0) -> evidence_pb2.Evidence:
    """Genuine-chain SEV-SNP evidence: a fake-AMD VCEK signs a report whose report_data is correct."""
    ident = _identity()
    key, vcek = amd.leaf(TCB)
    report = signed_report(
        key,
        reported_tcb=TCB,
        current_tcb=TCB,
        committed_tcb=TCB,
        report_data=report_data(nonce, ident.claims_bytes, []),
        measurement=measurement,
        vmpl=vmpl,
        chip_id=bytes(range(64)),
    )
    # the ARK-signed CRL an enclave staples (the default policy requires one)
    crl = amd_crl(
        amd.ark, amd.ark_key, last_update=NOW - timedelta(days=1), next_update=NOW + timedelta(days=7)
    )
    return evidence_pb2.Evidence(
        format_version=EVIDENCE_FORMAT_VERSION,
        platform=evidence_pb2.PLATFORM_SEV_SNP,
        cpu_report=report.to_bytes(),
        cpu_cert_chain=pem(vcek, amd.ask, amd.ark),
        enclave_key=ident.public_key.to_proto(),
        claims=ident.claims_bytes,
        nonce=nonce,
        collateral=evidence_pb2.Collateral(amd=evidence_pb2.AmdCollateral(crl=crl)),
    )


def _release(measurement: bytes, platform: PlatformName = PlatformName.SEV_SNP) -> Release:
    pins = PlatformRelease(
        measurements=frozenset({measurement}),
        model_digests=frozenset({MODEL}),
        data_policy_digest=DATA_POLICY,
        policy_test_report_digest=hashlib.sha256(b"report").digest(),
        gpu_count=0,
    )
    return Release("v1.2.3", BUILD, {platform: pins})


def _failed(result: object) -> set[str]:
    return {c.name for c in result.verdict.failed}  # type: ignore[attr-defined]


def test_default_policy_refuses_an_unpinned_genuine_report_and_a_manifest_pins_it(
    amd: FakeAmd, publisher: Ed25519PrivateKey
) -> None:
    nonce = secrets.token_bytes(32)
    measurement = secrets.token_bytes(48)  # arbitrary code: a host operator's own VM
    ev = _bundle(amd, nonce, measurement)
    default = Policy(trusted_roots=_roots(amd))
    result = verify_evidence(ev, VerifyOptions(now=NOW), policy=default, nonce=nonce)
    assert _failed(result) == {
        "policy.measurement",
        "policy.build_digest",
        "policy.model_digest",
        "policy.data_policy_digest",
    }, result.verdict.table()
    assert "release manifest" in result.verdict.get("policy.measurement").detail  # type: ignore[union-attr]
    for name in ("snp.signature", "binding.report_data", "policy.vmpl", "policy.min_tcb"):
        assert result.verdict.get(name).status.value == "pass", name  # type: ignore[union-attr]

    manifest = sign_release(_release(measurement), publisher)
    pinned = Policy.from_release(
        manifest, publisher_key=public_key_pem(publisher.public_key()), trusted_roots=_roots(amd)
    )
    result = verify_evidence(ev, VerifyOptions(now=NOW), policy=pinned, nonce=nonce)
    assert result.ok, result.verdict.table()
    for name in ("policy.measurement", "policy.release", "policy.build_digest", "policy.model_digest"):
        assert result.verdict.get(name).status.value == "pass", name  # type: ignore[union-attr]
    # another measurement under the same manifest is refused
    other = _bundle(amd, nonce, secrets.token_bytes(48))
    assert _failed(verify_evidence(other, VerifyOptions(now=NOW), policy=pinned, nonce=nonce)) == {
        "policy.measurement"
    }


def test_vmpl_1_is_refused_by_default(amd: FakeAmd, publisher: Ed25519PrivateKey) -> None:
    nonce = secrets.token_bytes(32)
    measurement = secrets.token_bytes(48)
    pinned = Policy.from_release(
        sign_release(_release(measurement), publisher),
        publisher_key=publisher.public_key(),
        trusted_roots=_roots(amd),
    )
    result = verify_evidence(
        _bundle(amd, nonce, measurement, vmpl=1), VerifyOptions(now=NOW), policy=pinned, nonce=nonce
    )
    assert _failed(result) == {"policy.vmpl"}, result.verdict.table()


def test_opt_out_is_explicit_and_loud(amd: FakeAmd, caplog: pytest.LogCaptureFixture) -> None:
    nonce = secrets.token_bytes(32)
    with caplog.at_level(logging.WARNING, logger="veil.attestation.policy"):
        explore = Policy(trusted_roots=_roots(amd), allow_any_measurement=True)
    assert "ACCEPTING ANY CODE IDENTITY" in caplog.text
    result = verify_evidence(
        _bundle(amd, nonce, bytes(48)), VerifyOptions(now=NOW), policy=explore, nonce=nonce
    )
    assert result.ok, result.verdict.table()
    check = result.verdict.get("policy.measurement")
    assert check is not None and check.status.value == "skip" and "UNPINNED" in check.detail


def test_bad_signature_unknown_key_and_unnamed_platform_are_refused(publisher: Ed25519PrivateKey) -> None:
    manifest = sign_release(_release(bytes(48)), publisher)
    assert verify_release(manifest, publisher.public_key()).name == "v1.2.3"
    # 1. a bad signature: the payload changed after signing
    doc = json.loads(manifest)
    statement = json.loads(base64.b64decode(doc["payload"]))
    statement["predicate"]["platforms"]["SEV_SNP"]["measurements"] = ["11" * 48]
    doc["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(ReleaseError, match="bad signature") as bad:
        Policy.from_release(json.dumps(doc).encode(), publisher_key=publisher.public_key())
    assert bad.value.check == "policy.release"
    # 2. an unknown publisher key
    with pytest.raises(ReleaseError, match="unknown publisher key"):
        Policy.from_release(manifest, publisher_key=Ed25519PrivateKey.generate().public_key())
    # 3. a platform the manifest does not name
    with pytest.raises(ReleaseError, match="does not name platform TDX"):
        Policy.from_release(manifest, publisher_key=publisher.public_key(), platform="TDX")
    assert issubclass(ReleaseError, PolicyError)
    for garbage in (b"not json", b"{}", json.dumps({**doc, "payloadType": "text/plain"}).encode()):
        with pytest.raises(ReleaseError):
            verify_release(garbage, publisher.public_key())


def test_evidence_of_a_platform_the_release_does_not_name_fails_named_checks(
    amd: FakeAmd, publisher: Ed25519PrivateKey
) -> None:
    nonce = secrets.token_bytes(32)
    measurement = secrets.token_bytes(48)
    tdx_only = Policy.from_release(
        sign_release(_release(measurement, PlatformName.TDX), publisher),
        publisher_key=publisher.public_key(),
        trusted_roots=_roots(amd),
    )
    result = verify_evidence(
        _bundle(amd, nonce, measurement), VerifyOptions(now=NOW), policy=tdx_only, nonce=nonce
    )
    assert {"policy.release", "policy.platform"} <= _failed(result)
    assert "does not name platform SEV_SNP" in result.verdict.get("policy.release").detail  # type: ignore[union-attr]


def test_manifest_round_trip_and_strict_parsing(publisher: Ed25519PrivateKey) -> None:
    pins = PlatformRelease(
        measurements=frozenset({b"\x01" * 48}),
        host_data=b"\x02" * 32,
        rtmr=(frozenset({b"\x03" * 48}), frozenset(), frozenset({b"\x04" * 48}), frozenset()),
        azure_pcrs={4: b"\x05" * 32, 11: b"\x06" * 32},
        model_digests=frozenset({MODEL}),
        data_policy_digest=DATA_POLICY,
        policy_test_report_digest=b"\x07" * 32,
        gpu_count=8,
        gpu_driver_versions=frozenset({"550.90.07"}),
        gpu_vbios_versions=frozenset({"96.00.9F.00.04"}),
        snp_tcb_floor={"Genoa": {"bootloader": 10, "tee": 0, "snp": 23, "microcode": 84}},
        tdx_statuses=frozenset({"UpToDate"}),
    )
    release = Release("r", BUILD, {PlatformName.AZURE_SEV_SNP: pins, PlatformName.TDX: PlatformRelease()})
    back = verify_release(sign_release(release, publisher), public_key_pem(publisher.public_key()))
    assert back.platforms == release.platforms and back.build_digest == BUILD and back.publisher_key_id
    policy = Policy.from_release(
        sign_release(release, publisher), publisher_key=publisher.public_key(), platform="AZURE_SEV_SNP"
    )
    assert policy.platforms == {PlatformName.AZURE_SEV_SNP}
    assert policy.azure_pcrs == {4: b"\x05" * 32, 11: b"\x06" * 32} and policy.host_data == b"\x02" * 32
    assert policy.gpu_count == 8 and policy.gpu.driver_versions == {"550.90.07"}
    assert policy.tcb_floor == {"Genoa": {"bootloader": 10, "tee": 0, "snp": 23, "microcode": 84}}
    assert policy.build_digests == {BUILD}
    # a field this version does not know is refused, never ignored
    statement = release.statement()
    statement["predicate"]["platforms"]["TDX"]["mrsigner"] = []
    with pytest.raises(ReleaseError, match="unknown field"):
        Release.from_statement(statement)


def test_publisher_key_forms(publisher: Ed25519PrivateKey, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = publisher.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    for form in (raw, raw.hex(), raw.hex().encode() + b"\n", public_key_pem(publisher.public_key())):
        assert load_publisher_key(form).public_bytes(Encoding.Raw, PublicFormat.Raw) == raw
    with pytest.raises(ReleaseError):
        load_publisher_key(b"short")


def test_shipped_tcb_floor_is_dated_and_applies_per_product() -> None:
    from veil.attestation.tcb_floor import shipped_tcb_floor

    floor = shipped_tcb_floor()
    assert floor.set_on.year >= 2026 and set(floor.snp) == {"Milan", "Genoa", "Turin"}
    assert floor.tdx_statuses == {"UpToDate"}
    assert Policy().tcb_floor == floor.snp and Policy().tdx.allowed_tcb_statuses == {"UpToDate"}
