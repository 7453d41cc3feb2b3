"""The Kata agent policy inside the initdata, evaluated on the requests the host would send.

The policy is Rego; the Kata agent evaluates it with regorus. Here it runs on rego-cpp
(``regopy``), an independent implementation of the same language, over inputs shaped like the
agent's (``CreateContainerRequest``: ``OCI`` spec and ``storages``; see Kata's
``src/tools/genpolicy/rules.rego``).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch  # noqa: F401  (before regopy: torch loaded after rego-cpp's library aborts the process)

# isort: split
import regopy  # in the dev lock: the policy is evaluated, never skipped
from manifest_checks import CONFIDENTIAL, K8S, ROOT, pin_module

from veil.attestation.initdata import parse_initdata

IMAGE_PREFIX = 'veil_image := "'
K8S_ENV = [
    "HOSTNAME=veil-5d8f7c9b6-x2x7q",
    "KUBERNETES_SERVICE_HOST=10.96.0.1",
    "KUBERNETES_SERVICE_PORT=443",
]
LIFECYCLE = [
    "CreateSandboxRequest", "StartContainerRequest", "WaitProcessRequest",
    "SignalProcessRequest", "RemoveContainerRequest", "DestroySandboxRequest",
]  # fmt: skip
DENIED = [
    "ExecProcessRequest", "ReadStreamRequest", "SetPolicyRequest", "WriteStreamRequest",
    "PullImageRequest", "UpdateContainerRequest", "GetDiagnosticDataRequest",
]  # fmt: skip


@pytest.fixture(scope="module")
def policy() -> str:
    texts = {
        parse_initdata((K8S / "overlays" / o / "initdata.toml").read_bytes()).data["policy.rego"]
        for o in CONFIDENTIAL
    }
    assert len(texts) == 1  # one policy for every confidential overlay
    return texts.pop()


def _image(policy: str) -> str:
    start = policy.index(IMAGE_PREFIX) + len(IMAGE_PREFIX)
    return policy[start : policy.index('"', start)]


def allowed(policy: str, request: str, data: dict[str, Any]) -> bool:
    interpreter = regopy.Interpreter()
    interpreter.add_module("policy.rego", policy)
    interpreter.set_input_term(json.dumps(data))
    out = interpreter.query(f"x = data.agent_policy.{request}")
    result = json.loads(str(out))
    assert "bindings" in result, out  # an evaluation error is a test failure, never "denied"
    return result["bindings"]["x"] is True


def workload(policy: str) -> dict[str, Any]:
    """The CreateContainerRequest of the Deployment's container, as the agent receives it."""
    pin = pin_module()
    _, deployment = pin._base()
    image = _image(policy)
    env = pin.image_env((ROOT / "deploy" / "image" / "Containerfile").read_text())
    mounts = ["/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/dev/shm",
              "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/termination-log",
              "/var/lib/veil", "/tmp"]  # fmt: skip
    return {
        "OCI": {
            "Annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.image-name": image,
            },
            "Process": {
                "Args": pin.container_args(deployment),
                "Env": [*env, *K8S_ENV],
                "User": {"UID": 10001, "GID": 10001},
                "NoNewPrivileges": True,
                "Capabilities": {"Bounding": [], "Effective": [], "Permitted": [], "Inheritable": []},
            },
            "Root": {"Readonly": True, "Path": "/run/kata-containers/shared/containers/abc/rootfs"},
            "Mounts": [{"destination": m, "type_": "bind", "options": []} for m in mounts],
        },
        "storages": [{"driver": "image_guest_pull", "source": image, "mount_point": "/x"}],
    }


def test_the_pinned_workload_and_the_pause_container_are_allowed(policy: str) -> None:
    assert allowed(policy, "CreateContainerRequest", workload(policy))
    sandbox = {"OCI": {"Annotations": {"io.kubernetes.cri.container-type": "sandbox"}}, "storages": []}
    assert allowed(policy, "CreateContainerRequest", sandbox)


def _other_image(request: dict[str, Any]) -> None:
    other = "localhost/veil@sha256:" + "ee" * 32
    request["OCI"]["Annotations"]["io.kubernetes.cri.image-name"] = other
    request["storages"][0]["source"] = other


def _storage_only(request: dict[str, Any]) -> None:  # annotation says Veil, the guest pulls another
    request["storages"][0]["source"] = "localhost/veil:latest"


@pytest.mark.parametrize(
    ("what", "change"),
    [
        ("another image", _other_image),
        ("the pinned name, another image pulled", _storage_only),
        ("a shell instead of veil serve", lambda r: r["OCI"]["Process"].update(Args=["/bin/sh", "-c", "id"])),
        ("the simulated TEE", lambda r: r["OCI"]["Process"]["Args"].__setitem__(3, "simulated")),
        ("LD_PRELOAD", lambda r: r["OCI"]["Process"]["Env"].append("LD_PRELOAD=/tmp/x.so")),
        ("PYTHONPATH", lambda r: r["OCI"]["Process"]["Env"].append("PYTHONPATH=/tmp")),
        ("root", lambda r: r["OCI"]["Process"]["User"].update(UID=0)),
        ("privilege escalation", lambda r: r["OCI"]["Process"].update(NoNewPrivileges=False)),
        ("a capability", lambda r: r["OCI"]["Process"]["Capabilities"]["Bounding"].append("CAP_SYS_ADMIN")),
        ("a writable root", lambda r: r["OCI"]["Root"].update(Readonly=False)),
        ("a mount over the venv", lambda r: r["OCI"]["Mounts"].append({"destination": "/opt/veil"})),
        ("a host directory storage", lambda r: r["storages"].append({"driver": "virtio-fs", "source": "/"})),
        ("no container type", lambda r: r["OCI"]["Annotations"].pop("io.kubernetes.cri.container-type")),
    ],
)
def test_anything_else_is_refused(policy: str, what: str, change: Any) -> None:
    request = copy.deepcopy(workload(policy))
    change(request)
    assert not allowed(policy, "CreateContainerRequest", request), what


@pytest.mark.parametrize("request_name", DENIED)
def test_exec_logs_and_policy_replacement_are_denied(policy: str, request_name: str) -> None:
    assert not allowed(policy, request_name, {"container_id": "abc", "exec_id": "x"})


def test_lifecycle_requests_the_pod_needs_are_allowed(policy: str) -> None:
    for request_name in LIFECYCLE:
        assert allowed(policy, request_name, {}), request_name


def test_files_are_copied_only_into_the_sandbox_share(policy: str) -> None:
    share = "/run/kata-containers/shared/containers/abc-resolv.conf"
    assert allowed(policy, "CopyFileRequest", {"path": share, "file_type": "Regular"})
    assert not allowed(policy, "CopyFileRequest", {"path": "/opt/veil/bin/veil", "file_type": "Regular"})
    escape = "/run/kata-containers/shared/containers/../../../../opt/veil/x"
    assert not allowed(policy, "CopyFileRequest", {"path": escape, "file_type": "Regular"})
