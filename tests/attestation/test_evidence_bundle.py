"""Whole-bundle verification (veil.attestation.bundle) on simulated and real evidence."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from datetime import UTC, datetime
from pathlib import Path

import pytest

from veil.attestation.binding import Claims, gpu_nonce, report_data
from veil.attestation.bundle import verify_evidence
from veil.attestation.errors import MalformedInputError
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import Policy
from veil.enclave.keys import EnclaveIdentity, create_identity, measurement_from_build_digest
from veil.enclave.sim_release import write_simulation_release
from veil.enclave.tee.simulated import SimulatedTeeProvider, load_or_create_simulation
from veil.proto.v1 import evidence_pb2

BUILD = hashlib.sha256(b"build").digest()
MODEL = hashlib.sha256(b"model").digest()
DATA_POLICY = hashlib.sha256(b"dp").digest()
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulatedTeeProvider, Path]:
    state = tmp_path_factory.mktemp("sim")
    authority = load_or_create_simulation(state)
    # The release manifest Policy.simulated reads: what this simulated enclave reports.
    write_simulation_release(
        state,
        build_digest=BUILD,
        model_digest=MODEL,
        data_policy_digest=DATA_POLICY,
        gpu_count=2,
        tcb=authority.tcb,
    )
    return SimulatedTeeProvider(authority, measurement_from_build_digest(BUILD), gpu_count=2), state


@pytest.fixture(scope="module")
def policy(sim: tuple[SimulatedTeeProvider, Path]) -> Policy:
    return Policy.simulated(sim[1] / "simulation-root.pem")


def _identity(simulated: bool = True) -> EnclaveIdentity:
    return create_identity(
        model_digest=MODEL,
        engine_version="test",
        data_policy_digest=DATA_POLICY,
        server_build_digest=BUILD,
        simulated=simulated,
    )


def _evidence(
    provider: SimulatedTeeProvider, nonce: bytes, ident: EnclaveIdentity, *, gpu_for: bytes | None = None
) -> evidence_pb2.Evidence:
    key = ident.public_key.to_bytes()
    gpus = provider.gpu_evidence(gpu_for or gpu_nonce(nonce, key))
    cpu = provider.cpu_evidence(report_data(nonce, ident.claims_bytes, gpus))
    return evidence_pb2.Evidence(
        format_version=2,
        platform=evidence_pb2.PLATFORM_SIMULATED_SEV_SNP,
        cpu_report=cpu.report,
        cpu_cert_chain=cpu.cert_chain,
        gpus=[g.to_proto() for g in gpus],
        enclave_key=ident.public_key.to_proto(),
        claims=ident.claims_bytes,
        nonce=nonce,
        simulated=True,
        collateral=provider.collateral(),
    )


def _status(result: object, name: str) -> str:
    check = result.verdict.get(name)  # type: ignore[attr-defined]
    assert check is not None, name
    return str(check.status.value)


def test_good_simulated_bundle(sim: tuple[SimulatedTeeProvider, Path], policy: Policy) -> None:
    nonce = secrets.token_bytes(32)
    ident = _identity()
    ev = _evidence(sim[0], nonce, ident)
    result = verify_evidence(ev.SerializeToString(), VerifyOptions(now=NOW), policy=policy, nonce=nonce)
    assert result.ok, result.verdict.table()
    for name in (
        "evidence.parse", "binding.nonce", "binding.claims", "binding.enclave_key", "binding.simulated",
        "binding.report_data", "binding.gpu_nonce", "snp.signature", "snp.chain.ark", "gpu[0].signature",
        "gpu[1].nonce", "policy.platform", "policy.simulated", "policy.debug", "policy.release",
        "policy.measurement", "policy.build_digest", "policy.model_digest", "policy.data_policy_digest",
        "policy.min_tcb", "policy.vmpl", "policy.gpu_count",
    ):  # fmt: skip
        assert _status(result, name) == "pass", name
    assert result.public_key == ident.public_key
    assert result.claims == ident.claims
    # the message form verifies the same way
    assert verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=nonce).ok


def test_default_policy_rejects_simulated(sim: tuple[SimulatedTeeProvider, Path]) -> None:
    nonce = secrets.token_bytes(32)
    result = verify_evidence(
        _evidence(sim[0], nonce, _identity()), VerifyOptions(now=NOW), policy=Policy(), nonce=nonce
    )
    assert not result.ok
    failed = {c.name for c in result.verdict.failed}
    assert {"policy.platform", "policy.simulated", "snp.chain.ark", "gpu[0].chain"} <= failed


def test_replayed_evidence_for_another_nonce(sim: tuple[SimulatedTeeProvider, Path], policy: Policy) -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    ev = _evidence(sim[0], old, _identity())
    result = verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=new)
    failed = {c.name for c in result.verdict.failed}
    assert {"binding.nonce", "binding.report_data", "binding.gpu_nonce"} <= failed
    ev.nonce = new  # echoing the right nonce does not help: the signed report_data binds the old one
    failed = {
        c.name for c in verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=new).verdict.failed
    }
    assert "binding.report_data" in failed and "binding.nonce" not in failed


def test_swapped_enclave_key(sim: tuple[SimulatedTeeProvider, Path], policy: Policy) -> None:
    nonce = secrets.token_bytes(32)
    ev = _evidence(sim[0], nonce, _identity())
    attacker = _identity()
    # 1. only the key swapped: the claims name another key
    ev1 = evidence_pb2.Evidence()
    ev1.CopyFrom(ev)
    ev1.enclave_key.CopyFrom(attacker.public_key.to_proto())
    failed = {
        c.name
        for c in verify_evidence(ev1, VerifyOptions(now=NOW), policy=policy, nonce=nonce).verdict.failed
    }
    assert "binding.enclave_key" in failed
    # 2. key and claims swapped consistently: the signed report_data no longer matches
    ev2 = evidence_pb2.Evidence()
    ev2.CopyFrom(ev1)
    ev2.claims = attacker.claims_bytes
    result = verify_evidence(ev2, VerifyOptions(now=NOW), policy=policy, nonce=nonce)
    failed = {c.name for c in result.verdict.failed}
    assert "binding.report_data" in failed and "binding.enclave_key" not in failed
    assert "binding.gpu_nonce" in failed  # the GPU reports were requested for the real key


def test_gpu_report_for_another_nonce(sim: tuple[SimulatedTeeProvider, Path], policy: Policy) -> None:
    nonce = secrets.token_bytes(32)
    ev = _evidence(sim[0], nonce, _identity(), gpu_for=secrets.token_bytes(32))
    failed = {
        c.name for c in verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=nonce).verdict.failed
    }
    assert failed == {"binding.gpu_nonce", "gpu[0].nonce", "gpu[1].nonce"}


def test_tampered_reports(sim: tuple[SimulatedTeeProvider, Path], policy: Policy) -> None:
    nonce = secrets.token_bytes(32)
    ev = _evidence(sim[0], nonce, _identity())
    cpu = bytearray(ev.cpu_report)
    cpu[0x90] ^= 1  # measurement
    ev.cpu_report = bytes(cpu)
    failed = {
        c.name for c in verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=nonce).verdict.failed
    }
    assert "snp.signature" in failed
    ev = _evidence(sim[0], nonce, _identity())
    gpu = bytearray(ev.gpus[1].report)
    gpu[60] ^= 1
    ev.gpus[1].report = bytes(gpu)
    failed = {
        c.name for c in verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=nonce).verdict.failed
    }
    assert "binding.report_data" in failed  # report_data commits to every GPU report
    assert any(name.startswith("gpu[1].") for name in failed)


def test_policy_checks(sim: tuple[SimulatedTeeProvider, Path], policy: Policy) -> None:
    nonce = secrets.token_bytes(32)
    ev = _evidence(sim[0], nonce, _identity())
    strict = policy.replace(
        gpu_count=1,
        model_digests=[hashlib.sha256(b"other").digest()],
        data_policy_digest=hashlib.sha256(b"other").digest(),
        measurements=[bytes(48)],
    )
    failed = {
        c.name for c in verify_evidence(ev, VerifyOptions(now=NOW), policy=strict, nonce=nonce).verdict.failed
    }
    assert failed == {
        "policy.gpu_count",
        "policy.model_digest",
        "policy.data_policy_digest",
        "policy.measurement",
    }
    right = policy.replace(
        gpu_count=2,
        model_digests=[MODEL],
        data_policy_digest=DATA_POLICY,
        measurements=[measurement_from_build_digest(BUILD)],
        min_tcb={"bootloader": 1, "snp": 1},
    )
    result = verify_evidence(ev, VerifyOptions(now=NOW), policy=right, nonce=nonce)
    assert result.ok, result.verdict.table()
    assert _status(result, "policy.min_tcb") == "pass"
    too_new = policy.replace(min_tcb={"snp": 255})
    failed = {
        c.name
        for c in verify_evidence(ev, VerifyOptions(now=NOW), policy=too_new, nonce=nonce).verdict.failed
    }
    assert failed == {"policy.min_tcb"}


def test_simulated_flags_must_agree(sim: tuple[SimulatedTeeProvider, Path], policy: Policy) -> None:
    nonce = secrets.token_bytes(32)
    ev = _evidence(sim[0], nonce, _identity(simulated=False))  # claims say "not simulated"
    failed = {
        c.name for c in verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=nonce).verdict.failed
    }
    assert failed == {"binding.simulated"}
    ev = _evidence(sim[0], nonce, _identity())
    ev.simulated = False
    failed = {
        c.name for c in verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=nonce).verdict.failed
    }
    assert failed == {"binding.simulated"}


def test_time_is_injected(sim: tuple[SimulatedTeeProvider, Path], policy: Policy) -> None:
    nonce = secrets.token_bytes(32)
    ev = _evidence(sim[0], nonce, _identity())
    failed = {
        c.name
        for c in verify_evidence(
            ev, VerifyOptions(now=datetime(2100, 1, 1, tzinfo=UTC)), policy=policy, nonce=nonce
        ).verdict.failed
    }
    assert "snp.chain.validity" in failed  # (the simulated GPU chain, like NVIDIA's, runs to 9999)
    with pytest.raises(MalformedInputError):
        verify_evidence(ev, VerifyOptions(now=datetime(2026, 1, 1)), policy=policy, nonce=nonce)  # naive
    with pytest.raises(MalformedInputError):
        verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=b"short")


def test_garbage_and_unsupported(policy: Policy) -> None:
    result = verify_evidence(b"\xff\xff\xff", VerifyOptions(now=NOW), policy=policy, nonce=None)
    assert not result.ok and result.verdict.failed[0].name == "evidence.parse"
    tdx = evidence_pb2.Evidence(format_version=2, platform=evidence_pb2.PLATFORM_TDX, nonce=bytes(32))
    failed = {
        c.name
        for c in verify_evidence(tdx, VerifyOptions(now=NOW), policy=Policy(), nonce=bytes(32)).verdict.failed
    }
    # TDX is verified now (issue #13): an empty quote fails its parse, never "not supported".
    assert {"tdx.quote.parse", "binding.claims", "binding.report_data"} <= failed
    assert "platform.verify" not in failed
    unknown = evidence_pb2.Evidence(format_version=2, platform=99, nonce=bytes(32))
    failed = {
        c.name
        for c in verify_evidence(
            unknown, VerifyOptions(now=NOW), policy=Policy(), nonce=bytes(32)
        ).verdict.failed
    }
    assert "platform.verify" in failed
    wrong_version = evidence_pb2.Evidence(format_version=1)  # v1 (GPU kind not bound) is refused
    failed = {
        c.name
        for c in verify_evidence(
            wrong_version, VerifyOptions(now=NOW), policy=policy, nonce=None
        ).verdict.failed
    }
    assert "evidence.format_version" in failed


def test_real_snp_report_through_the_same_code(evidence_dir: Path) -> None:
    """A genuine Milan report in a Veil bundle: AMD's signature and chain verify under the shipped roots;
    the bundle fails only because nothing binds the report to a Veil nonce and key."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from veil.attestation.snp.certs import load_certificates
    from veil.attestation.snp.report import parse_snp_report

    raw = bytes.fromhex((evidence_dir / "snp" / "virtee-sev" / "report_milan.hex").read_text().strip())
    vcek = load_certificates((evidence_dir / "snp" / "virtee-sev" / "vcek_milan.der").read_bytes())[0]
    ident = _identity(simulated=False)
    nonce = secrets.token_bytes(32)
    ev = evidence_pb2.Evidence(
        format_version=2,
        platform=evidence_pb2.PLATFORM_SEV_SNP,
        cpu_report=raw,
        cpu_cert_chain=vcek.public_bytes(Encoding.PEM),
        enclave_key=ident.public_key.to_proto(),
        claims=ident.claims_bytes,
        nonce=nonce,
    )
    at = VerifyOptions(now=datetime(2026, 1, 1, tzinfo=UTC))
    # Issue #11: the default policy pins nothing, so the code identity fails, and this 2023
    # report is below the shipped TCB floor.
    unpinned = {c.name for c in verify_evidence(ev, at, policy=Policy(), nonce=nonce).verdict.failed}
    assert {"policy.measurement", "policy.min_tcb", "policy.build_digest", "policy.model_digest"} <= unpinned
    report = parse_snp_report(raw)
    pinned = Policy(
        measurements=[report.measurement],
        min_tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
        build_digests=[BUILD],
        model_digests=[MODEL],
        data_policy_digest=DATA_POLICY,
    )
    result = verify_evidence(ev, at, policy=pinned, nonce=nonce)
    for name in ("snp.signature", "snp.chain.ark", "snp.chain.ask", "snp.chain.leaf", "snp.vcek.hwid"):
        assert _status(result, name) == "pass", name
    assert _status(result, "policy.simulated") == "pass"
    # Issue #11: the default policy requires a stapled, ARK-signed CRL; this bundle staples none.
    assert {c.name for c in result.verdict.failed} == {
        "binding.report_data",
        "policy.report_data",
        "snp.chain.crl",
    }
    lax = verify_evidence(ev, at, policy=pinned.replace(require_crl=False), nonce=nonce)
    assert {c.name for c in lax.verdict.failed} == {"binding.report_data", "policy.report_data"}
    assert _status(lax, "snp.chain.crl") == "skip"
    # simulated roots never verify real hardware evidence
    sim_only = dataclasses.replace(Policy(), platforms=frozenset(Policy().platforms))
    assert sim_only.trusted_roots.simulation == ()
    assert isinstance(Claims.from_bytes(ident.claims_bytes), Claims)


def test_simulated_measurement_is_the_claimed_build(
    sim: tuple[SimulatedTeeProvider, Path], policy: Policy
) -> None:
    nonce = secrets.token_bytes(32)
    good = verify_evidence(
        _evidence(sim[0], nonce, _identity()), VerifyOptions(now=NOW), policy=policy, nonce=nonce
    )
    assert _status(good, "simulated.measurement") == "pass"
    other_build = create_identity(
        model_digest=MODEL,
        engine_version="test",
        data_policy_digest=DATA_POLICY,
        server_build_digest=hashlib.sha256(b"another build").digest(),
        simulated=True,
    )
    result = verify_evidence(
        _evidence(sim[0], nonce, other_build), VerifyOptions(now=NOW), policy=policy, nonce=nonce
    )
    # The build the claims name is also not the one the manifest pins (issue #11).
    assert {c.name for c in result.verdict.failed} == {"simulated.measurement", "policy.build_digest"}
