"""``veil release keygen|build|sign|verify|show`` and ``veil attest verify --release`` (issue #11)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from veil.attestation.snp.report import parse_snp_report
from veil.cli import main

VIRTEE_AT = "2024-01-01"


def veil(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    key = tmp_path / "publisher.key"
    code, out, _ = veil(capsys, "release", "keygen", "-o", key)
    assert code == 0 and "key id" in out
    assert key.stat().st_mode & 0o777 == 0o600
    code, _, err = veil(capsys, "release", "keygen", "-o", key)
    assert code == 2 and "cannot write" in err  # never overwrites a key
    return key, Path(str(key) + ".pub")


def _manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: Path, measurement: str, platform: str = "SEV_SNP"
) -> Path:
    measured = tmp_path / "measurement.txt"
    measured.write_text(measurement + "\n")  # what `veil measure snp > FILE` writes
    report = tmp_path / "policy-report.txt"
    report.write_text("12 passed\n")
    statement = tmp_path / "statement.json"
    code, out, err = veil(
        capsys, "release", "build", "-o", statement, "--name", "v9.9.9", "--build-digest", "ab" * 32,
        "--platform", platform, "--measurement-file", measured, "--model-digest", "cd" * 32,
        "--data-policy-digest", "ef" * 32, "--policy-test-report", report, "--gpu-count", "0",
        "--tcb-floor", "Milan:bootloader=3,tee=0,snp=8,microcode=115", "--host-data", "00" * 32,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = veil(
        capsys, "release", "build", "-o", statement, "--add-to", statement, "--platform", "TDX",
        "--mrtd", "11" * 48, "--rtmr", "0=" + "22" * 48, "--tdx-status", "UpToDate",
    )  # fmt: skip
    assert code == 0, err
    manifest = tmp_path / "release.json"
    code, out, err = veil(capsys, "release", "sign", statement, "--key", key, "-o", manifest)
    assert code == 0 and "signed by key id" in out, err
    return manifest


def test_build_sign_verify_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Path, Path]
) -> None:
    key, pub = keys
    manifest = _manifest(tmp_path, capsys, key, "77" * 48)
    code, out, _ = veil(capsys, "release", "verify", manifest, "--publisher-key", pub)
    assert code == 0 and "policy.release pass" in out and "SEV_SNP, TDX" in out
    code, out, _ = veil(capsys, "release", "show", manifest)
    assert code == 0 and "NOT verified" in out and "77" * 48 in out and '"rtmr"' not in out.split("TDX")[0]
    for field in (
        "measurements",
        "model_digests",
        "data_policy_digest",
        "policy_test_report_digest",
        "tcb_floor",
    ):
        assert field in out, field
    code, out, _ = veil(capsys, "release", "show", manifest, "--json")
    doc = json.loads(out)
    assert doc["verified"] is False and doc["predicate"]["platforms"]["TDX"]["rtmr"][0] == ["22" * 48]
    # an unknown publisher key, a bad signature: exit 1 naming policy.release
    other = tmp_path / "other.key"
    veil(capsys, "release", "keygen", "-o", other)
    code, _, err = veil(capsys, "release", "verify", manifest, "--publisher-key", f"{other}.pub")
    assert code == 1 and "policy.release fail" in err and "unknown publisher key" in err
    envelope = json.loads(manifest.read_text())
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[0] ^= 1
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(envelope))
    code, _, err = veil(capsys, "release", "verify", tampered, "--publisher-key", pub)
    assert code == 1 and "bad signature" in err
    code, _, err = veil(capsys, "release", "build", "-o", tmp_path / "x.json", "--platform", "SEV_SNP")
    assert code == 2 and "--name" in err


def test_attest_verify_with_a_release(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: tuple[Path, Path]
) -> None:
    d = evidence_dir / "snp/virtee-sev"
    raw = bytes.fromhex((d / "report_milan.hex").read_text().strip())
    args = ("attest", "verify", d / "report_milan.hex", "--certs", d / "vcek_milan.der", "--at", VIRTEE_AT)
    args = (*args, "--offline", "--json")

    def failed(out: str) -> set[str]:
        return {c["name"] for c in json.loads(out)["checks"] if c["status"] == "fail"}

    # the default policy refuses a genuine report whose code nobody pinned (and below the floor)
    code, out, _ = veil(capsys, *args)
    assert code == 1 and failed(out) == {"policy.measurement", "policy.min_tcb"}
    code, out, err = veil(capsys, *args, "--any-measurement")
    assert code == 1 and failed(out) == {"policy.min_tcb"} and "NOT pinned" in err
    # a manifest naming its measurement (and a floor it meets) pins it
    key, pub = keys
    manifest = _manifest(tmp_path, capsys, key, parse_snp_report(raw).measurement.hex())
    code, out, _ = veil(capsys, *args, "--release", manifest, "--publisher-key", pub)
    assert code == 0, failed(out)
    # another key, or a measurement the manifest does not name
    other = tmp_path / "other.key"
    veil(capsys, "release", "keygen", "-o", other)
    code, out, _ = veil(capsys, *args, "--release", manifest, "--publisher-key", f"{other}.pub")
    assert code == 1 and failed(out) == {"policy.release"}
    wrong = _manifest(tmp_path, capsys, key, "00" * 48)
    code, out, _ = veil(capsys, *args, "--release", wrong, "--publisher-key", pub)
    assert code == 1 and failed(out) == {"policy.measurement"}
    code, _, err = veil(capsys, *args, "--release", manifest)
    assert code == 2 and "--publisher-key" in err
