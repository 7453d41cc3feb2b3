"""deploy/cvm and deploy/image: the recipes say what the design needs (static checks; the image
itself is built by `make image`, which these tests do not run)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from manifest_checks import ROOT

CVM = ROOT / "deploy" / "cvm"
IMAGE = ROOT / "deploy" / "image"


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (CVM / "veil.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_unit_runs_veil_serve_tee_auto_hardened() -> None:
    unit = _unit()
    (exec_start,) = unit["ExecStart"]
    assert exec_start.startswith("/opt/veil/bin/veil serve --tee auto ")
    for key, value in {
        "User": "veil", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "DevicePolicy": "closed", "LimitCORE": "0", "RestrictSUIDSGID": "yes", "UMask": "0077",
    }.items():  # fmt: skip
        assert unit.get(key) == [value], key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "veil.service"
    unit.write_text((CVM / "veil.service").read_text())
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = [
        line for line in (out.stdout + out.stderr).splitlines() if line and "/opt/veil/bin/veil" not in line
    ]  # the binary itself is absent on this machine; anything else is a unit error
    assert complaints == []


def test_cloud_init_installs_the_same_unit_and_device_rules() -> None:
    text = (CVM / "cloud-init.yaml").read_text()
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    files = {f["path"]: f for f in doc["write_files"]}
    rules = files["/etc/udev/rules.d/99-veil-tee.rules"]["content"].splitlines()
    shipped = [ln for ln in (CVM / "99-veil-tee.rules").read_text().splitlines() if not ln.startswith("#")]
    assert rules == shipped
    commands = [" ".join(c) if isinstance(c, list) else c for c in doc["runcmd"]]
    assert any("sha256sum --check --strict" in c for c in commands)  # the tree is verified before use
    assert any("veil.service" in c and "enable" in c for c in commands)


def _stages() -> list[str]:
    return re.split(r"^FROM ", (IMAGE / "Containerfile").read_text(), flags=re.M)[1:]


def test_the_final_stage_is_runtime_only_and_non_root() -> None:
    build, runtime = _stages()
    assert build.startswith("${BUILDER_BASE} AS build") and runtime.startswith("${RUNTIME_BASE} AS runtime")
    assert not re.search(r"^RUN ", runtime, re.M)  # nothing installed or run in the final stage
    assert "g++" not in runtime and "pip install" not in runtime
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert 'ENTRYPOINT ["/opt/veil/bin/veil", "serve", "--tee", "auto"]' in runtime
    assert "--require-hashes" in build and "PIP_NO_INDEX=1" in build
    assert "pip uninstall --quiet --yes ninja pip" in build  # no build tool is copied onward


def test_the_build_script_pins_bases_and_checks_wheel_hashes() -> None:
    script = (IMAGE / "build.sh").read_text()
    assert "is not pinned by digest" in script
    assert "--timestamp" in script and "SOURCE_DATE_EPOCH" in script
    assert "not a hash its lock file names" in script
    for lock in ("requirements/enclave.txt", "requirements/model.txt", "deploy/image/torch-cpu.txt"):
        assert lock in script
        assert (ROOT / lock).exists()
    torch = (IMAGE / "torch-cpu.txt").read_text()
    assert re.search(r"^torch==2\.13\.0\+cpu \\\n    --hash=sha256:[0-9a-f]{64}$", torch, re.M)
