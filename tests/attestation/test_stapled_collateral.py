"""Issue #11 (items 2, 3): GPUs under the fail-closed rule, and stapled collateral verified offline.

Evidence comes from the simulated TEE (fake AMD, NVIDIA device and RIM authorities); the client
verifies it with ``verify_evidence`` under ``Policy.simulated`` — the same code as for hardware.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from veil.attestation.binding import gpu_nonce, report_data
from veil.attestation.bundle import VerifiedEvidence, verify_evidence
from veil.attestation.collateral import CollateralStore
from veil.attestation.nvidia.validate import GpuPolicy
from veil.attestation.nvidia.verify import verify_gpu
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import Policy, TrustedRoots
from veil.attestation.testing.nvidia import make_fake_ca
from veil.attestation.testing.ocsp import amd_crl, ocsp_response, ocsp_responses
from veil.attestation.testing.rim import make_fake_rim_ca
from veil.attestation.testing.snp import rsa_key
from veil.enclave.keys import create_identity, measurement_from_build_digest
from veil.enclave.sim_release import write_simulation_release
from veil.enclave.tee.simulated import SimulatedTeeProvider, load_or_create_simulation
from veil.proto.v1 import evidence_pb2

BUILD = hashlib.sha256(b"build").digest()
T = dt.datetime.now(dt.UTC).replace(microsecond=0)
MODEL = hashlib.sha256(b"m").digest()
DATA_POLICY = hashlib.sha256(b"dp").digest()


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim")
    authority = load_or_create_simulation(path)
    # the release manifest `veil serve --tee simulated` would write for this build
    write_simulation_release(
        path, build_digest=BUILD, model_digest=MODEL, data_policy_digest=DATA_POLICY, gpu_count=2,
        tcb=authority.tcb,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def provider(state: Path, tmp_path_factory: pytest.TempPathFactory) -> SimulatedTeeProvider:
    return SimulatedTeeProvider(
        load_or_create_simulation(state),
        measurement_from_build_digest(BUILD),
        gpu_count=2,
        clock=lambda: T,
        collateral_dir=tmp_path_factory.mktemp("collateral"),
    )


@pytest.fixture(scope="module")
def policy(state: Path) -> Policy:
    return Policy.simulated(state / "simulation-root.pem")


def _evidence(provider: SimulatedTeeProvider) -> tuple[evidence_pb2.Evidence, bytes]:
    ident = create_identity(
        model_digest=MODEL,
        engine_version="test",
        data_policy_digest=DATA_POLICY,
        server_build_digest=BUILD,
        simulated=True,
    )
    nonce = secrets.token_bytes(32)
    parts = provider.evidence(nonce, ident.claims_bytes, ident.public_key.to_bytes())
    ev = evidence_pb2.Evidence(
        format_version=2,
        platform=parts.platform,
        cpu_report=parts.cpu.report,
        cpu_cert_chain=parts.cpu.cert_chain,
        gpus=[g.to_proto() for g in parts.gpus],
        enclave_key=ident.public_key.to_proto(),
        claims=ident.claims_bytes,
        nonce=nonce,
        simulated=True,
        collateral=parts.collateral,
    )
    return ev, nonce


def _verify(
    ev: evidence_pb2.Evidence, nonce: bytes, policy: Policy, at: dt.datetime = T + dt.timedelta(hours=1)
) -> VerifiedEvidence:
    return verify_evidence(ev, VerifyOptions(now=at), policy=policy, nonce=nonce)


def _failed(result: VerifiedEvidence) -> set[str]:
    return {c.name for c in result.verdict.failed}


def test_stapled_collateral_verifies_offline_without_any_network(
    provider: SimulatedTeeProvider, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*_: object, **__: object) -> None:
        pytest.fail("the client reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(CollateralStore, "_request", no_network)
    ev, nonce = _evidence(provider)
    result = _verify(ev, nonce, policy)
    assert result.ok, result.verdict.table()
    for i in (0, 1):
        for name in ("rim.driver", "rim.vbios", "measurements", "ocsp"):
            check = result.verdict.get(f"gpu[{i}].{name}")
            assert check is not None and check.status.value == "pass", (name, check)
    crl = result.verdict.get("snp.chain.crl")
    assert crl is not None and crl.status.value == "pass"


def test_relabelling_a_gpu_as_an_nvswitch_breaks_the_binding(
    provider: SimulatedTeeProvider, policy: Policy
) -> None:
    ev, nonce = _evidence(provider)
    ev.gpus[1].kind = evidence_pb2.GpuEvidence.KIND_NVSWITCH
    assert "binding.report_data" in _failed(_verify(ev, nonce, policy.replace(gpu_count=1)))
    ev, nonce = _evidence(provider)
    ev.gpus[1].index = 7
    assert "binding.report_data" in _failed(_verify(ev, nonce, policy))


def test_no_collateral_fails_closed(provider: SimulatedTeeProvider, policy: Policy) -> None:
    ev, nonce = _evidence(provider)
    ev.ClearField("collateral")
    failed = _failed(_verify(ev, nonce, policy))
    assert {
        "snp.chain.crl",
        "gpu[0].rim.driver",
        "gpu[0].rim.vbios",
        "gpu[0].measurements",
        "gpu[0].ocsp",
    } <= failed
    # The loud opt-outs turn these into skips (never passes).
    lax = policy.replace(require_crl=False, gpu=GpuPolicy.exploring())
    result = _verify(ev, nonce, lax)
    assert result.ok, result.verdict.table()
    for name in ("snp.chain.crl", "gpu[0].rim.driver", "gpu[0].measurements", "gpu[0].ocsp"):
        assert result.verdict.get(name).status.value == "skip", name  # type: ignore[union-attr]


def test_expired_collateral_is_refused(provider: SimulatedTeeProvider, policy: Policy) -> None:
    ev, nonce = _evidence(provider)
    # OCSP responses are good for a day: two days on, the GPU and RIM chains' answers are stale.
    failed = _failed(_verify(ev, nonce, policy, at=T + dt.timedelta(days=2)))
    assert {"gpu[0].ocsp", "gpu[0].rim.driver", "gpu[0].rim.vbios"} <= failed
    assert "snp.chain.crl" not in failed
    # The CRL is good for a week.
    assert "snp.chain.crl" in _failed(_verify(ev, nonce, policy, at=T + dt.timedelta(days=8)))
    # Not yet valid (a clock before the vendor's thisUpdate) is refused too.
    assert {"snp.chain.crl", "gpu[0].ocsp"} <= _failed(
        _verify(ev, nonce, policy, at=T - dt.timedelta(hours=2))
    )


def test_collateral_signed_by_a_non_vendor_key_is_refused(
    provider: SimulatedTeeProvider, policy: Policy
) -> None:
    auth = provider.authority
    ev, nonce = _evidence(provider)
    # A CRL naming the ARK but signed by another key.
    ev.collateral.amd.crl = amd_crl(
        auth.amd.ark, rsa_key(0), last_update=T, next_update=T + dt.timedelta(days=7)
    )
    assert "snp.chain.crl" in _failed(_verify(ev, nonce, policy))
    # OCSP answers signed by a responder the issuer never delegated to.
    ev, nonce = _evidence(provider)
    rogue_key = ec.generate_private_key(ec.SECP384R1())
    rogue = make_fake_ca().ica  # a responder certificate from another authority
    forged = ocsp_response(
        auth.gpu.ica,
        auth.gpu.root,
        auth.gpu.root_key,
        this_update=T,
        next_update=T + dt.timedelta(days=1),
        responder=(_self_signed(rogue.subject, rogue_key), rogue_key),
    )
    kept = list(ev.collateral.nvidia.ocsp_responses)
    del ev.collateral.nvidia.ocsp_responses[:]
    ev.collateral.nvidia.ocsp_responses.extend([forged, *kept])
    result = _verify(ev, nonce, policy)
    assert "gpu[0].ocsp" in _failed(result)
    assert "not signed by the issuer" in result.verdict.get("gpu[0].ocsp").detail  # type: ignore[union-attr]
    # RIMs with the right golden values, signed by a RIM authority nobody trusts.
    ev, nonce = _evidence(provider)
    other = make_fake_rim_ca(not_before=T - dt.timedelta(days=1), not_after=T + dt.timedelta(days=30))
    forged = evidence_pb2.Collateral()
    forged.CopyFrom(ev.collateral)
    del forged.nvidia.rims[:]
    for xml in ev.collateral.nvidia.rims:
        from veil.attestation.nvidia.rim import parse_rim

        rim = parse_rim(bytes(xml))
        golden = {i: m.alternatives[0] for i, m in rim.active.items()}
        forged.nvidia.rims.append(other.sign_rim(kind=rim.kind, version=rim.version, golden=golden))
    ev.collateral.CopyFrom(forged)
    assert {"gpu[0].rim.driver", "gpu[0].rim.vbios", "gpu[0].measurements"} <= _failed(
        _verify(ev, nonce, policy)
    )


def _self_signed(name: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T - dt.timedelta(days=1))
        .not_valid_after(T + dt.timedelta(days=30))
        .sign(key, hashes.SHA384())
    )


def test_revoked_or_missing_ocsp_is_refused(provider: SimulatedTeeProvider, policy: Policy) -> None:
    auth = provider.authority
    ev, nonce = _evidence(provider)
    revoked = ocsp_response(
        auth.gpu.ica,
        auth.gpu.root,
        auth.gpu.root_key,
        this_update=T,
        next_update=T + dt.timedelta(days=1),
        revoked=True,
    )
    kept = [r for r in ev.collateral.nvidia.ocsp_responses]
    del ev.collateral.nvidia.ocsp_responses[:]
    ev.collateral.nvidia.ocsp_responses.extend([revoked, *kept])
    result = _verify(ev, nonce, policy)
    assert "gpu[0].ocsp" in _failed(result)
    assert "revoked" in result.verdict.get("gpu[0].ocsp").detail  # type: ignore[union-attr]
    # Only the RIM chain's answer stapled: the device chain has none.
    ev, nonce = _evidence(provider)
    rim_only = ocsp_responses(
        auth.rim.chain,
        {auth.rim.root: auth.rim.root_key},
        this_update=T,
        next_update=T + dt.timedelta(days=1),
        skip_leaf=False,
    )
    del ev.collateral.nvidia.ocsp_responses[:]
    ev.collateral.nvidia.ocsp_responses.extend(rim_only)
    result = _verify(ev, nonce, policy)
    assert "gpu[0].ocsp" in _failed(result) and "gpu[0].rim.driver" not in _failed(result)
    assert "no stapled OCSP response" in result.verdict.get("gpu[0].ocsp").detail  # type: ignore[union-attr]


def test_arbitrary_measurements_under_a_genuine_chain_are_refused_without_rims() -> None:
    """A genuine (fake-CA) GPU report whose measurements nobody vouches for."""
    ca = make_fake_ca()
    nonce = bytes(range(32))
    report = ca.report(nonce, measurements={i: secrets.token_bytes(48) for i in range(1, 9)})
    options = VerifyOptions(now=dt.datetime(2025, 1, 1, tzinfo=dt.UTC), trusted_roots=(ca.root,))
    v = verify_gpu(report, ca.chain, options, nonce=nonce)  # the default GpuPolicy
    assert not v.ok
    assert {"gpu.rim.driver", "gpu.rim.vbios", "gpu.measurements", "gpu.ocsp"} <= {c.name for c in v.failed}
    assert v.get("gpu.signature").status.value == "pass"  # type: ignore[union-attr]


def test_partial_rims_are_compared_and_named(provider: SimulatedTeeProvider, policy: Policy) -> None:
    ev, nonce = _evidence(provider)
    from veil.attestation.nvidia.rim import parse_rim

    vbios_only = [x for x in ev.collateral.nvidia.rims if parse_rim(bytes(x)).kind == "vbios"]
    del ev.collateral.nvidia.rims[:]
    ev.collateral.nvidia.rims.extend(vbios_only)
    result = _verify(ev, nonce, policy)
    measured = result.verdict.get("gpu[0].measurements")
    assert measured is not None and measured.status.value == "fail"
    assert measured.detail == "VBIOS indices 0-3 match; not compared: no verified driver RIM"
    assert result.verdict.get("gpu[0].rim.driver").detail == "no driver RIM for version 590.12"  # type: ignore[union-attr]
    assert result.verdict.get("gpu[0].rim.vbios").status.value == "pass"  # type: ignore[union-attr]
    # Under the explorer's opt-out the partial comparison is a skip that still names what is missing.
    lax = _verify(ev, nonce, policy.replace(gpu=GpuPolicy.exploring()))
    assert lax.verdict.get("gpu[0].measurements").status.value == "skip"  # type: ignore[union-attr]


def test_gpu_policy_defaults_are_strict() -> None:
    assert GpuPolicy().require_rims and GpuPolicy().require_ocsp
    assert not GpuPolicy.exploring().require_ocsp
    assert GpuPolicy.from_mapping({"require_ocsp": False}) == GpuPolicy(require_ocsp=False)


def test_report_data_changes_with_the_gpu_label(provider: SimulatedTeeProvider) -> None:
    parts = provider.gpu_evidence(gpu_nonce(bytes(32), b"k"))
    protos = [p.to_proto() for p in parts]
    base = report_data(bytes(32), b"{}", protos)
    protos[0].kind = evidence_pb2.GpuEvidence.KIND_NVSWITCH
    assert report_data(bytes(32), b"{}", protos) != base


def test_each_simulated_chain_is_anchored_at_its_own_root(
    provider: SimulatedTeeProvider, policy: Policy
) -> None:
    """simulation-root.pem is (ARK, GPU device root, RIM root): swapping two roles breaks both chains."""
    ark, device, rim = policy.trusted_roots.simulation
    assert policy.trusted_roots.simulation_roles() == ((ark,), (device,), (rim,))
    swapped = policy.replace(trusted_roots=TrustedRoots(simulation=(device, ark, rim)))
    ev, nonce = _evidence(provider)
    failed = _failed(_verify(ev, nonce, swapped))
    assert "snp.chain.ark" in failed
    assert {"gpu[0].chain", "gpu[1].chain"} <= failed
    swapped = policy.replace(trusted_roots=TrustedRoots(simulation=(ark, rim, device)))
    failed = _failed(_verify(ev, nonce, swapped))
    assert "snp.chain.ark" not in failed
    assert {"gpu[0].chain", "gpu[0].rim.driver"} <= failed
