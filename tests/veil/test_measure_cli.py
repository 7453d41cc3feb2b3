"""``veil measure snp`` reproduces what the reference tool computes on the same firmware."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from veil.cli import main

OVMF = Path("/usr/share/ovmf/OVMF.fd")
pytestmark = pytest.mark.skipif(not OVMF.is_file(), reason="OVMF not installed (make setup installs it)")


@pytest.mark.parametrize(("vcpus", "vcpu_type"), [(1, "EPYC-v4"), (4, "EPYC-Milan"), (8, "EPYC-Genoa")])
def test_matches_sev_snp_measure(vcpus: int, vcpu_type: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "snp", "--ovmf", str(OVMF), "--vcpus", str(vcpus), "--vcpu-type", vcpu_type]) == 0
    ours = capsys.readouterr().out.strip()
    tool = shutil.which("sev-snp-measure") or str(Path(sys.executable).parent / "sev-snp-measure")
    ref = subprocess.run(
        [tool, "--mode", "snp", "--vcpus", str(vcpus), "--vcpu-type", vcpu_type, "--ovmf", str(OVMF)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    assert len(bytes.fromhex(ours)) == 48
    assert ours == ref


def test_vcpu_count_changes_the_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    digests = set()
    for vcpus in (1, 2):
        assert (
            main(["measure", "snp", "--ovmf", str(OVMF), "--vcpus", str(vcpus), "--vcpu-type", "EPYC-v4"])
            == 0
        )
        digests.add(capsys.readouterr().out.strip())
    assert len(digests) == 2


def test_bad_input_exits_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["measure", "snp", "--ovmf", str(tmp_path / "nope.fd"), "--vcpus", "1", "--vcpu-type", "EPYC"])
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert main(["measure", "snp", "--ovmf", str(OVMF), "--vcpus", "1", "--vcpu-type", "Pentium"]) == 2
    assert "unknown vCPU type" in capsys.readouterr().err
    junk = tmp_path / "junk.fd"
    junk.write_bytes(b"\x00" * 4096)
    assert main(["measure", "snp", "--ovmf", str(junk), "--vcpus", "1", "--vcpu-type", "EPYC-v4"]) == 2
    assert "cannot measure" in capsys.readouterr().err
