"""SPDM 1.1 GPU / NVSwitch report parsing and building, on the real nvtrust HGX evidence."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.attestation.errors import MalformedInputError, UnsupportedError, VeilAttestationError
from veil.attestation.nvidia.report import (
    REQUEST_SIZE,
    SIGNATURE_SIZE,
    OpaqueFieldType,
    build_gpu_report,
    build_request,
    describe_gpu_report,
    format_vbios_version,
    parse_gpu_report,
)

NONCE = bytes.fromhex("4760e30534a0621357d458b1a7936551b5dc4cd1e69718adf7ed9fb0252a537e")
GPUS = [f"gpu{i}" for i in range(8)]
SWITCHES = [f"switch{i}" for i in range(4)]


def _bin(evidence_dir: Path, name: str) -> bytes:
    return (evidence_dir / "nvidia_gpu" / "nvtrust" / "decoded" / f"{name}_evidence.bin").read_bytes()


@pytest.fixture(scope="module")
def gpu0(evidence_dir: Path) -> bytes:
    return _bin(evidence_dir, "gpu0")


@pytest.fixture(scope="module")
def switch0(evidence_dir: Path) -> bytes:
    return _bin(evidence_dir, "switch0")


@pytest.mark.parametrize("name", GPUS)
def test_real_gpu_reports_parse(evidence_dir: Path, name: str) -> None:
    data = _bin(evidence_dir, name)
    report = parse_gpu_report(data)
    assert report.nonce == NONCE
    assert report.request.version == 0x11 and report.request.operation == 0xFF
    assert len(report.response.blocks) == 64
    assert all(len(b.value) == 48 for b in report.response.blocks)
    assert report.opaque.driver_version == "590.12"
    assert report.opaque.vbios_version == "96.00.A5.00.01"
    assert report.opaque.fwid is not None and len(report.opaque.fwid) == 48
    assert report.opaque.text(OpaqueFieldType.PROJECT) == "G520"
    assert report.opaque.text(OpaqueFieldType.CHIP_SKU) == "885"
    assert len(report.signature) == SIGNATURE_SIZE
    assert report.signed_bytes == data[:-SIGNATURE_SIZE]
    assert report.trailing == b""
    # the response re-serialises to exactly the bytes it came from
    assert report.request.to_bytes() + report.response.to_bytes() == data


@pytest.mark.parametrize("name", SWITCHES)
def test_real_switch_reports_parse(evidence_dir: Path, name: str) -> None:
    data = _bin(evidence_dir, name)
    report = parse_gpu_report(data)
    assert report.nonce == NONCE
    assert len(report.response.blocks) == 31
    assert report.opaque.driver_version is None
    assert report.opaque.fwid is None  # NVSwitch opaque data carries no FWID
    assert report.opaque.vbios_version == "96.10.73.00.01"  # reported as text by the switch
    assert report.request.to_bytes() + report.response.to_bytes() == data


def test_decoded_files_equal_the_json_origin(evidence_dir: Path) -> None:
    """The nonce the reports were requested with is the JSON's ``nonce`` and bytes 4..36 of each request."""
    base = evidence_dir / "nvidia_gpu" / "nvtrust"
    for file, prefix in (("gpu_evidence.json", "gpu"), ("switch_evidence.json", "switch")):
        entries = json.loads((base / file).read_text())
        for i, entry in enumerate(entries):
            data = base64.b64decode(entry["evidence"])
            assert data == _bin(evidence_dir, f"{prefix}{i}")
            assert bytes.fromhex(entry["nonce"]) == NONCE == parse_gpu_report(data).nonce
            if "driver_version" in entry:
                assert parse_gpu_report(data).opaque.driver_version == entry["driver_version"]
                assert parse_gpu_report(data).opaque.vbios_version == entry["vbios_version"]


def test_trailing_zero_byte_is_tolerated_but_not_signed(gpu0: bytes) -> None:
    report = parse_gpu_report(gpu0 + b"\x00")
    assert report.trailing == b"\x00"
    assert report.signed_bytes == gpu0[:-SIGNATURE_SIZE]
    assert report.signature == gpu0[-SIGNATURE_SIZE:]


@pytest.mark.parametrize("tail", [b"\x01", b"\x00\x07", b"\x00" * 17])
def test_non_zero_or_long_trailers_are_rejected(gpu0: bytes, tail: bytes) -> None:
    with pytest.raises(MalformedInputError):
        parse_gpu_report(gpu0 + tail)


def test_structure_errors_are_typed(gpu0: bytes) -> None:
    with pytest.raises(UnsupportedError):
        parse_gpu_report(b"\x12" + gpu0[1:])  # SPDM 1.2
    with pytest.raises(MalformedInputError):
        parse_gpu_report(gpu0[:1] + b"\xe1" + gpu0[2:])  # not GET_MEASUREMENTS
    with pytest.raises(UnsupportedError):
        parse_gpu_report(gpu0[:2] + b"\x00" + gpu0[3:])  # no signature requested
    with pytest.raises(MalformedInputError):
        parse_gpu_report(gpu0[: REQUEST_SIZE + 1] + b"\x61" + gpu0[REQUEST_SIZE + 2 :])  # not MEASUREMENTS
    bad_count = bytearray(gpu0)
    bad_count[REQUEST_SIZE + 4] = 63  # NumberOfBlocks disagrees with the record
    with pytest.raises(MalformedInputError, match="NumberOfBlocks"):
        parse_gpu_report(bytes(bad_count))
    with pytest.raises(MalformedInputError):
        parse_gpu_report("not bytes")  # type: ignore[arg-type]


def test_vbios_version_formats() -> None:
    assert format_vbios_version(bytes.fromhex("00a5009601000000")) == "96.00.A5.00.01"
    assert format_vbios_version(b"96.10.73.00.01") == "96.10.73.00.01"
    with pytest.raises(MalformedInputError):
        format_vbios_version(b"\x00\x01\x02")


def test_builder_round_trip() -> None:
    nonce = bytes(range(32))
    signed: list[bytes] = []

    def sign(data: bytes) -> bytes:
        signed.append(data)
        return b"\x5a" * 96

    data = build_gpu_report(
        nonce=nonce,
        measurements=[b"\x11" * 48, b"\x22" * 48],
        opaque={OpaqueFieldType.DRIVER_VERSION: b"550.90.07\x00", OpaqueFieldType.FWID: b"\x33" * 48},
        responder_nonce=b"\x44" * 32,
        sign=sign,
        trailing=b"\x00",
    )
    report = parse_gpu_report(data)
    assert report.nonce == nonce
    assert report.signed_bytes == signed[0]
    assert report.measurements == {1: b"\x11" * 48, 2: b"\x22" * 48}
    assert report.opaque.driver_version == "550.90.07"
    assert report.opaque.fwid == b"\x33" * 48
    assert report.response.nonce == b"\x44" * 32
    assert report.trailing == b"\x00"
    assert build_request(nonce) == data[:REQUEST_SIZE]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonce": b"short"},
        {"responder_nonce": b"short"},
        {"measurements": []},
        {"measurements": {0: b"x"}},
        {"measurements": [b"x" * 70000]},
        {"opaque": {3: b"x" * 2000}},
        {"trailing": b"\x01"},
        {"sign": lambda data: b"too short"},
    ],
)
def test_builder_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "nonce": bytes(32),
        "measurements": [bytes(48)],
        "opaque": {},
        "responder_nonce": bytes(32),
        "sign": lambda data: bytes(96),
    }
    args.update(kwargs)
    with pytest.raises(MalformedInputError):
        build_gpu_report(**args)  # type: ignore[arg-type]


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(cut=st.integers(min_value=0, max_value=4273))
def test_fuzz_truncations_raise_only_typed_errors(gpu0: bytes, cut: int) -> None:
    try:
        parse_gpu_report(gpu0[:cut])
    except VeilAttestationError:
        return
    pytest.fail("a truncated report parsed")


@_FUZZ
@given(data=st.data())
def test_fuzz_mutations_raise_only_typed_errors(gpu0: bytes, switch0: bytes, data: st.DataObject) -> None:
    base = bytearray(data.draw(st.sampled_from([gpu0, switch0])))
    for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
        pos = data.draw(st.integers(min_value=0, max_value=len(base) - 1))
        base[pos] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        report = parse_gpu_report(bytes(base))
    except VeilAttestationError:
        return
    # whatever parses exposes its decoded fields through typed errors only
    for prop in ("driver_version", "vbios_version", "msr_counts"):
        with contextlib.suppress(VeilAttestationError):
            getattr(report.opaque, prop)


@_FUZZ
@given(blob=st.binary(max_size=600))
def test_fuzz_random_bytes(blob: bytes) -> None:
    with contextlib.suppress(VeilAttestationError):
        parse_gpu_report(build_request(bytes(32)) + blob)


def test_slot_mismatch_is_rejected(gpu0: bytes) -> None:
    tampered = bytearray(gpu0)
    tampered[REQUEST_SIZE + 3] = 0x01  # response Param2 names slot 1; slot 0 was requested
    with pytest.raises(MalformedInputError, match="slot"):
        parse_gpu_report(bytes(tampered))


def test_describe_names_every_field(gpu0: bytes, switch0: bytes) -> None:
    described = describe_gpu_report(parse_gpu_report(gpu0))
    json.dumps(described)  # JSON-ready
    assert described["request"]["nonce"] == NONCE.hex()  # type: ignore[index]
    response = described["response"]
    assert isinstance(response, dict)
    assert response["number_of_blocks"] == 64 and len(response["measurements"]) == 64
    names = {f["name"]: f.get("value") for f in response["opaque_data"]}
    assert names["DRIVER_VERSION"] == "590.12" and names["VBIOS_VERSION"] == "96.00.A5.00.01"
    assert names["PROJECT"] == "G520" and names["CHIP_SKU"] == "885" and "FWID" in names
    assert len(names["MSRSCNT"]) == 64  # type: ignore[arg-type]
    switch = describe_gpu_report(parse_gpu_report(switch0))["response"]
    assert "DRIVER_VERSION" not in {f["name"] for f in switch["opaque_data"]}  # type: ignore[index]
