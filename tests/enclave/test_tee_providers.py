"""Hardware providers through their seams (issue #13): each bundle verifies in the client end to end
under a signed release manifest, and fails for a tampered byte, a wrong nonce, a wrong GPU count."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tee_fakes import (
    CHIP_ID,
    MEASUREMENT,
    MRTD,
    FakeAzureTpm,
    FakeConfigfs,
    FakeNvml,
    FakeSnp,
    fake_sev_guest_ioctl,
    pem,
    tdx_quote,
)

from veil.attestation.binding import EVIDENCE_FORMAT_VERSION
from veil.attestation.bundle import verify_evidence
from veil.attestation.nvidia.validate import GpuPolicy
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import PlatformName, Policy, TrustedRoots
from veil.attestation.release import PlatformRelease, Release, public_key_pem, sign_release
from veil.attestation.stapled import intel_collateral_proto
from veil.attestation.testing.azure import REPORT_TYPE_SNP, REPORT_TYPE_TDX
from veil.attestation.testing.nvidia import make_fake_ca
from veil.attestation.testing.ocsp import amd_crl
from veil.attestation.testing.snp import INSIDE, make_fake_amd
from veil.attestation.testing.tdx import FakeIntel
from veil.enclave.errors import AttestationProviderError, TeeUnavailableError
from veil.enclave.keys import create_identity
from veil.enclave.tee.azure import AzureVtpmSource
from veil.enclave.tee.configfs_tsm import ConfigfsTsm, ConfigfsTsmSource
from veil.enclave.tee.hardware import HardwareProvider
from veil.enclave.tee.nvidia import NvmlGpuSource, verify_and_set_ready
from veil.enclave.tee.probe import Seams, select_hardware
from veil.enclave.tee.sev_guest import SevGuestSource
from veil.proto.v1 import evidence_pb2

NOW = INSIDE
BUILD, MODEL, DATA = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
TSM = Path("/sys/kernel/config/tsm/report")


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    amd = make_fake_amd("Milan")
    intel = FakeIntel(now=NOW)
    collateral = evidence_pb2.Collateral()
    collateral.amd.crl = amd_crl(amd.ark, amd.ark_key, last_update=NOW, next_update=NOW.replace(year=2026))
    collateral.intel.CopyFrom(intel_collateral_proto(intel.collateral()))
    publisher = Ed25519PrivateKey.generate()
    return {"snp": FakeSnp.make(amd), "intel": intel, "collateral": collateral, "publisher": publisher}


def _policy(
    world: dict[str, Any], platform: PlatformName, *, gpus: int = 0, tpm: FakeAzureTpm | None = None
) -> Policy:
    pins = PlatformRelease(
        measurements=frozenset({MRTD if "TDX" in platform.value else MEASUREMENT}),
        rtmr=tuple(frozenset({b"\x44" * 48}) for _ in range(4)),
        azure_pcrs=dict(enumerate(tpm.vtpm.pcrs)) if tpm else {},
        model_digests=frozenset({MODEL}),
        data_policy_digest=DATA,
        gpu_count=gpus,
        tdx_statuses=frozenset({"UpToDate"}),
    )
    manifest = sign_release(Release("veil-test", BUILD, {platform: pins}), world["publisher"])
    roots = TrustedRoots(
        amd=(world["snp"].amd.ark,), intel=(world["intel"].root,), nvidia=TrustedRoots.vendor().nvidia
    )
    return Policy.from_release(
        manifest,
        publisher_key=public_key_pem(world["publisher"].public_key()),
        platform=platform,
        trusted_roots=roots,
    )


def _bundle(provider: HardwareProvider, nonce: bytes) -> evidence_pb2.Evidence:
    ident = create_identity(
        model_digest=MODEL,
        engine_version="test",
        data_policy_digest=DATA,
        server_build_digest=BUILD,
        simulated=False,
    )
    parts = provider.evidence(nonce, ident.claims_bytes, ident.public_key.to_bytes())
    return evidence_pb2.Evidence(
        format_version=EVIDENCE_FORMAT_VERSION,
        platform=parts.platform,
        cpu_report=parts.cpu.report,
        cpu_cert_chain=parts.cpu.cert_chain,
        gpus=[g.to_proto() for g in parts.gpus],
        enclave_key=ident.public_key.to_proto(),
        claims=ident.claims_bytes,
        nonce=nonce,
        azure=parts.cpu.azure,
        collateral=parts.collateral,
    )


def _check_end_to_end(provider: HardwareProvider, policy: Policy) -> None:
    nonce = secrets.token_bytes(32)
    ev = _bundle(provider, nonce)
    result = verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=nonce)
    assert result.ok, [f"{c.name}: {c.detail}" for c in result.verdict.failed]
    assert "platform.verify" not in {c.name for c in result.verdict.checks}
    # a wrong nonce
    other = verify_evidence(ev, VerifyOptions(now=NOW), policy=policy, nonce=secrets.token_bytes(32))
    assert {"binding.nonce", "binding.report_data"} <= {c.name for c in other.verdict.failed}
    # a wrong GPU count
    wrong = verify_evidence(ev, VerifyOptions(now=NOW), policy=policy.replace(gpu_count=1), nonce=nonce)
    assert "policy.gpu_count" in {c.name for c in wrong.verdict.failed}
    # a tampered byte in the hardware-signed report (and in the Azure HCL report)
    for field in ("cpu_report",) + (("azure",) if ev.HasField("azure") else ()):
        bad = evidence_pb2.Evidence()
        bad.CopyFrom(ev)
        if field == "azure":
            raw = bytearray(bad.azure.hcl_report)
            raw[-3] ^= 1  # inside the variable data: breaks the H(var_data) binding
            bad.azure.hcl_report = bytes(raw)
        else:
            raw = bytearray(bad.cpu_report)
            raw[0x60] ^= 1
            bad.cpu_report = bytes(raw)
        assert not verify_evidence(bad, VerifyOptions(now=NOW), policy=policy, nonce=nonce).ok


def _configfs(world: dict[str, Any], provider: str, **knobs: Any) -> FakeConfigfs:
    snp, intel = world["snp"], world["intel"]
    if provider == "sev_guest":
        return FakeConfigfs(provider, snp.report, auxblob=snp.table(), **knobs)
    return FakeConfigfs(provider, lambda data: tdx_quote(intel, data), **knobs)


def test_configfs_snp_bundle_end_to_end(world: dict[str, Any]) -> None:
    fake = _configfs(world, "sev_guest")
    cpu = ConfigfsTsmSource(ConfigfsTsm(TSM, files=fake), "sev_guest")
    provider = HardwareProvider(cpu, collateral=lambda: world["collateral"])
    assert provider.platform == evidence_pb2.PLATFORM_SEV_SNP and not provider.simulated
    _check_end_to_end(provider, _policy(world, PlatformName.SEV_SNP))
    assert not fake.entries and fake.removed  # every entry removed


def test_configfs_tdx_bundle_end_to_end(world: dict[str, Any]) -> None:
    cpu = ConfigfsTsmSource(ConfigfsTsm(TSM, files=_configfs(world, "tdx_guest")), "tdx_guest")
    provider = HardwareProvider(cpu, collateral=lambda: world["collateral"])
    _check_end_to_end(provider, _policy(world, PlatformName.TDX))
    # without stapled Intel collateral the TCB cannot be appraised: fails closed
    bare = HardwareProvider(cpu, collateral=lambda: evidence_pb2.Collateral(amd=world["collateral"].amd))
    nonce = secrets.token_bytes(32)
    result = verify_evidence(
        _bundle(bare, nonce), VerifyOptions(now=NOW), policy=_policy(world, PlatformName.TDX), nonce=nonce
    )
    assert "policy.tcb_status" in {c.name for c in result.verdict.failed}


def test_sev_guest_bundle_end_to_end_with_certificate_buffer_retry(
    world: dict[str, Any], tmp_path: Path
) -> None:
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    cpu = SevGuestSource(device, ioctl=fake_sev_guest_ioctl(world["snp"]), certs_len=16)  # too small: retried
    _check_end_to_end(
        HardwareProvider(cpu, collateral=lambda: world["collateral"]), _policy(world, PlatformName.SEV_SNP)
    )


@pytest.mark.parametrize("report_type", [REPORT_TYPE_SNP, REPORT_TYPE_TDX])
def test_azure_bundles_end_to_end(world: dict[str, Any], report_type: int) -> None:
    snp, intel = world["snp"], world["intel"]
    hardware = snp.report if report_type == REPORT_TYPE_SNP else (lambda data: tdx_quote(intel, data))
    tpm = FakeAzureTpm(hardware, report_type)
    chain = snp.chain_pem()
    cpu = AzureVtpmSource(
        tpm,
        http_get=lambda url: (
            b'{"vcekCert": %s, "certificateChain": %s}'
            % tuple(
                __import__("json").dumps(p.decode()).encode()
                for p in (
                    chain.split(b"-----END CERTIFICATE-----\n", 1)[0] + b"-----END CERTIFICATE-----\n",
                    chain.split(b"-----END CERTIFICATE-----\n", 1)[1],
                )
            )
        ),
        http_post=tpm.imds_post,
    )
    platform = PlatformName.AZURE_SEV_SNP if report_type == REPORT_TYPE_SNP else PlatformName.AZURE_TDX
    assert cpu.platform == getattr(evidence_pb2, f"PLATFORM_{platform.value}")
    policy = _policy(world, platform, tpm=tpm)
    _check_end_to_end(HardwareProvider(cpu, collateral=lambda: world["collateral"]), policy)
    # a PCR that is not the pinned one fails policy.azure_pcrs
    tpm.vtpm.pcrs[4] = bytes(32)
    nonce = secrets.token_bytes(32)
    result = verify_evidence(
        _bundle(HardwareProvider(cpu, collateral=lambda: world["collateral"]), nonce),
        VerifyOptions(now=NOW),
        policy=policy,
        nonce=nonce,
    )
    assert "policy.azure_pcrs" in {c.name for c in result.verdict.failed}


# ------------------------------------------------------------------------------ configfs failure modes


def test_configfs_retries_a_generation_race_and_gives_up_on_a_persistent_one(world: dict[str, Any]) -> None:
    fake = _configfs(world, "sev_guest", races=2)
    tsm = ConfigfsTsm(TSM, files=fake, attempts=3)
    assert tsm.report(b"\x05" * 64).generation == 2  # privlevel + inblob writes
    assert len(fake.removed) == 3 and not fake.entries
    with pytest.raises(AttestationProviderError, match="another writer"):
        ConfigfsTsm(TSM, files=_configfs(world, "sev_guest", races=9), attempts=3).report(bytes(64))


@pytest.mark.parametrize(
    ("knobs", "error", "text"),
    [
        ({"missing": True}, TeeUnavailableError, "does not exist"),
        ({"deny": True}, TeeUnavailableError, "permission denied"),
        ({"truncate": 100}, AttestationProviderError, "not a usable report"),
        ({"other_inblob": True}, AttestationProviderError, "another inblob"),
    ],
)
def test_configfs_failures_are_typed(
    world: dict[str, Any], knobs: dict[str, Any], error: type, text: str
) -> None:
    cpu = ConfigfsTsmSource(ConfigfsTsm(TSM, files=_configfs(world, "sev_guest", **knobs)), "sev_guest")
    with pytest.raises(error, match=text):
        cpu.cpu_evidence(b"\x07" * 64)


def test_truncated_auxblob_is_refused(world: dict[str, Any]) -> None:
    fake = _configfs(world, "sev_guest")
    fake.auxblob = fake.auxblob[:30]
    with pytest.raises(AttestationProviderError, match="outside the table"):
        ConfigfsTsmSource(ConfigfsTsm(TSM, files=fake), "sev_guest").cpu_evidence(bytes(64))
    fake.auxblob = fake.auxblob[:20]
    with pytest.raises(AttestationProviderError, match="truncated"):
        ConfigfsTsmSource(ConfigfsTsm(TSM, files=fake), "sev_guest").cpu_evidence(bytes(64))


# ------------------------------------------------------------------------------ NVML


def test_nvml_refuses_cc_off_dev_tools_and_a_wrong_count() -> None:
    gpu = make_fake_ca()
    with pytest.raises(TeeUnavailableError, match="mode is off"):
        NvmlGpuSource(FakeNvml(gpu, cc_on=False))
    with pytest.raises(TeeUnavailableError, match="dev-tools mode is on"):
        NvmlGpuSource(FakeNvml(gpu, devtools=True))
    with pytest.raises(TeeUnavailableError, match="2 GPU"):
        NvmlGpuSource(FakeNvml(gpu, count=2), expected=1)
    with pytest.raises(TeeUnavailableError, match="cannot initialise"):
        NvmlGpuSource(FakeNvml(gpu, library=False))
    with pytest.raises(TeeUnavailableError, match=r"protected PCIe.*nvattest"):
        NvmlGpuSource(FakeNvml(gpu, protected_pcie=True))  # no nvattest on PATH here


def test_nvml_evidence_is_self_verified_before_the_gpus_are_set_ready() -> None:
    gpu = make_fake_ca()
    nvml = FakeNvml(gpu, count=2)
    source = NvmlGpuSource(nvml, expected=2)
    nonce = secrets.token_bytes(32)
    parts = source.gpu_evidence(nonce)
    assert [p.index for p in parts] == [0, 1] and all(p.cert_chain.startswith(b"-----BEGIN") for p in parts)
    relaxed = GpuPolicy(require_rims=False, require_ocsp=False)  # no RIMs stapled in this unit test
    assert verify_and_set_ready(source, None, nonce=nonce, now=NOW, roots=(gpu.root,), policy=relaxed) == 2
    assert nvml.ready == 1
    # under another root (a GPU that is not NVIDIA's) the GPUs stay not ready
    nvml.ready = 0
    with pytest.raises(TeeUnavailableError, match="self-attestation failed"):
        verify_and_set_ready(source, None, nonce=nonce, now=NOW, roots=(make_fake_ca().root,), policy=relaxed)
    assert nvml.ready == 0


# ------------------------------------------------------------------------------ the probe


def test_probe_on_a_machine_without_a_tee_names_every_interface(tmp_path: Path) -> None:
    seams = Seams(root=tmp_path, nvml=lambda: FakeNvml(make_fake_ca(), library=False))
    with pytest.raises(TeeUnavailableError) as info:
        select_hardware("auto", "auto", seams)
    text = str(info.value)
    for name in ("configfs-tsm", "sev-guest", "TPM", "NVML"):
        assert f"  {name}: no" in text


def test_probe_finds_configfs_snp_and_gpus(world: dict[str, Any], tmp_path: Path) -> None:
    seams = Seams(
        root=tmp_path, configfs=_configfs(world, "sev_guest"), nvml=lambda: FakeNvml(make_fake_ca())
    )
    cpu, gpus, text = select_hardware("auto", "1", seams)
    assert cpu.platform == evidence_pb2.PLATFORM_SEV_SNP and gpus is not None
    assert "configfs-tsm: found" in text and "NVML: found" in text
    with pytest.raises(TeeUnavailableError, match="no usable TEE"):
        select_hardware("tdx", "none", seams)  # the machine is SNP


def test_snp_host_without_certificates_gets_the_vcek_chain_from_kds(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """configfs-tsm with an empty auxblob: the VCEK for the report's chip and reported TCB, then
    ASK+ARK, come from AMD's KDS (a loopback-free httpx transport speaking its URLs); cached."""
    import httpx
    from cryptography.hazmat.primitives.serialization import Encoding

    from veil.attestation.collateral import CollateralStore, Endpoints
    from veil.enclave.tee.hardware import kds_chain_fetcher

    snp = world["snp"]
    asked: list[str] = []

    def kds(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.path}?{request.url.query.decode()}")
        if request.url.path == f"/vcek/v1/Milan/{CHIP_ID.hex()}":
            return httpx.Response(200, content=snp.vcek.public_bytes(Encoding.DER))
        if request.url.path == "/vcek/v1/Milan/cert_chain":
            return httpx.Response(200, content=pem(snp.amd.ask, snp.amd.ark))
        return httpx.Response(404)

    store = CollateralStore(
        cache_dir=tmp_path / "kds",
        endpoints=Endpoints(amd_kds="https://kds.test"),
        client=httpx.Client(transport=httpx.MockTransport(kds)),
        kds_min_interval_s=0.0,
    )
    fake = FakeConfigfs("sev_guest", snp.report, auxblob=b"")
    cpu = ConfigfsTsmSource(ConfigfsTsm(TSM, files=fake), "sev_guest", fetch_chain=kds_chain_fetcher(store))
    _check_end_to_end(
        HardwareProvider(cpu, collateral=lambda: world["collateral"]), _policy(world, PlatformName.SEV_SNP)
    )
    assert asked[0] == f"/vcek/v1/Milan/{CHIP_ID.hex()}?blSPL=4&snpSPL=22&teeSPL=0&ucodeSPL=213"
    # a report that is not one is a typed provider error, not a traceback
    with pytest.raises(AttestationProviderError, match="VCEK lookup"):
        kds_chain_fetcher(store)(b"\0" * 10)


def test_start_hardware_fetches_collateral_caches_it_and_fails_closed_once_it_expires(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """``veil serve``'s start-up path: the sample report names the AMD CRL to staple, fetched from
    KDS (an httpx transport speaking its URLs) into the state dir; a restart while KDS is down
    staples the cached set while it is current; once it has expired, start-up is refused, typed."""
    import datetime as dt

    import httpx

    from veil.attestation.collateral import CollateralStore, Endpoints
    from veil.enclave.errors import CollateralUnavailableError
    from veil.enclave.tee.hardware import start_hardware

    crl = world["collateral"].amd.crl
    asked: list[str] = []
    kds_up = [True]

    def kds(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if kds_up[0] and request.url.path == "/vcek/v1/Milan/crl":
            return httpx.Response(200, content=crl)
        return httpx.Response(503)

    def store(n: int) -> CollateralStore:  # a fresh vendor cache each time: only the state dir carries over
        return CollateralStore(
            cache_dir=tmp_path / f"vendor-{n}",
            endpoints=Endpoints(amd_kds="https://kds.test"),
            client=httpx.Client(transport=httpx.MockTransport(kds)),
            kds_min_interval_s=0.0,
        )

    cpu = ConfigfsTsmSource(ConfigfsTsm(TSM, files=_configfs(world, "sev_guest")), "sev_guest")
    policy = _policy(world, PlatformName.SEV_SNP)
    state = tmp_path / "state"
    provider = start_hardware(cpu, None, state, store=store(0), clock=lambda: NOW)
    assert asked == ["/vcek/v1/Milan/crl"]
    assert provider.evidence(bytes(32), b"c", b"k").collateral.amd.crl == crl
    _check_end_to_end(provider, policy)
    kds_up[0] = False
    restarted = start_hardware(cpu, None, state, store=store(1), clock=lambda: NOW + dt.timedelta(days=1))
    _check_end_to_end(restarted, policy)
    assert asked == ["/vcek/v1/Milan/crl"]  # not due for a refresh: KDS was not even asked
    expired = NOW.replace(year=2026) + dt.timedelta(days=1)  # past the CRL's next update
    with pytest.raises(CollateralUnavailableError, match="no current collateral"):
        start_hardware(cpu, None, state, store=store(2), clock=lambda: expired)
    assert asked[1:] and set(asked[1:]) == {"/vcek/v1/Milan/crl"}  # it tried, and KDS was down


@pytest.mark.tee
def test_this_machines_tee_signs_a_bundle_the_client_binds() -> None:
    """On a real confidential VM (`make test` there): the probed provider's report carries this
    enclave's binding and verifies to the vendor roots; the measurement is not pinned here."""
    import datetime as dt

    cpu, _gpus, probed = select_hardware("auto", "none")
    provider = start_hardware_for_test(cpu)
    nonce = secrets.token_bytes(32)
    ev = _bundle(provider, nonce)
    result = verify_evidence(
        ev,
        VerifyOptions(now=dt.datetime.now(dt.UTC)),
        policy=Policy(allow_any_measurement=True, gpu_count=0),
        nonce=nonce,
    )
    checks = {c.name: c for c in result.verdict.checks}
    failed = {c.name for c in result.verdict.failed}
    assert "platform.verify" not in checks, probed
    assert not {n for n in failed if n.startswith("binding.")}, [str(c) for c in result.verdict.failed]


def start_hardware_for_test(cpu: Any) -> HardwareProvider:
    """The provider with the vendor collateral ``veil serve`` would staple (fetched online)."""
    import tempfile

    from veil.enclave.tee.hardware import start_hardware

    return start_hardware(cpu, None, Path(tempfile.mkdtemp(prefix="veil-tee-test-")))
