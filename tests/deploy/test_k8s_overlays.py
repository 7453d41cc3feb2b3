"""deploy/k8s: every overlay renders, validates against the Kubernetes schemas offline, and holds
the fields security depends on; the checker catches each way of getting them wrong."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from manifest_checks import (
    CONFIDENTIAL,
    K8S,
    OVERLAYS,
    ROOT,
    by_kind,
    kustomize_command,
    pin_module,
    render,
    security_findings,
)

from veil.attestation.initdata import ANNOTATION, decode_annotation, parse_initdata
from veil.attestation.release import Release
from veil.cli import main

# The oldest Kubernetes the manifests are written for (gRPC probes are GA since 1.27) and the
# newest schema set kubernetes-validate ships; both must accept every object.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())

needs_kustomize = pytest.mark.skipif(
    isinstance(kustomize_command(), str), reason=f"cannot render overlays: {kustomize_command()}"
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def test_the_overlays_are_the_ones_named() -> None:
    assert sorted([*CONFIDENTIAL, "dev-simulated-tee"]) == OVERLAYS


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_offline(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    assert sorted(d["kind"] for d in docs) == [
        "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service",
    ]  # fmt: skip
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any schema error


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_fields(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    assert security_findings(rendered[overlay], overlay) == []


@needs_kustomize
def test_selectors_bind_the_service_pdb_and_network_policy_to_the_pods(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for docs in rendered.values():
        labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        selectors = [
            *(d["spec"]["selector"] for d in docs if d["kind"] == "Service"),
            by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            by_kind(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        ]
        for selector in selectors:
            assert selector and selector.items() <= labels.items()


_POD = ["spec", "template", "spec"]
_C = [*_POD, "containers", 0]


def _mutations() -> list[tuple[str, list[Any], Any]]:
    """(what, key path into the Deployment, new value or None to delete): each must be caught."""
    return [
        ("image by tag", [*_C, "image"], "localhost/veil:latest"),
        ("image by a digest-like tag", [*_C, "image"], "localhost/veil:sha256-" + "0" * 64),
        ("writable root", [*_C, "securityContext", "readOnlyRootFilesystem"], False),
        ("privilege escalation", [*_C, "securityContext", "allowPrivilegeEscalation"], True),
        ("root user", [*_POD, "securityContext", "runAsNonRoot"], False),
        ("privileged", [*_C, "securityContext", "privileged"], True),
        ("no runtime class", [*_POD, "runtimeClassName"], None),
        ("other runtime class", [*_POD, "runtimeClassName"], "kata-qemu"),
        ("simulated TEE", [*_C, "command"], ["/opt/veil/bin/veil", "serve", "--tee", "simulated"]),
        ("no initdata", ["spec", "template", "metadata", "annotations", ANNOTATION], None),
        ("tcp probe", [*_C, "readinessProbe"], {"tcpSocket": {"port": 50051}}),
        ("host network", [*_POD, "hostNetwork"], True),
    ]


def _set(doc: Any, path: list[Any], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    if value is None:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


@needs_kustomize
@pytest.mark.parametrize(("what", "path", "value"), _mutations(), ids=[m[0] for m in _mutations()])
def test_each_weakened_field_is_caught(
    rendered: dict[str, list[dict[str, Any]]], what: str, path: list[Any], value: Any
) -> None:
    docs = copy.deepcopy(rendered["kata-qemu-snp"])
    _set(by_kind(docs, "Deployment"), path, value)
    assert security_findings(docs, "kata-qemu-snp"), f"{what} was not caught"


@needs_kustomize
def test_a_tree_that_names_the_image_by_tag_fails_when_rendered(tmp_path: Path) -> None:
    """The same check on a real render: the base kustomization naming a tag instead of a digest."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    base = tree / "base" / "kustomization.yaml"
    text = re.sub(r"digest: sha256:[0-9a-f]{64}", "newTag: v1.0.0", base.read_text())
    base.write_text(text)
    docs = render(tree / "overlays" / "kata-qemu-snp")
    image = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(":v1.0.0")
    findings = security_findings(docs, "kata-qemu-snp")
    assert any("is not referenced by digest" in f for f in findings), findings
    assert any("does not pin the Deployment's image" in f for f in findings), findings


@needs_kustomize
@pytest.mark.parametrize("overlay", CONFIDENTIAL)
def test_the_release_manifest_pins_the_rendered_initdata(
    rendered: dict[str, list[dict[str, Any]]],
    overlay: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`veil release build --initdata overlays/X/initdata.toml` names exactly what the pod carries."""
    deployment = by_kind(rendered[overlay], "Deployment")
    carried = decode_annotation(deployment["spec"]["template"]["metadata"]["annotations"][ANNOTATION])
    platform = "TDX" if overlay.endswith("tdx") else "SEV_SNP"
    statement = tmp_path / "statement.json"
    code = main([
        "release", "build", "-o", str(statement), "--name", "v1", "--build-digest", "ab" * 32,
        "--platform", platform, "--initdata", str(K8S / "overlays" / overlay / "initdata.toml"),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (pins,) = Release.from_statement(json.loads(statement.read_text())).platforms.values()
    if platform == "TDX":
        assert pins.mr_config_id == carried.mr_config_id and pins.host_data is None
    else:
        assert pins.host_data == carried.host_data and pins.mr_config_id is None


def test_pinned_files_are_up_to_date() -> None:
    """base image, initdata.toml and the annotation patches agree (pin.py --check)."""
    pin = pin_module()
    assert pin.main(["--check"]) == 0


def test_pinning_another_image_rewrites_every_place_it_is_named(tmp_path: Path) -> None:
    pin = pin_module()
    image = "registry.example.org/veil@sha256:" + "ab" * 32
    files = pin.expected_files(image)
    assert set(files) == {
        K8S / "base" / "kustomization.yaml",
        *(K8S / "overlays" / o / f for o in CONFIDENTIAL for f in ("initdata.toml", "initdata.yaml")),
    }
    initdata = parse_initdata(files[K8S / "overlays" / "kata-qemu-tdx" / "initdata.toml"].encode())
    assert f'veil_image := "{image}"' in initdata.data["policy.rego"]
    assert "newName: registry.example.org/veil" in files[K8S / "base" / "kustomization.yaml"]
    assert "digest: sha256:" + "ab" * 32 in files[K8S / "base" / "kustomization.yaml"]
    current = parse_initdata((K8S / "overlays" / "kata-qemu-tdx" / "initdata.toml").read_bytes())
    assert initdata.mr_config_id != current.mr_config_id  # another image: another launch identity
    with pytest.raises(SystemExit, match="NAME@sha256"):
        pin.expected_files("registry.example.org/veil:v1")


def test_policy_allows_the_image_environment_and_command_line() -> None:
    pin = pin_module()
    env = pin.image_env((ROOT / "deploy" / "image" / "Containerfile").read_text())
    assert "VEIL_STATE_DIR=/var/lib/veil" in env and "PYTHONSAFEPATH=1" in env
    assert all("=" in e and " " not in e for e in env)
    policy = parse_initdata((K8S / "overlays" / "kata-qemu-snp" / "initdata.toml").read_bytes()).data
    assert json.dumps(sorted(env)) in policy["policy.rego"]
