"""The client appraisal Policy: defaults, TOML files, typed errors, the simulated opt-in."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.errors import PolicyError
from veil.attestation.policy import HARDWARE_PLATFORMS, PlatformName, Policy, TrustedRoots
from veil.attestation.snp.report import TcbVersion, build_snp_report
from veil.client import Policy as ClientPolicy
from veil.enclave.sim_release import write_simulation_release
from veil.enclave.tee.simulated import load_or_create_simulation

ROOTS = Path(__file__).resolve().parents[2] / "attestation" / "veil" / "attestation" / "roots"


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("sim")
    authority = load_or_create_simulation(state)
    digest = hashlib.sha256(b"x").digest()
    write_simulation_release(
        state,
        build_digest=digest,
        model_digest=digest,
        data_policy_digest=digest,
        gpu_count=1,
        tcb=authority.tcb,
    )
    return state / "simulation-root.pem"


def _sha(cert: object) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()  # type: ignore[attr-defined]


def test_client_reexports_policy() -> None:
    assert ClientPolicy is Policy


def test_default_is_production_strict() -> None:
    p = Policy()
    assert p.platforms == HARDWARE_PLATFORMS
    assert not p.allows_simulated and not p.allow_debug
    assert not p.trusted_roots.simulation
    # vendor roots shipped in the package, one ARK per product and the NVIDIA device root
    shipped_arks = {_sha(c) for c in p.trusted_roots.amd}
    assert len(shipped_arks) == 3
    assert {_sha(c) for c in p.trusted_roots.nvidia} == {
        "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
    }


def test_vendor_roots_equal_the_shared_evidence_copies(evidence_dir: Path) -> None:
    from veil.attestation.snp.certs import load_certificates

    ark = load_certificates((ROOTS / "amd_milan_ark.pem").read_bytes())[0]
    shared = load_certificates((evidence_dir / "snp" / "virtee-sev" / "milan_ark.pem").read_bytes())[0]
    assert _sha(ark) == _sha(shared)
    assert _sha(ark) in {_sha(c) for c in TrustedRoots.vendor().amd}


def test_simulated_is_explicit_and_loud(sim_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="veil.attestation.policy"):
        p = Policy.simulated(sim_root)
    assert p.platforms == {PlatformName.SIMULATED_SEV_SNP}
    assert p.allows_simulated
    assert len(p.trusted_roots.simulation) == 3  # SNP ARK, GPU root and RIM root (issue #11)
    assert not p.trusted_roots.amd and not p.trusted_roots.nvidia  # trusts nothing else
    assert "TRUSTING A SIMULATED TEE" in caplog.text
    with pytest.raises(PolicyError, match="no simulation root"):
        Policy(platforms=frozenset({PlatformName.SIMULATED_SEV_SNP}))
    with pytest.raises(PolicyError, match="not an allowed platform"):
        Policy(trusted_roots=TrustedRoots(simulation=p.trusted_roots.simulation))
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.simulated(sim_root.parent / "missing.pem")


def test_simulated_reads_the_signed_manifest_beside_the_root(sim_root: Path, tmp_path: Path) -> None:
    """Issue #11: Policy.simulated pins what the simulated enclave's signed manifest names."""
    p = Policy.simulated(sim_root)
    digest = hashlib.sha256(b"x").digest()
    assert p.release is not None and PlatformName.SIMULATED_SEV_SNP in p.release.platforms
    assert p.build_digests == {digest} and p.model_digests == {digest} and p.data_policy_digest == digest
    assert p.measurements == {digest + bytes(16)} and p.gpu_count == 1
    assert set(p.tcb_floor) == {"Milan"} and p.gpu.driver_versions
    # a root without its manifest is refused, not trusted with nothing pinned
    (tmp_path / "simulation-root.pem").write_bytes(sim_root.read_bytes())
    with pytest.raises(PolicyError, match="release manifest"):
        Policy.simulated(tmp_path / "simulation-root.pem")
    # a manifest signed by another key than the publisher key beside it is refused
    (tmp_path / "simulation-release.json").write_bytes(
        (sim_root.parent / "simulation-release.json").read_bytes()
    )
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from veil.attestation.errors import ReleaseError
    from veil.attestation.release import public_key_pem

    (tmp_path / "simulation-publisher.pub").write_bytes(
        public_key_pem(Ed25519PrivateKey.generate().public_key())
    )
    with pytest.raises(ReleaseError, match="unknown publisher key"):
        Policy.simulated(tmp_path / "simulation-root.pem")


def test_default_describes_what_fails_unpinned() -> None:
    text = "\n".join(Policy().describe())
    assert "measurements: none pinned: fails" in text and "release: none" in text
    toml = Policy.from_toml(f'build_digests = ["{"ab" * 32}"]\ntcb_floor = {{ Milan = {{ snp = 1 }} }}')
    assert toml.build_digests == {bytes.fromhex("ab" * 32)} and toml.tcb_floor == {"Milan": {"snp": 1}}
    with pytest.raises(PolicyError, match="unknown SEV-SNP product"):
        Policy.from_toml("tcb_floor = { Rome = { snp = 1 } }")


def test_from_file_full(tmp_path: Path, sim_root: Path) -> None:
    (tmp_path / "sim.pem").write_bytes(sim_root.read_bytes())
    measurement = "ab" * 48
    model = "cd" * 32
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        f"""
platforms = ["SIMULATED_SEV_SNP", "SEV_SNP"]
allow_debug = false
min_tcb = {{ bootloader = 3, tee = 0, snp = 8, microcode = 115 }}
measurements = ["{measurement}"]
gpu_count = 1
model_digests = ["sha256:{model}"]
data_policy_digest = "{"ef" * 32}"

[roots]
simulation = "sim.pem"

[snp]
vmpls = [0]
require_smt_disabled = true
"""
    )
    p = Policy.from_file(policy_file)
    assert p.platforms == {PlatformName.SIMULATED_SEV_SNP, PlatformName.SEV_SNP}
    assert p.min_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert p.measurements == {bytes.fromhex(measurement)}
    assert p.model_digests == {bytes.fromhex(model)}
    assert p.data_policy_digest == bytes.fromhex("ef" * 32)
    assert p.gpu_count == 1
    assert len(p.trusted_roots.simulation) == 3 and len(p.trusted_roots.amd) == 3
    assert p.snp.vmpls == {0} and p.snp.require_smt_disabled
    # the SNP field policy for a report merges the top-level settings in the report's TCB layout
    report = build_snp_report(report_data=bytes(64), measurement=bytes.fromhex(measurement))
    snp = p.snp_policy(report, bytes(64))
    assert snp.minimum_tcb == TcbVersion.from_parts(bootloader=3, tee=0, snp=8, microcode=115)
    assert snp.measurements == {bytes.fromhex(measurement)} and snp.vmpls == {0}
    assert not snp.allow_debug


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("colour = 'blue'", "unknown policy key"),
        ("platforms = ['SGX']", "unknown platform"),
        ("platforms = []", "no platform"),
        ("platforms = 'SEV_SNP'", "list of str"),
        ("allow_debug = 'no'", "allow_debug must be a bool"),
        ("gpu_count = -1", "non-negative"),
        ("gpu_count = true", "integer"),
        ("min_tcb = { bootloader = 300 }", "0..255"),
        ("min_tcb = { firmware = 1 }", "unknown component"),
        ("measurements = ['zz']", "not hex"),
        ("measurements = ['abcd']", "48 bytes"),
        ("model_digests = ['00']", "32 bytes"),
        ("data_policy_digest = 'xyz'", "not hex"),
        ("[roots]\nsgx = 'x.pem'", "unknown \\[roots\\] key"),
        ("[roots]\nintel = 'missing.pem'", "cannot read"),
        ("[roots]\namd = 'missing.pem'", "cannot read"),
        ("[snp]\nallow_debug = true", "top-level"),
        ("[snp]\nvmpls = [7]", "VMPL"),
        ("[snp]\nbogus = 1", "unknown SNP policy key"),
        ("this is = not toml ]", "not valid TOML"),
    ],
)
def test_bad_policies_raise_policy_error(text: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=match):
        Policy.from_toml(text, base_dir=tmp_path)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.from_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 1")
    with pytest.raises(PolicyError, match=r"bad\.toml: unknown policy key"):
        Policy.from_file(bad)


def test_describe_and_replace(sim_root: Path) -> None:
    p = Policy.simulated(sim_root, gpu_count=2)
    assert p.gpu_count == 2
    text = "\n".join(p.describe())
    assert "SIMULATED_SEV_SNP" in text and "GPUs required: 2" in text and "simulation 3" in text
    with pytest.raises(PolicyError):
        p.replace(allow_debug="yes")


def test_tdx_and_gpu_tables_are_read_by_the_one_policy_parser() -> None:
    rtmr = "ab" * 48
    p = Policy.from_toml(
        f"""
        measurements = ["{"cd" * 48}"]
        [tdx]
        rtmr1 = ["{rtmr}"]
        allowed_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]
        [gpu]
        driver_versions = ["550.90.07"]
        require_rims = true
        """
    )
    assert p.tdx.rtmr[1] == frozenset({bytes.fromhex(rtmr)})
    assert p.tdx.allowed_tcb_statuses == frozenset({"UpToDate", "SWHardeningNeeded"})
    assert p.gpu.driver_versions == frozenset({"550.90.07"}) and p.gpu.require_rims
    td = p.tdx_policy(bytes(64))
    assert td.mrtd == frozenset({bytes.fromhex("cd" * 48)}) and not td.allow_debug
    assert td.report_data == bytes(64) and td.rtmr == p.tdx.rtmr
    assert Policy().tdx_policy(None).allowed_tcb_statuses == frozenset({"UpToDate"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tdx]\nmrtd = []", "unknown TDX policy key"),
        ('[tdx]\nrtmr0 = ["zz"]', "rtmr0"),
        ("[tdx]\nallow_missing_tcb_status = 1", "allow_missing_tcb_status"),
        ('[tdx]\nallowed_tcb_statuses = ["Fine"]', "unknown TCB statuses"),
        ("[gpu]\ncount = 1", "unknown GPU policy key"),
        ('[gpu]\nrequire_rims = "yes"', "require_rims"),
        ("tdx = 3", "tdx must be a dict"),
    ],
)
def test_bad_tdx_or_gpu_tables_are_named(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_toml(text)
