"""Installs and start-up: what a fresh machine, a Python started from the repo root, and a
client-only install each get.

The regression these guard against (2026-12-03): `make setup` installed whatever transformers
was newest, which imported Hugging Face's `kernels` package, and Python started from the repo
root (``python -m pytest``, ``sys.executable -m veil serve`` spawned by ``veil.enclave.local_server``)
found Veil's top-level ``kernels/`` folder first. Now each top-level folder is a source root that
holds only ``veil/`` (``kernels/veil/kernels/…``), so nothing at the root is an importable package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("veil", "proto", "attestation", "enclave", "kernels", "client")
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
# What only the enclave, the auditor or the measurement command need; a client install has none.
NOT_IN_CLIENT = (
    "torch",
    "transformers",
    "gguf",
    "triton",
    "httpx",
    "dcap_qvl",
    "sevsnpmeasure",
    "grpc_health",
    "prometheus_client",
)


def _from_repo_root(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``code`` the way ``veil.enclave.local_server`` starts the server: this interpreter,
    the repo root as working directory, the caller's environment; and with the working
    directory first on ``sys.path`` (no ``PYTHONSAFEPATH``), as ``python -m`` and ``-c`` put it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_no_top_level_folder_is_a_package() -> None:
    for name in SOURCE_ROOTS:
        folder = ROOT / name
        assert not (folder / "__init__.py").exists(), f"{name}/ must not be an importable package"
        python_files = [p.name for p in folder.glob("*.py")]
        assert python_files in ([], ["generate.py"] if name == "proto" else []), (name, python_files)
        assert (folder / "veil").is_dir()
        assert not (folder / "veil" / "__init__.py").exists(), "veil is a namespace package"


@pytest.mark.slow
def test_hub_kernels_and_the_embedded_tokenizer_from_the_repo_root(model_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        assert Path(sys.path[0] or os.getcwd()).resolve() == Path({str(ROOT)!r}), sys.path[0]
        import transformers.integrations.hub_kernels  # imports the PyPI package `kernels`
        import kernels
        assert "site-packages" in (kernels.__file__ or ""), kernels.__file__
        import veil.kernels
        from veil.enclave.model.gguf_loader import load_gguf_tokenizer, read_gguf
        from veil.enclave.model.loader import default_model_path
        path = default_model_path()
        assert path == Path({str(model_path)!r})
        model = read_gguf(path, lazy=True)
        import tempfile
        with tempfile.TemporaryDirectory() as cache:
            tok = load_gguf_tokenizer(path, model.digest, Path(cache))
        print(len(tok("Hello, world").input_ids) > 0)
        """
    )
    out = _from_repo_root(code)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_python_dash_m_veil_from_the_repo_root() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    for args in (["--help"], ["serve", "--help"], ["attest", "--help"], ["chat", "--help"]):
        out = subprocess.run(
            [sys.executable, "-m", "veil", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, (args, out.stderr[-2000:])
        assert out.stdout.startswith("usage: veil"), args


def test_every_package_is_listed_for_the_build() -> None:
    """pyproject.toml maps the namespace explicitly; a new sub-package must be listed there."""
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    found = set()
    for src in SOURCE_ROOTS:
        base = ROOT / src
        for init in (base / "veil").rglob("*.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join(init.parent.relative_to(base).parts))
    assert found == listed


@pytest.mark.slow
def test_the_client_installs_alone(tmp_path: Path) -> None:
    """`pip install veil` (the base install) is enough to import and use the SDK: no torch,
    no HTTP client, no measurement tools. Offline: the locked client wheels that `make setup`
    downloads into the venv's wheelhouse, and a wheel built from this tree."""
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.fail(f"no client wheels in {WHEELHOUSE}: run `make setup`")
    # Built from a copy of the sources, so setuptools' build/ folder never lands in the checkout.
    source = tmp_path / "source"
    for name in (*SOURCE_ROOTS, "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    wheels = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("veil-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "--quiet", "install", "--no-index", "--find-links", str(WHEELHOUSE)]
    subprocess.run(
        [*pip, "--require-hashes", "--no-deps", "-r", str(ROOT / "requirements" / "client.txt")],
        check=True, timeout=300,
    )  # fmt: skip
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=300)
    check = subprocess.run(
        [str(py), "-m", "pip", "check"], check=False, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    code = textwrap.dedent(
        f"""
        import importlib.util
        missing = [m for m in {NOT_IN_CLIENT!r} if importlib.util.find_spec(m) is None]
        assert missing == list({NOT_IN_CLIENT!r}), missing
        from veil.client import AsyncClient, Client, Policy
        from veil.attestation.channel import PrivateKey, open_request, seal_request
        from veil.proto.v1 import generate_pb2
        policy = Policy()
        key = PrivateKey.generate()
        request = generate_pb2.GenerateRequest(prompt="hi", request_id=bytes(16), response_key=bytes(32))
        assert open_request(seal_request(request, key.public_key()), key).prompt == "hi"
        import sys
        print(sorted(m for m in sys.modules if m.startswith(("veil.enclave", "veil.kernels"))))
        """
    )
    out = subprocess.run(
        [str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip() == "[]"
    cli = subprocess.run(
        [str(venv / "bin" / "veil"), "chat", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
