"""The enclave's stapled collateral: cached in the state dir, refreshed before it expires."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from veil.attestation.collateral import Fetched
from veil.attestation.nvidia.report import parse_gpu_report
from veil.attestation.testing.ocsp import ocsp_response
from veil.enclave.collateral import (
    CACHE_FILE,
    CollateralCache,
    CollateralNeeds,
    VendorCollateralSource,
    refresh_time,
)
from veil.enclave.errors import CollateralUnavailableError
from veil.enclave.tee.simulated import SimulationAuthority, load_or_create_simulation
from veil.enclave.tee.simulated_collateral import SimulatedCollateralSource
from veil.proto.v1 import evidence_pb2

T = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> SimulationAuthority:
    return load_or_create_simulation(tmp_path_factory.mktemp("sim"))


@dataclass
class Clock:
    now: dt.datetime = T

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class CountingSource:
    inner: SimulatedCollateralSource
    calls: int = 0
    down: bool = False

    def fetch(self) -> evidence_pb2.Collateral:
        if self.down:
            raise OSError("vendor service unreachable")
        self.calls += 1
        return self.inner.fetch()


def _source(authority: SimulationAuthority, clock: Clock) -> CountingSource:
    golden = {i: bytes([i]) * 48 for i in range(8)}
    return CountingSource(SimulatedCollateralSource(authority, golden, "590.12", "96.00.A5.00.01", clock))


def test_cached_in_the_state_dir_and_refreshed_before_expiry(
    authority: SimulationAuthority, tmp_path: Path
) -> None:
    clock = Clock()
    source = _source(authority, clock)
    cache = CollateralCache(source, tmp_path / "collateral", clock=clock)
    first = cache.current()
    assert source.calls == 1 and (tmp_path / "collateral" / CACHE_FILE).is_file()
    refresh, expiry = refresh_time(first)  # type: ignore[misc]
    # OCSP answers live from T-1h to T+1d: refresh at three quarters of that, before expiry.
    assert refresh == T - dt.timedelta(hours=1) + dt.timedelta(hours=25) * 3 / 4
    assert expiry == T + dt.timedelta(days=1)
    assert cache.current() is first and source.calls == 1
    # A restarted enclave staples the cached set at once, without fetching.
    restarted = CollateralCache(source, tmp_path / "collateral", clock=clock)
    assert restarted.current() == first and source.calls == 1
    clock.now = refresh + dt.timedelta(seconds=1)
    second = cache.current()
    assert source.calls == 2 and second != first


def test_a_failed_refresh_serves_the_old_set_only_while_it_is_current(
    authority: SimulationAuthority, tmp_path: Path
) -> None:
    clock = Clock()
    source = _source(authority, clock)
    cache = CollateralCache(source, tmp_path, clock=clock)
    first = cache.current()
    source.down = True
    clock.now = T + dt.timedelta(hours=20)  # due for refresh, not yet expired
    assert cache.current() is first
    clock.now = T + dt.timedelta(days=1, seconds=1)  # expired: the client would refuse it
    with pytest.raises(CollateralUnavailableError):
        cache.current()
    with pytest.raises(CollateralUnavailableError):
        CollateralCache(source, None, clock=clock).current()


def test_a_damaged_cache_file_is_fetched_afresh(authority: SimulationAuthority, tmp_path: Path) -> None:
    clock = Clock()
    source = _source(authority, clock)
    (tmp_path / CACHE_FILE).write_bytes(b"\xff not a message")
    assert CollateralCache(source, tmp_path, clock=clock).current().amd.crl
    assert source.calls == 1


@dataclass
class FakeStore:
    """Stands in for CollateralStore: serves what the vendors would, records what was asked."""

    authority: SimulationAuthority
    rims: dict[str, bytes]
    asked: list[str] = field(default_factory=list)

    def amd_crl(self, product: str, signer: str = "vcek") -> Fetched:
        self.asked.append(f"crl/{product}/{signer}")
        return Fetched(b"crl")

    def nvidia_rim(self, rim_id: str) -> Fetched:
        self.asked.append(rim_id)
        return Fetched(self.rims[rim_id])

    def nvidia_ocsp(self, request_der: bytes) -> bytes:
        from cryptography.x509 import ocsp

        serial = ocsp.load_der_ocsp_request(request_der).serial_number
        self.asked.append(f"ocsp/{serial:x}")
        gpu, rim = self.authority.gpu, self.authority.rim
        cert, issuer, key = {
            gpu.ica.serial_number: (gpu.ica, gpu.root, gpu.root_key),
            rim.signer.serial_number: (rim.signer, rim.root, rim.root_key),
        }[serial]
        return ocsp_response(cert, issuer, key, this_update=T, next_update=T + dt.timedelta(days=1))


def test_vendor_source_fetches_what_the_evidence_needs(authority: SimulationAuthority) -> None:
    report = authority.gpu.report(bytes(32), driver="590.12")
    opaque = parse_gpu_report(report).opaque
    assert opaque.driver_version == "590.12"
    driver_id = "NV_GPU_DRIVER_GH100_590.12"
    vbios_id = "NV_GPU_VBIOS_1010_0200_882_96005E0001"  # the fake CA's default opaque fields
    rim = authority.rim.sign_rim(kind="driver", version="590.12", golden={0: bytes(48)})
    store = FakeStore(authority, {driver_id: rim, vbios_id: rim})
    needs = CollateralNeeds(amd_product="Milan", gpus=[("gpu", report, authority.gpu_chain_pem())] * 2)
    out = VendorCollateralSource(store, needs).fetch()  # type: ignore[arg-type]
    assert out.amd.crl == b"crl"
    assert len(out.nvidia.rims) == 2  # one per RIM id
    # one RIM fetch per id, OCSP for the device chain's ICA (not the leaf) and the RIM signer
    assert store.asked.count(driver_id) == 1 and store.asked[0] == "crl/Milan/vcek"
    assert f"ocsp/{authority.gpu.leaf.serial_number:x}" not in store.asked
    assert f"ocsp/{authority.rim.signer.serial_number:x}" in store.asked
    assert len(out.nvidia.ocsp_responses) == len(set(out.nvidia.ocsp_responses))
