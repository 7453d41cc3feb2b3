"""Pin the Veil image into the Kubernetes manifests and the confidential overlays' initdata.

    .venv/bin/python deploy/k8s/pin.py --image REGISTRY/veil@sha256:HEX
    .venv/bin/python deploy/k8s/pin.py --check        # exit 1 if anything is out of date

The image digest is named in three places that must agree, so one command writes them all:
the base kustomization's ``images`` (what the Deployment runs), and for every confidential
overlay its ``initdata.toml`` (the attestation-agent config and the Kata agent policy, which
allows only that image, with the Deployment's exact command line) and ``initdata.yaml`` (the
pod annotation ``io.katacontainers.config.hypervisor.cc_init_data``: the same bytes, gzip and
base64). Then it prints each overlay's HOST_DATA / MRCONFIGID: what ``veil release build
--initdata deploy/k8s/overlays/NAME/initdata.toml`` puts in the release manifest.

The image's environment is read from the runtime stage of deploy/image/Containerfile, the
command line from deploy/k8s/base/deployment.yaml: the policy allows exactly those.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from veil.attestation.initdata import ANNOTATION, encode_annotation, parse_initdata

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CONFIDENTIAL = {  # overlay -> the platform whose launch field carries the initdata digest
    "kata-qemu-snp": "SEV_SNP",
    "kata-qemu-tdx": "TDX",
    "kata-qemu-nvidia-gpu-snp": "SEV_SNP",
    "kata-qemu-nvidia-gpu-tdx": "TDX",
}
IMAGE_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._\-/:]*[a-z0-9])@sha256:(?P<digest>[0-9a-f]{64})$")
# The attestation agent's configuration. Veil attests itself (configfs-tsm / the guest device)
# and fetches no secret from a key broker, so no KBS is named; one that uses a Confidential
# Containers Trustee sets [token_configs.kbs] url here and re-runs pin.py (a new digest).
AA_TOML = "[token_configs]\n"


def _base() -> tuple[dict, dict]:
    kustomization = yaml.safe_load((HERE / "base" / "kustomization.yaml").read_text())
    deployment = yaml.safe_load((HERE / "base" / "deployment.yaml").read_text())
    return kustomization, deployment


def container_args(deployment: dict) -> list[str]:
    """The process arguments the runtime will see: the container's command, then its args."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return [str(a) for a in container["command"] + container.get("args", [])]


def image_env(containerfile: str) -> list[str]:
    """``NAME=value`` for each ENV of the Containerfile's last stage, in order."""
    stage = containerfile.rsplit("\nFROM ", 1)[-1]
    env: list[str] = []
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", stage, re.MULTILINE):
        for pair in block.replace("\\\n", " ").split():
            if "=" not in pair:
                raise SystemExit(f"pin.py: ENV {pair!r} is not NAME=value")
            env.append(pair)
    return env


def render_initdata(image: str, args: list[str], env: list[str]) -> bytes:
    """The initdata document (TOML) for ``image``: aa.toml and the agent policy."""
    policy = (HERE / "initdata" / "policy.rego.in").read_text()
    policy = policy.replace("@IMAGE@", image).replace("@ARGS@", json.dumps(args))
    policy = policy.replace("@ENV@", json.dumps(sorted(env)))
    for part in (AA_TOML, policy):
        if "'''" in part:
            raise SystemExit("pin.py: a file in the initdata contains ''' (TOML literal string end)")
    text = (
        "# Kata initdata of the Veil pod, rendered by deploy/k8s/pin.py: do not edit by hand.\n"
        "# Its digest is the pod's SNP HOST_DATA / TDX MRCONFIGID (`veil release initdata FILE`).\n"
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f"\"aa.toml\" = '''\n{AA_TOML}'''\n\n\"policy.rego\" = '''\n{policy}'''\n"
    )
    raw = text.encode()
    parse_initdata(raw)  # the document Kata would accept
    return raw


def annotation_patch(raw: bytes) -> str:
    return (
        "# The initdata annotation (gzip + base64 of initdata.toml), written by deploy/k8s/pin.py.\n"
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: veil\nspec:\n  template:\n"
        f"    metadata:\n      annotations:\n        {ANNOTATION}: {encode_annotation(raw)}\n"
    )


def expected_files(image: str) -> dict[Path, str]:
    """Every file pin.py owns, as it should read for ``image`` (``name@sha256:hex``)."""
    match = IMAGE_REF.match(image)
    if match is None:
        raise SystemExit(f"pin.py: --image must be NAME@sha256:<64 hex>, got {image!r}")
    _, deployment = _base()
    env = image_env((ROOT / "deploy" / "image" / "Containerfile").read_text())
    raw = render_initdata(image, container_args(deployment), env)
    files: dict[Path, str] = {}
    text = (HERE / "base" / "kustomization.yaml").read_text()
    text = re.sub(r"(\n    newName: ).*", rf"\g<1>{match['name']}", text)
    files[HERE / "base" / "kustomization.yaml"] = re.sub(
        r"(\n    digest: )sha256:[0-9a-f]{64}", rf"\g<1>sha256:{match['digest']}", text
    )
    for overlay in CONFIDENTIAL:
        files[HERE / "overlays" / overlay / "initdata.toml"] = raw.decode()
        files[HERE / "overlays" / overlay / "initdata.yaml"] = annotation_patch(raw)
    return files


def pinned_image() -> str:
    """The image the base kustomization names now."""
    kustomization, _ = _base()
    (entry,) = kustomization["images"]
    return f"{entry['newName']}@{entry['digest']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", metavar="NAME@sha256:HEX", help="the image to pin everywhere")
    group.add_argument("--check", action="store_true", help="verify the files match the pinned image")
    args = parser.parse_args(argv)
    image = args.image or pinned_image()
    stale = []
    for path, text in expected_files(image).items():
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if args.check and stale:
        print(f"pin.py: out of date for {image}: {', '.join(map(str, stale))} (run pin.py --image)")
        return 1
    print(f"image {image}" + ("" if args.check else f" ({len(stale)} files written)"))
    for overlay, platform in CONFIDENTIAL.items():
        initdata = parse_initdata((HERE / "overlays" / overlay / "initdata.toml").read_bytes())
        field, value = (
            ("host_data", initdata.host_data)
            if platform == "SEV_SNP"
            else ("mr_config_id", initdata.mr_config_id)
        )
        print(f"{overlay}: {platform} {field} {value.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
