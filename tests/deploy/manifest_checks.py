"""Render the Kubernetes overlays and check the fields security depends on (used by the tests).

``security_findings`` returns every problem it sees in one rendered overlay; an empty list
means the overlay is what a confidential deployment of Veil must be.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from veil.attestation.initdata import ANNOTATION, InitdataError, decode_annotation

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
CONFIDENTIAL = ["kata-qemu-snp", "kata-qemu-tdx", "kata-qemu-nvidia-gpu-snp", "kata-qemu-nvidia-gpu-tdx"]
DIGEST_REF = re.compile(r"^[a-z0-9][a-z0-9._\-/:]*@sha256:[0-9a-f]{64}$")
MIN_KUSTOMIZE = (4, 0)


def pin_module() -> ModuleType:
    """deploy/k8s/pin.py, loaded from its path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("veil_deploy_pin", K8S / "pin.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def kustomize_command() -> tuple[list[str], str] | str:
    """The command that renders a kustomization, and its version; or why there is none."""
    if shutil.which("kustomize"):
        out = subprocess.run(["kustomize", "version"], capture_output=True, text=True, check=False).stdout
        command, version = ["kustomize", "build"], out
    elif shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "version", "--client"], capture_output=True, text=True, check=False, timeout=60
        ).stdout
        command, version = ["kubectl", "kustomize"], out
    else:
        return "no kustomize and no kubectl (make setup installs Debian's kubectl where it can)"
    found = re.search(r"v?(\d+)\.(\d+)\.\d+", version.split("Kustomize Version:")[-1])
    if found is None or (int(found[1]), int(found[2])) < MIN_KUSTOMIZE:
        return f"kustomize older than v{MIN_KUSTOMIZE[0]} ({version.strip()!r}): overlays need `patches:`"
    return command, found[0]


def render(overlay: str | Path) -> list[dict[str, Any]]:
    found = kustomize_command()
    assert not isinstance(found, str), found
    path = overlay if isinstance(overlay, Path) else K8S / "overlays" / overlay
    out = subprocess.run(
        [*found[0], str(path)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one object of ``kind`` (for Services: the ClusterIP one, not the headless one)."""
    (doc,) = [d for d in docs if d["kind"] == kind and d["spec"].get("clusterIP") != "None"]
    return doc


def security_findings(docs: list[dict[str, Any]], overlay: str) -> list[str]:
    """Every field of ``docs`` (one rendered overlay) that a Veil deployment must not have."""
    bad: list[str] = []
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    annotations = deployment["spec"]["template"].get("metadata", {}).get("annotations", {}) or {}
    confidential = overlay in CONFIDENTIAL
    runtime_class = pod.get("runtimeClassName")
    if confidential and runtime_class != overlay:
        bad.append(f"runtimeClassName is {runtime_class!r}, not {overlay!r}")
    if not confidential:
        if runtime_class is not None:
            bad.append("the simulated-TEE overlay names a runtime class")
        if "simulated" not in deployment["metadata"]["name"]:
            bad.append("a non-confidential overlay's names must say simulated")
    pod_sc = pod.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True or not pod_sc.get("runAsUser"):
        bad.append("pod does not run as a non-root user")
    if pod.get("automountServiceAccountToken") is not False:
        bad.append("service account token is mounted")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        bad.append("pod shares a host namespace")
    for volume in pod.get("volumes", []):
        if "hostPath" in volume:
            bad.append(f"volume {volume['name']} is a hostPath")
    for container in pod["containers"] + pod.get("initContainers", []):
        name = container["name"]
        sc = container.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{name}: root filesystem is not read-only")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: privilege escalation is not disabled")
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            bad.append(f"{name}: capabilities are not all dropped")
        if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
            bad.append(f"{name}: runs as root")
        if not DIGEST_REF.match(container["image"]):
            bad.append(f"{name}: image {container['image']!r} is not referenced by digest")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "grpc" not in container.get(probe, {}):
                bad.append(f"{name}: {probe} is not a grpc.health.v1 probe")
        if not container.get("resources", {}).get("requests"):
            bad.append(f"{name}: no resource requests")
    command = pod["containers"][0]["command"]
    tee = command[command.index("--tee") + 1] if "--tee" in command else None
    if tee != ("auto" if confidential else "simulated"):
        bad.append(f"veil serve runs with --tee {tee}")
    if confidential:
        bad.extend(_initdata_findings(annotations, pod, overlay))
    elif ANNOTATION in annotations:
        bad.append("the simulated-TEE overlay carries initdata")
    if "gpu" in overlay:
        limits = pod["containers"][0]["resources"].get("limits", {})
        if limits.get("nvidia.com/pgpu") in (None, "0", 0):
            bad.append("GPU overlay requests no nvidia.com/pgpu")
        if pod.get("nodeSelector", {}).get("nvidia.com/cc.mode") != "on":
            bad.append("GPU overlay does not select nodes with nvidia.com/cc.mode=on")
    bad.extend(_network_findings(docs))
    return bad


def _initdata_findings(annotations: dict[str, str], pod: dict[str, Any], overlay: str) -> list[str]:
    if ANNOTATION not in annotations:
        return [f"no {ANNOTATION} annotation"]
    try:
        initdata = decode_annotation(annotations[ANNOTATION])
    except InitdataError as exc:
        return [f"initdata annotation: {exc}"]
    bad = []
    committed = (K8S / "overlays" / overlay / "initdata.toml").read_bytes()
    if initdata.raw != committed:
        bad.append(f"the annotation does not carry overlays/{overlay}/initdata.toml")
    policy = initdata.data.get("policy.rego", "")
    image = pod["containers"][0]["image"]
    if f'veil_image := "{image}"' not in policy:
        bad.append(f"the agent policy does not pin the Deployment's image {image}")
    for request in ("ExecProcessRequest", "ReadStreamRequest", "SetPolicyRequest"):
        if f"default {request} := false" not in policy or re.search(rf"^{request} if", policy, re.M):
            bad.append(f"the agent policy allows {request}")
    return bad


def _network_findings(docs: list[dict[str, Any]]) -> list[str]:
    policy = by_kind(docs, "NetworkPolicy")["spec"]
    ports = [p for rule in policy.get("ingress", []) for p in rule.get("ports", [])]
    if "Ingress" not in policy.get("policyTypes", []) or [p.get("port") for p in ports] != [50051]:
        return ["NetworkPolicy ingress is not exactly the gRPC port"]
    if any("from" in rule and not rule["from"] for rule in policy.get("ingress", [])):
        return ["NetworkPolicy has an empty from"]
    return []
