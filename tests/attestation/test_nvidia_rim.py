"""NVIDIA RIMs: the real signed swidtags of nv-local-gpu-verifier 2.7.3, and measurement appraisal."""

from __future__ import annotations

import base64
import functools
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.attestation.collateral import CollateralStore, Endpoints
from veil.attestation.errors import MalformedInputError, VeilAttestationError
from veil.attestation.nvidia.certs import load_cert_chain, nvidia_device_root
from veil.attestation.nvidia.report import parse_gpu_report
from veil.attestation.nvidia.rim import (
    Rim,
    RimMeasurement,
    RimSet,
    parse_rim,
    verify_rim,
)
from veil.attestation.nvidia.validate import NVDEC0_DISABLED, GpuPolicy, compare_measurements
from veil.attestation.nvidia.verify import verify_gpu as _verify_gpu
from veil.attestation.options import VerifyOptions
from veil.attestation.testing.nvidia import make_fake_ca
from veil.attestation.verdict import CheckStatus

# Issue #11: the default GpuPolicy fails a report without RIMs and OCSP. The tests here pin the
# other checks, so they verify under the explicit opt-out unless they pass a policy themselves;
# tests/attestation/test_gpu_defaults.py pins the strict default.
EXPLORING = GpuPolicy.exploring()
verify_gpu = functools.partial(_verify_gpu, policy=EXPLORING)


# Every RIM signer here is valid inside 2023-09-06 .. 2025-06-22 (the narrowest windows overlap).
NOW = datetime(2024, 6, 1, tzinfo=UTC)
TODAY = datetime(2026, 11, 22, tzinfo=UTC)  # all RIM signing certificates have expired by now
BEFORE = datetime(2023, 1, 1, tzinfo=UTC)
NVTRUST_NONCE = bytes.fromhex("4760e30534a0621357d458b1a7936551b5dc4cd1e69718adf7ed9fb0252a537e")
PASS, FAIL, SKIP = CheckStatus.PASS, CheckStatus.FAIL, CheckStatus.SKIP


def _dir(evidence_dir: Path) -> Path:
    return evidence_dir / "nvidia_gpu" / "nv-local-gpu-verifier-2.7.3"


def _rim(evidence_dir: Path, name: str) -> Rim:
    return parse_rim((_dir(evidence_dir) / name).read_bytes())


@pytest.fixture(scope="module")
def all_rims(evidence_dir: Path) -> RimSet:
    return RimSet.of(parse_rim(p.read_bytes()) for p in sorted(_dir(evidence_dir).glob("*.swidtag")))


@pytest.fixture(scope="module")
def driver_rim(evidence_dir: Path) -> Rim:
    return _rim(evidence_dir, "Driver_RIM_test_no_gpu.swidtag")


@pytest.fixture(scope="module")
def vbios_rim(evidence_dir: Path) -> Rim:
    return _rim(evidence_dir, "1010_0200_882_96005E0001_test_no_gpu.swidtag")


def test_every_rim_parses_and_verifies(evidence_dir: Path, all_rims: RimSet) -> None:
    assert len(all_rims.rims) == 26
    for path in sorted(_dir(evidence_dir).glob("*.swidtag")):
        rim = parse_rim(path.read_bytes())
        assert rim.product == "GH100"
        assert len(rim.measurements) == 64 and len(rim.certificates) == 4
        if path.name.startswith("Driver"):
            assert (rim.kind, rim.version) == ("driver", "545.00")
        else:
            assert rim.kind == "vbios"
            assert rim.version.replace(".", "") == path.name.split("_")[3]  # file name carries the version
        v = verify_rim(rim, VerifyOptions(now=NOW), prefix=path.name)
        assert v.ok, v.table()
        assert [c.status for c in v.checks] == [PASS, PASS, PASS]


def test_rims_rejected_outside_their_validity(driver_rim: Rim) -> None:
    for moment, phrase in ((TODAY, "expired"), (BEFORE, "not valid before")):
        v = verify_rim(driver_rim, VerifyOptions(now=moment), prefix="rim.driver")
        assert [c.name for c in v.failed] == ["rim.driver.chain.validity"]
        assert "HCC RIM L4 Signer" in v.failed[0].detail and phrase in v.failed[0].detail


def test_rim_with_a_touched_measurement_fails_its_signature(evidence_dir: Path, vbios_rim: Rim) -> None:
    xml = vbios_rim.xml
    i = xml.index(b'Hash0="') + len(b'Hash0="')
    touched = xml[:i] + (b"1" if xml[i : i + 1] != b"1" else b"2") + xml[i + 1 :]
    v = verify_rim(parse_rim(touched), VerifyOptions(now=NOW))
    assert [c.name for c in v.failed] == ["rim.signature"]
    flipped = xml.replace(b'index="7" active="False"', b'index="7" active="True"', 1)
    assert flipped != xml
    assert [c.name for c in verify_rim(parse_rim(flipped), VerifyOptions(now=NOW)).failed] == [
        "rim.signature"
    ]


def test_rim_signed_by_another_certificate_fails(vbios_rim: Rim, driver_rim: Rim) -> None:
    swapped = Rim(
        **{
            **{f: getattr(vbios_rim, f) for f in Rim.__dataclass_fields__},
            "certificates": driver_rim.certificates,
        }
    )
    assert driver_rim.certificates[0] != vbios_rim.certificates[0]
    v = verify_rim(swapped, VerifyOptions(now=NOW))
    assert v.get("rim.signature").status is FAIL  # type: ignore[union-attr]


def test_rim_fields_must_be_the_signed_ones(vbios_rim: Rim) -> None:
    """A Rim whose fields were altered after parsing (same signed XML) is refused."""
    fields = {f: getattr(vbios_rim, f) for f in Rim.__dataclass_fields__}
    m0 = vbios_rim.measurements[0]
    forged = (
        RimMeasurement(m0.index, m0.name, m0.active, m0.size, (b"\x01" * 48,)),
        *vbios_rim.measurements[1:],
    )
    for change in ({"measurements": forged}, {"version": "96.00.74.00.1A"}):
        v = verify_rim(Rim(**{**fields, **change}), VerifyOptions(now=NOW))
        assert [c.name for c in v.failed] == ["rim.signature"]
        assert v.failed[0].detail == "version or measurements differ from the signed content"


def test_rim_chain_must_end_at_the_rim_root(driver_rim: Rim) -> None:
    v = verify_rim(driver_rim, VerifyOptions(now=NOW, trusted_roots=(nvidia_device_root(),)))
    assert [c.name for c in v.failed] == ["rim.chain"]
    unsigned = Rim(**{**{f: getattr(driver_rim, f) for f in Rim.__dataclass_fields__}, "certificates": ()})
    assert {c.name for c in verify_rim(unsigned, VerifyOptions(now=NOW)).failed} >= {
        "rim.signature",
        "rim.chain",
    }


def test_malformed_rims_are_typed() -> None:
    for bad in (b"", b"<a", b"<a/>", b'<!DOCTYPE x [<!ENTITY e "x">]><a/>', b"text" * 3):
        with pytest.raises(MalformedInputError):
            parse_rim(bad)


def test_index_convention_on_real_data(evidence_dir: Path) -> None:
    """Golden index i is SPDM block i + 1: the FSP measurement at golden index 4 of a published
    G520 VBIOS RIM equals block 5 of the nvtrust H100 report (same FSP across these VBIOS builds)."""
    rim = _rim(evidence_dir, "g520_0200_885_9600740001_PROD.swidtag")
    report = parse_gpu_report((evidence_dir / "nvidia_gpu/nvtrust/decoded/gpu0_evidence.bin").read_bytes())
    assert report.measurements[5] in rim.active[4].alternatives
    assert report.measurements[4] not in rim.active[4].alternatives


def test_no_shared_rim_matches_the_nvtrust_reports(evidence_dir: Path, all_rims: RimSet) -> None:
    """The HGX reports run driver 590.12 / VBIOS 96.00.A5.00.01; shared/ has no RIM for either."""
    base = evidence_dir / "nvidia_gpu/nvtrust/decoded"
    data = (base / "gpu0_evidence.bin").read_bytes()
    chain = load_cert_chain((base / "gpu0_certchain.pem").read_bytes())
    now = datetime(2025, 10, 1, tzinfo=UTC)
    v = verify_gpu(data, chain, VerifyOptions(now=now), nonce=NVTRUST_NONCE, rims=all_rims)
    assert v.ok
    assert v.get("gpu.rim.driver").detail == "no driver RIM for version 590.12"  # type: ignore[union-attr]
    assert v.get("gpu.rim.vbios").detail == "no VBIOS RIM for version 96.00.A5.00.01"  # type: ignore[union-attr]
    assert v.get("gpu.measurements").status is SKIP  # type: ignore[union-attr]
    strict = verify_gpu(
        data,
        chain,
        VerifyOptions(now=now),
        nonce=NVTRUST_NONCE,
        rims=all_rims,
        policy=GpuPolicy(require_rims=True, require_ocsp=False),
    )
    assert {c.name for c in strict.failed} == {"gpu.rim.driver", "gpu.rim.vbios", "gpu.measurements"}


def _golden_measurements(driver: Rim, vbios: Rim) -> dict[int, bytes]:
    """Block index → value, taking alternative 0 of each active golden measurement."""
    values = {i: bytes(48) for i in range(1, 65)}
    for rim in (driver, vbios):
        for index, m in rim.active.items():
            values[index + 1] = m.alternatives[0]
    return values


def test_measurements_match_real_rims_end_to_end(driver_rim: Rim, vbios_rim: Rim, all_rims: RimSet) -> None:
    """A report (fake device CA) whose measurements are the golden values of the real test RIMs."""
    rims = RimSet.of([driver_rim, vbios_rim])
    ca = make_fake_ca()
    nonce = bytes(range(32))
    data = ca.report(nonce, measurements=_golden_measurements(driver_rim, vbios_rim))
    v = verify_gpu(data, ca.chain, VerifyOptions(now=NOW, trusted_roots=(ca.root,)), nonce=nonce, rims=rims)
    assert v.ok, v.table()
    for name in ("gpu.rim.driver", "gpu.rim.vbios", "gpu.measurements"):
        assert v.get(name).status is PASS, name  # type: ignore[union-attr]
    # The same report against RIMs that have expired today: the RIM checks fail.
    expired = verify_gpu(
        data, ca.chain, VerifyOptions(now=TODAY, trusted_roots=(ca.root,)), nonce=nonce, rims=rims
    )
    assert {c.name for c in expired.failed} == {"gpu.rim.driver", "gpu.rim.vbios"}
    assert expired.get("gpu.measurements").status is SKIP  # type: ignore[union-attr]  # nothing trusted to compare with
    # shared/ holds a PROD and a test RIM for VBIOS 96.00.5E.00.01 that differ: ambiguous, refused.
    ambiguous = verify_gpu(
        data, ca.chain, VerifyOptions(now=NOW, trusted_roots=(ca.root,)), nonce=nonce, rims=all_rims
    )
    assert [c.name for c in ambiguous.failed] == ["gpu.rim.vbios"]
    assert ambiguous.failed[0].detail.startswith("2 different VBIOS RIMs for version 96.00.5E.00.01")


def test_a_changed_measurement_fails_and_is_named(driver_rim: Rim, vbios_rim: Rim) -> None:
    ca = make_fake_ca()
    nonce = bytes(32)
    values = _golden_measurements(driver_rim, vbios_rim)
    values[22] = b"\xee" * 48  # golden index 21: active in the driver RIM
    v = verify_gpu(
        ca.report(nonce, measurements=values),
        ca.chain,
        VerifyOptions(now=NOW, trusted_roots=(ca.root,)),
        nonce=nonce,
        rims=RimSet.of([driver_rim, vbios_rim]),
    )
    assert [c.name for c in v.failed] == ["gpu.measurements"]
    assert v.failed[0].detail.startswith("index 21 (driver): eeeeeeee")


def test_compare_measurements_rules(driver_rim: Rim, vbios_rim: Rim) -> None:
    values = _golden_measurements(driver_rim, vbios_rim)
    assert compare_measurements(values, driver=driver_rim, vbios=vbios_rim) == []
    # both RIMs claiming one index is a conflict
    assert compare_measurements(values, driver=vbios_rim, vbios=vbios_rim)[0].endswith(
        "active in both driver and VBIOS RIMs"
    )
    # a missing block is a mismatch
    missing = dict(values)
    del missing[1]
    assert compare_measurements(missing, driver=driver_rim, vbios=vbios_rim) == [
        "index 0 (vbios): no runtime measurement"
    ]
    # index 35 is skipped only when NVDEC0 is disabled (0x55)
    wrong35 = {**values, 36: b"\x01" * 48}
    assert compare_measurements(wrong35, driver=driver_rim, vbios=vbios_rim, nvdec0_status=0xAA)
    assert (
        compare_measurements(wrong35, driver=driver_rim, vbios=vbios_rim, nvdec0_status=NVDEC0_DISABLED) == []
    )
    assert compare_measurements(values, driver=driver_rim, vbios=vbios_rim, nvdec0_status=0x12) == [
        "unknown NVDEC0 status 0x12"
    ]
    # a second alternative is accepted where the RIM lists one
    multi = next(m for m in driver_rim.active.values() if len(m.alternatives) > 1)
    alt = {**values, multi.index + 1: multi.alternatives[1]}
    assert compare_measurements(alt, driver=driver_rim, vbios=vbios_rim) == []


def test_rimset_lookup(all_rims: RimSet) -> None:
    assert all_rims.find("driver", "545.00") is not None
    assert len(all_rims.candidates("vbios", "96.00.5e.00.01")) == 2  # PROD and test; hex case-insensitive
    assert all_rims.find("vbios", "96.00.5e.00.01") is None  # ambiguous
    assert all_rims.find("vbios", "96.00.74.00.1a") is not None
    assert all_rims.find("vbios", "545.00") is None
    assert all_rims.find("driver", "590.12") is None


# -- fetched over HTTP through the collateral store (loopback server, real files) ---------------


@pytest.fixture
def rim_server(evidence_dir: Path) -> Iterator[str]:
    files = {
        "NV_GPU_DRIVER_GH100_545.00": _dir(evidence_dir) / "Driver_RIM_test_no_gpu.swidtag",
        "NV_GPU_VBIOS_1010_0200_882_96005E0001": _dir(evidence_dir) / "1010_0200_882_96005E0001_PROD.swidtag",
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            rim_id = self.path.rsplit("/", 1)[-1]
            if not self.path.startswith("/v1/rim/") or rim_id not in files:
                self.send_error(404)
                return
            body = json.dumps({"id": rim_id, "rim": base64.b64encode(files[rim_id].read_bytes()).decode()})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_rims_fetched_over_http_verify(rim_server: str, tmp_path: Path) -> None:
    store = CollateralStore(cache_dir=tmp_path, endpoints=Endpoints(nvidia_rim=rim_server))
    rims = [
        parse_rim(store.nvidia_rim(i).content)
        for i in ("NV_GPU_DRIVER_GH100_545.00", "NV_GPU_VBIOS_1010_0200_882_96005E0001")
    ]
    assert [r.kind for r in rims] == ["driver", "vbios"]
    assert all(verify_rim(r, VerifyOptions(now=NOW)).ok for r in rims)
    offline = CollateralStore(cache_dir=tmp_path, offline=True)  # served from the cache now
    assert offline.nvidia_rim("NV_GPU_DRIVER_GH100_545.00").content == rims[0].xml


# -- fuzz ---------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(data=st.data())
def test_fuzz_rim_parser_and_verifier(driver_rim: Rim, data: st.DataObject) -> None:
    xml = bytearray(driver_rim.xml)
    if data.draw(st.booleans()):
        xml = xml[: data.draw(st.integers(min_value=0, max_value=len(xml)))]
    else:
        for _ in range(data.draw(st.integers(min_value=1, max_value=6))):
            pos = data.draw(st.integers(min_value=0, max_value=len(xml) - 1))
            xml[pos] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        rim = parse_rim(bytes(xml))
    except VeilAttestationError:
        return
    v = verify_rim(rim, VerifyOptions(now=NOW))
    if bytes(xml) != driver_rim.xml:
        assert v.get("rim.signature") is not None
