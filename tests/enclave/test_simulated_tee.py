"""The simulated TEE: real-layout evidence that the real verifiers accept with the simulation root only."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from veil.attestation.binding import gpu_nonce, report_data
from veil.attestation.nvidia.certs import leaf_fwid
from veil.attestation.nvidia.report import parse_gpu_report
from veil.attestation.nvidia.verify import verify_gpu
from veil.attestation.options import VerifyOptions
from veil.attestation.snp.certs import parse_amd_extensions
from veil.attestation.snp.report import parse_snp_report
from veil.attestation.snp.verify import verify_snp
from veil.attestation.stapled import stapled_nvidia
from veil.attestation.verdict import CheckStatus
from veil.enclave.errors import AttestationProviderError
from veil.enclave.tee.simulated import (
    SIMULATION_ROOT_FILE,
    SimulatedTeeProvider,
    load_or_create_simulation,
    root_fingerprints,
)

NONCE = bytes(range(32))
PUBKEY = b"\x07" * 32
CLAIMS = b'{"simulated":true}'
MEASUREMENT = bytes(range(48))


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def provider(state_dir: Path) -> SimulatedTeeProvider:
    return SimulatedTeeProvider(load_or_create_simulation(state_dir), MEASUREMENT, gpu_count=2)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _roots(state_dir: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((state_dir / SIMULATION_ROOT_FILE).read_bytes())


def test_state_dir_layout_and_reuse(state_dir: Path, provider: SimulatedTeeProvider) -> None:
    root_file = state_dir / SIMULATION_ROOT_FILE
    roots = _roots(state_dir)
    assert len(roots) == 3  # ARK, NVIDIA device root, NVIDIA RIM root (issue #11)
    assert "SIMULATED" in roots[0].subject.rfc4514_string()
    assert "SIMULATED" in roots[1].subject.rfc4514_string()
    for key in (state_dir / "simulation").glob("*.key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = load_or_create_simulation(state_dir)
    assert again.ark_cert == provider.authority.ark_cert
    assert again.chip_id == provider.authority.chip_id
    assert root_fingerprints(root_file.read_bytes()) == root_fingerprints(again.root_bundle_pem())


def test_damaged_state_is_regenerated(tmp_path: Path) -> None:
    first = load_or_create_simulation(tmp_path)
    (tmp_path / "simulation" / "vcek.key.pem").write_bytes(b"garbage")
    second = load_or_create_simulation(tmp_path)
    assert second.ark_cert != first.ark_cert  # a new root: clients must be told again


def test_expired_chain_is_regenerated(tmp_path: Path) -> None:
    first = load_or_create_simulation(tmp_path)
    later = first.vcek_cert.not_valid_after_utc + dt.timedelta(days=1)
    second = load_or_create_simulation(tmp_path, clock=lambda: later)
    assert second.vcek_cert != first.vcek_cert
    assert second.vcek_cert.not_valid_before_utc <= later <= second.vcek_cert.not_valid_after_utc


def test_snp_report_fields(provider: SimulatedTeeProvider) -> None:
    data = os.urandom(64)
    part = provider.cpu_evidence(data)
    report = parse_snp_report(part.report)
    assert len(part.report) == 0x4A0
    assert report.report_data == data
    assert report.measurement == MEASUREMENT
    assert not report.guest_policy.debug
    assert not report.guest_policy.migrate_ma
    assert report.vmpl == 0
    assert report.chip_id == provider.authority.chip_id
    exts = parse_amd_extensions(x509.load_pem_x509_certificates(part.cert_chain)[0])
    assert exts.hwid == report.chip_id
    assert exts.product is not None and exts.product.value == "Milan"
    # every call signs afresh (ECDSA is randomised), even for the same report_data
    assert provider.cpu_evidence(data).report != part.report


def test_snp_verifies_with_simulation_root_only(state_dir: Path, provider: SimulatedTeeProvider) -> None:
    part = provider.cpu_evidence(bytes(64))
    report = parse_snp_report(part.report)
    certs = x509.load_pem_x509_certificates(part.cert_chain)
    good = verify_snp(report, certs, VerifyOptions(now=_now(), trusted_roots=tuple(_roots(state_dir))))
    assert good.ok, good.table()
    assert good.get("snp.vcek.tcb") is not None and good.get("snp.vcek.tcb").status is CheckStatus.PASS  # type: ignore[union-attr]

    # With the real AMD roots pinned in the package (the default), the chain is rejected.
    real = verify_snp(report, certs, VerifyOptions(now=_now()))
    assert not real.ok
    assert "snp.chain.ark" in {c.name for c in real.failed}

    # A flipped measurement bit breaks the signature.
    tampered = bytearray(part.report)
    tampered[0x90] ^= 1
    bad = verify_snp(
        parse_snp_report(bytes(tampered)),
        certs,
        VerifyOptions(now=_now(), trusted_roots=tuple(_roots(state_dir))),
    )
    assert "snp.signature" in {c.name for c in bad.failed}


def test_gpu_reports_verify_with_simulation_root_only(
    state_dir: Path, provider: SimulatedTeeProvider
) -> None:
    gnonce = gpu_nonce(NONCE, PUBKEY)
    parts = provider.gpu_evidence(gnonce)
    assert [p.index for p in parts] == [0, 1]
    gpu_root = _roots(state_dir)[1]
    for part in parts:
        report = parse_gpu_report(part.report)
        assert part.report[4:36] == gnonce
        chain = x509.load_pem_x509_certificates(part.cert_chain)
        assert report.opaque.fwid == leaf_fwid(chain[0])
        # Issue #11: the default GpuPolicy needs RIMs and OCSP: the provider's stapled collateral.
        stapled = stapled_nvidia(provider.collateral())
        options = VerifyOptions(now=_now(), trusted_roots=(gpu_root,), ocsp_post=stapled.ocsp_post)
        rim_root = _roots(state_dir)[2]
        good = verify_gpu(report, chain, options, nonce=gnonce, rims=stapled.rims, rim_roots=(rim_root,))
        assert good.ok, good.table()
        for name in ("gpu.rim.driver", "gpu.rim.vbios", "gpu.measurements", "gpu.ocsp"):
            assert good.get(name).status.value == "pass", name  # type: ignore[union-attr]
        bare = verify_gpu(report, chain, VerifyOptions(now=_now(), trusted_roots=(gpu_root,)), nonce=gnonce)
        assert {"gpu.rim.driver", "gpu.rim.vbios", "gpu.measurements", "gpu.ocsp"} <= {
            c.name for c in bare.failed
        }
        real = verify_gpu(report, chain, VerifyOptions(now=_now()), nonce=gnonce)  # pinned NVIDIA root
        assert not real.ok
        assert "gpu.chain" in {c.name for c in real.failed}
        wrong_nonce = verify_gpu(
            report, chain, VerifyOptions(now=_now(), trusted_roots=(gpu_root,)), nonce=bytes(32)
        )
        assert "gpu.nonce" in {c.name for c in wrong_nonce.failed}
    assert parts[0].report != parts[1].report  # fresh responder nonce per report


def test_evidence_binds_gpu_reports_into_report_data(provider: SimulatedTeeProvider) -> None:
    parts = provider.evidence(NONCE, CLAIMS, PUBKEY)
    assert parts.simulated
    expected = report_data(NONCE, CLAIMS, parts.gpus)
    assert parse_snp_report(parts.cpu.report).report_data == expected
    for g in parts.gpus:
        assert parse_gpu_report(g.report).nonce == gpu_nonce(NONCE, PUBKEY)


def test_bad_inputs_are_typed_errors(provider: SimulatedTeeProvider) -> None:
    with pytest.raises(AttestationProviderError):
        provider.cpu_evidence(b"short")
    with pytest.raises(AttestationProviderError):
        provider.gpu_evidence(b"short")
    with pytest.raises(AttestationProviderError):
        SimulatedTeeProvider(provider.authority, b"x" * 32)
