"""NVIDIA GPU / NVSwitch verification: the real HGX evidence (8× H100, 4× NVSwitch) and Trustee chains."""

from __future__ import annotations

import functools
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.attestation.errors import MalformedInputError
from veil.attestation.nvidia.certs import (
    NVIDIA_DEVICE_ROOT_SHA256,
    NVIDIA_RIM_ROOT_SHA256,
    TCB_INFO_OID,
    encode_tcb_info_fwid,
    leaf_fwid,
    load_cert_chain,
    nvidia_device_root,
    nvidia_rim_root,
)
from veil.attestation.nvidia.report import parse_gpu_report
from veil.attestation.nvidia.verify import (
    GpuPolicy,
    gpu_rim_ids,
    load_nvtrust_evidence,
    verify_gpu_cert_chain,
    verify_gpus,
)
from veil.attestation.nvidia.verify import verify_gpu as _verify_gpu
from veil.attestation.options import VerifyOptions
from veil.attestation.verdict import CheckStatus, Verdict

# Issue #11: the default GpuPolicy fails a report without RIMs and OCSP. The tests here pin the
# other checks, so they verify under the explicit opt-out unless they pass a policy themselves;
# tests/attestation/test_gpu_defaults.py pins the strict default.
EXPLORING = GpuPolicy.exploring()
verify_gpu = functools.partial(_verify_gpu, policy=EXPLORING)


NONCE = bytes.fromhex("4760e30534a0621357d458b1a7936551b5dc4cd1e69718adf7ed9fb0252a537e")
# Every certificate of the nvtrust chains is valid from 2022-03-01 (the provisioner ICA) to 9999.
NOW = datetime(2025, 10, 1, tzinfo=UTC)
BEFORE = datetime(2022, 1, 1, tzinfo=UTC)  # before the provisioner ICA's notBefore
TODAY = datetime(2026, 11, 22, tzinfo=UTC)
DEVICES = [(f"gpu{i}", "gpu") for i in range(8)] + [(f"switch{i}", "nvswitch") for i in range(4)]
REPO_ROOTS = Path(__file__).resolve().parents[2] / "attestation" / "veil" / "attestation" / "roots"


def _load(evidence_dir: Path, name: str) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    base = evidence_dir / "nvidia_gpu" / "nvtrust" / "decoded"
    return (base / f"{name}_evidence.bin").read_bytes(), load_cert_chain(
        (base / f"{name}_certchain.pem").read_bytes()
    )


def _status(verdict: Verdict, name: str) -> CheckStatus:
    check = verdict.get(name)
    assert check is not None, f"{name} missing from {[c.name for c in verdict.checks]}"
    return check.status


PASS, FAIL, SKIP = CheckStatus.PASS, CheckStatus.FAIL, CheckStatus.SKIP


@pytest.mark.parametrize(("name", "kind"), DEVICES)
def test_real_device_passes_signature_chain_nonce(evidence_dir: Path, name: str, kind: str) -> None:
    data, chain = _load(evidence_dir, name)
    v = verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=NONCE, kind=kind, prefix=f"{kind}[{name[-1]}]")  # type: ignore[arg-type]
    p = f"{kind}[{name[-1]}]"
    assert v.ok, v.table()
    for check in (
        "report.parse",
        "signature",
        "chain",
        "chain.validity",
        "chain.leaf",
        "nonce",
        "vbios_version",
    ):
        assert _status(v, f"{p}.{check}") is PASS
    if kind == "gpu":
        assert _status(v, f"{p}.fwid") is PASS
        assert _status(v, f"{p}.driver_version") is PASS
        assert v.get(f"{p}.driver_version").detail == "590.12"  # type: ignore[union-attr]
    else:
        assert _status(v, f"{p}.fwid") is SKIP
        assert _status(v, f"{p}.driver_version") is SKIP
    assert _status(v, f"{p}.ocsp") is SKIP and "offline" in v.get(f"{p}.ocsp").detail  # type: ignore[union-attr]
    assert _status(v, f"{p}.measurements") is SKIP


@pytest.mark.parametrize(("name", "kind"), DEVICES)
def test_real_device_rejected_before_its_chain_is_valid(evidence_dir: Path, name: str, kind: str) -> None:
    data, chain = _load(evidence_dir, name)
    v = verify_gpu(data, chain, VerifyOptions(now=BEFORE), nonce=NONCE, kind=kind)  # type: ignore[arg-type]
    assert not v.ok
    assert [c.name for c in v.failed] == [f"{kind}.chain.validity"]
    assert "not valid before 2022-03-01" in v.failed[0].detail


def test_real_chains_stay_valid_today(evidence_dir: Path) -> None:
    """NVIDIA device certificates run to 9999: offline, today's date is inside their window."""
    data, chain = _load(evidence_dir, "gpu0")
    assert verify_gpu(data, chain, VerifyOptions(now=TODAY), nonce=NONCE).ok


def test_wrong_nonce_fails_the_nonce_check_only(evidence_dir: Path) -> None:
    data, chain = _load(evidence_dir, "gpu3")
    wrong = bytes(32)
    v = verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=wrong, prefix="gpu[3]")
    assert [c.name for c in v.failed] == ["gpu[3].nonce"]
    skipped = verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=None)
    assert _status(skipped, "gpu.nonce") is SKIP
    short = verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=b"\x47")
    assert _status(short, "gpu.nonce") is FAIL


@pytest.mark.parametrize(("name", "kind"), DEVICES)
def test_flipping_signed_bytes_fails_the_signature(evidence_dir: Path, name: str, kind: str) -> None:
    """Every byte of request ‖ response-without-signature, and of the signature, is covered:
    exhaustively on gpu0 and switch0, on every 11th byte (and the whole request) of the others."""
    data, chain = _load(evidence_dir, name)
    report = parse_gpu_report(data)
    exhaustive = name in ("gpu0", "switch0")
    positions = (
        range(len(data)) if exhaustive else sorted({*range(37), *range(0, len(data), 11), len(data) - 1})
    )
    checked = 0
    for pos in positions:
        tampered = bytearray(data)
        tampered[pos] ^= 0x01
        try:
            parsed = parse_gpu_report(bytes(tampered))
        except MalformedInputError:
            continue  # structure bytes: the report no longer parses, so it is rejected anyway
        assert parsed.signed_bytes != report.signed_bytes or parsed.signature != report.signature
        v = verify_gpu(parsed, chain, VerifyOptions(now=NOW), nonce=NONCE, kind=kind)  # type: ignore[arg-type]
        assert _status(v, f"{kind}.signature") is FAIL, pos
        checked += 1
    assert checked > 0.8 * len(positions)  # only length/header bytes make a report unparseable


def test_tampered_bytes_reported_as_parse_or_signature_failure(evidence_dir: Path) -> None:
    data, chain = _load(evidence_dir, "gpu0")
    truncated = verify_gpu(data[:100], chain, VerifyOptions(now=NOW), nonce=NONCE)
    assert [c.name for c in truncated.checks] == ["gpu.report.parse"] and not truncated.ok
    bad_sig = data[:-1] + bytes([data[-1] ^ 0xFF])
    assert [c.name for c in verify_gpu(bad_sig, chain, VerifyOptions(now=NOW), nonce=NONCE).failed] == [
        "gpu.signature"
    ]


def test_another_gpus_chain_does_not_verify_the_report(evidence_dir: Path) -> None:
    data, _ = _load(evidence_dir, "gpu0")
    _, other_chain = _load(evidence_dir, "gpu1")
    v = verify_gpu(data, other_chain, VerifyOptions(now=NOW), nonce=NONCE)
    assert _status(v, "gpu.signature") is FAIL
    assert _status(v, "gpu.chain") is PASS  # gpu1's chain is itself genuine


def test_switch_report_checked_as_gpu_fails_fwid(evidence_dir: Path) -> None:
    data, chain = _load(evidence_dir, "switch0")
    v = verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=NONCE, kind="gpu")
    assert _status(v, "gpu.fwid") is FAIL
    assert _status(v, "gpu.driver_version") is FAIL


def test_untrusted_root_fails_the_chain(evidence_dir: Path) -> None:
    data, chain = _load(evidence_dir, "gpu0")
    other_root = load_cert_chain(
        (evidence_dir / "nvidia_gpu/nv-local-gpu-verifier-2.7.3/verifier_RIM_root.pem").read_bytes()
    )[0]
    v = verify_gpu(data, chain, VerifyOptions(now=NOW, trusted_roots=(other_root,)), nonce=NONCE)
    assert _status(v, "gpu.chain") is FAIL and "trusted root" in v.get("gpu.chain").detail  # type: ignore[union-attr]
    # the chain without its root still verifies to the pinned root
    assert verify_gpu(data, chain[:-1], VerifyOptions(now=NOW), nonce=NONCE).ok


def test_policy_versions(evidence_dir: Path) -> None:
    data, chain = _load(evidence_dir, "gpu0")
    good = GpuPolicy.exploring(
        driver_versions=frozenset({"590.12"}), vbios_versions=frozenset({"96.00.A5.00.01"})
    )
    assert verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=NONCE, policy=good).ok
    bad = GpuPolicy.exploring(driver_versions=frozenset({"550.90.07"}))
    v = verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=NONCE, policy=bad)
    assert [c.name for c in v.failed] == ["gpu.driver_version"]


def test_rim_ids_of_the_real_reports(evidence_dir: Path) -> None:
    gpu = parse_gpu_report(_load(evidence_dir, "gpu0")[0])
    switch = parse_gpu_report(_load(evidence_dir, "switch0")[0])
    assert gpu_rim_ids(gpu) == {
        "driver": "NV_GPU_DRIVER_GH100_590.12",
        "vbios": "NV_GPU_VBIOS_G520_0200_885_9600A50001",
    }
    assert gpu_rim_ids(switch, "nvswitch") == {"vbios": "NV_SWITCH_BIOS_5612_0002_890_9610730001"}


def test_now_must_be_aware(evidence_dir: Path) -> None:
    data, chain = _load(evidence_dir, "gpu0")
    with pytest.raises(MalformedInputError):
        verify_gpu(data, chain, VerifyOptions(now=datetime(2025, 1, 1)), nonce=NONCE)


def test_one_report_verifies_within_10_ms(evidence_dir: Path) -> None:
    data, chain = _load(evidence_dir, "gpu0")
    verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=NONCE)  # warm the chain cache
    times = []
    for _ in range(30):
        start = time.perf_counter()
        verdict = verify_gpu(data, chain, VerifyOptions(now=NOW), nonce=NONCE)
        times.append(time.perf_counter() - start)
        assert verdict.ok
    assert statistics.median(times) < 0.010, times


# -- Trustee certificate-chain cases -------------------------------------------------------------


def _trustee(evidence_dir: Path, case: int) -> tuple[x509.Certificate, ...]:
    return load_cert_chain(
        (evidence_dir / "nvidia_gpu" / "trustee" / f"hopper_cert_chain_case{case}.txt").read_bytes()
    )


def test_trustee_case1_valid_chain(evidence_dir: Path) -> None:
    v = verify_gpu_cert_chain(_trustee(evidence_dir, 1), VerifyOptions(now=NOW))
    assert v.ok, v.table()
    signing = load_cert_chain((evidence_dir / "nvidia_gpu/trustee/hopper_signing_cert.pem").read_bytes())[0]
    assert _trustee(evidence_dir, 1)[0] == signing
    fwid = leaf_fwid(signing)
    assert fwid is not None and fwid.hex().startswith("f5c384ae") and fwid.hex().endswith("f75d")
    assert v.get("gpu.fwid").detail == f"leaf FWID {fwid.hex()}"  # type: ignore[union-attr]


def test_trustee_case2_only_root(evidence_dir: Path) -> None:
    """Trustee: "Certificate chain must have at least the root CA and signing certificates"."""
    v = verify_gpu_cert_chain(_trustee(evidence_dir, 2), VerifyOptions(now=NOW))
    assert not v.ok
    assert _status(v, "gpu.chain") is FAIL
    assert "at least the root CA and the signing certificate" in v.get("gpu.chain").detail  # type: ignore[union-attr]


def test_trustee_case3_missing_intermediate(evidence_dir: Path) -> None:
    """Trustee: "Report certificate chain failed to verify" (the provisioner ICA is missing)."""
    v = verify_gpu_cert_chain(_trustee(evidence_dir, 3), VerifyOptions(now=NOW))
    assert [c.name for c in v.failed] == ["gpu.chain"]
    assert v.get("gpu.chain").detail == "GH100 A01 GSP BROM is not issued by NVIDIA GH100 Identity"  # type: ignore[union-attr]


def test_trustee_case4_missing_leaf(evidence_dir: Path) -> None:
    """Trustee: "FwId oid not found in the NVIDIA signing certificate" (the FMC leaf is missing)."""
    v = verify_gpu_cert_chain(_trustee(evidence_dir, 4), VerifyOptions(now=NOW))
    assert not v.ok
    assert _status(v, "gpu.fwid") is FAIL
    assert "FWID (OID 2.23.133.5.4.1) not found in the leaf GH100 A01 GSP BROM" in v.get("gpu.fwid").detail  # type: ignore[union-attr]
    assert _status(v, "gpu.chain.leaf") is FAIL  # and the "leaf" is a CA, not a signing key
    assert _status(v, "gpu.chain") is PASS  # what is left is a genuine (shorter) chain


def test_trustee_cases_rejected_before_validity(evidence_dir: Path) -> None:
    v = verify_gpu_cert_chain(_trustee(evidence_dir, 1), VerifyOptions(now=BEFORE))
    assert [c.name for c in v.failed] == ["gpu.chain.validity"]


# -- pinned roots -------------------------------------------------------------------------------


def test_shipped_roots_equal_the_vendor_files(evidence_dir: Path) -> None:
    gpu = evidence_dir / "nvidia_gpu"
    device = nvidia_device_root()
    for f in (
        "nv-local-gpu-verifier-2.7.3/verifier_device_root.pem",
        "nvtrust/verifier_device_root.pem",
        "nvtrust/switch_verifier_device_root.pem",  # the NVSwitch root is the same certificate
        "trustee/nvidia_device_root.pem",
    ):
        assert load_cert_chain((gpu / f).read_bytes()) == (device,), f
    rim_root = nvidia_rim_root()
    assert load_cert_chain((gpu / "nv-local-gpu-verifier-2.7.3/verifier_RIM_root.pem").read_bytes()) == (
        rim_root,
    )
    assert device.fingerprint(hashes.SHA256()).hex() == NVIDIA_DEVICE_ROOT_SHA256
    assert rim_root.fingerprint(hashes.SHA256()).hex() == NVIDIA_RIM_ROOT_SHA256
    assert (REPO_ROOTS / "nvidia_device_root.pem").read_bytes() == (
        gpu / "nv-local-gpu-verifier-2.7.3/verifier_device_root.pem"
    ).read_bytes()
    assert (REPO_ROOTS / "nvidia_rim_root.pem").read_bytes() == (
        gpu / "nv-local-gpu-verifier-2.7.3/verifier_RIM_root.pem"
    ).read_bytes()


# -- NVIDIA's evidence-list JSON, the whole HGX system at once ----------------------------------


def test_whole_hgx_system_from_nvidia_json(evidence_dir: Path) -> None:
    base = evidence_dir / "nvidia_gpu" / "nvtrust"
    entries = load_nvtrust_evidence((base / "gpu_evidence.json").read_bytes()) + load_nvtrust_evidence(
        (base / "switch_evidence.json").read_bytes()
    )
    assert [e.kind for e in entries] == ["gpu"] * 8 + ["nvswitch"] * 4
    assert {e.nonce for e in entries} == {NONCE}
    devices = [(e.report, e.cert_chain, e.kind) for e in entries]
    v = verify_gpus(devices, VerifyOptions(now=NOW), nonce=NONCE, policy=EXPLORING)
    assert v.ok, v.table()
    assert v.get("gpu[7].fwid").status is PASS and v.get("nvswitch[3].signature").status is PASS  # type: ignore[union-attr]
    assert not verify_gpus(devices, VerifyOptions(now=NOW), nonce=bytes(32), policy=EXPLORING).ok
    assert not verify_gpus([], VerifyOptions(now=NOW), nonce=NONCE).ok


@pytest.mark.parametrize(
    "doc",
    [b"", b"{}", b"[]", b"[1]", b'[{"arch": "AMPERE"}]', b'[{"arch": "HOPPER", "nonce": "zz"}]'],
)
def test_bad_evidence_lists_are_typed(doc: bytes) -> None:
    with pytest.raises(MalformedInputError):
        load_nvtrust_evidence(doc)


@settings(max_examples=80, deadline=None)
@given(value=st.binary(max_size=200))
def test_fuzz_tcb_info_extension(value: bytes) -> None:
    cert = _cert_with_tcb_info(value)
    try:
        fwid = leaf_fwid(cert)
    except MalformedInputError:
        return
    assert fwid is None or isinstance(fwid, bytes)


_FUZZ_KEY = ec.generate_private_key(ec.SECP384R1())


def _cert_with_tcb_info(value: bytes) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "fuzz")])
    return (
        x509.CertificateBuilder(
            issuer_name=name,
            subject_name=name,
            public_key=_FUZZ_KEY.public_key(),
            serial_number=1,
            not_valid_before=NOW,
            not_valid_after=NOW,
        )
        .add_extension(x509.UnrecognizedExtension(TCB_INFO_OID, value), critical=False)
        .sign(_FUZZ_KEY, hashes.SHA384())
    )


def test_tcb_info_encodings() -> None:
    fwid = bytes(range(48))
    assert leaf_fwid(_cert_with_tcb_info(encode_tcb_info_fwid(fwid))) == fwid
    with pytest.raises(MalformedInputError):
        leaf_fwid(_cert_with_tcb_info(b"\x30\x00"))  # a TcbInfo without an FWID
    with pytest.raises(MalformedInputError):
        encode_tcb_info_fwid(b"short")
