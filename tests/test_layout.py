"""Package boundaries: the client installs without torch and never reaches into the enclave."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["proto", "attestation", "enclave", "kernels", "client", "veil"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources(package: str) -> list[Path]:
    return [p for p in (ROOT / package).rglob("*.py") if "v1" not in p.parts or package != "proto"]


def test_nothing_imports_bare_package_names() -> None:
    bare = {"client", "enclave", "attestation", "kernels", "proto"}
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for package in [*PACKAGES, "tests", "bench"]
        for path in (ROOT / package).rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in bare
    ]
    assert not offenders


def test_client_and_attestation_never_import_enclave_or_torch() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for package in ("client", "attestation", "proto")
        for path in _sources(package)
        for name in _imports(path)
        if name.startswith(("veil.enclave", "veil.kernels", "torch", "triton", "transformers"))
    ]
    assert not offenders


def test_client_imports_with_torch_unimportable() -> None:
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "triton", "transformers", "gguf"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import veil.client, veil.attestation
        import veil.attestation.channel, veil.attestation.channel.stream, veil.attestation.binding
        import pkgutil, importlib
        for mod in pkgutil.iter_modules(veil.client.__path__, "veil.client."):
            importlib.import_module(mod.name)
        for mod in pkgutil.iter_modules(veil.attestation.__path__, "veil.attestation."):
            importlib.import_module(mod.name)
        leaked = sorted(m for m in sys.modules if m.startswith(("veil.enclave", "veil.kernels")))
        assert not leaked, leaked
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_every_error_is_drawn_in_its_tree() -> None:
    import importlib

    for name in ("veil.attestation.errors", "veil.client.errors", "veil.enclave.errors"):
        module = importlib.import_module(name)
        doc = module.__doc__ or ""
        missing = [cls for cls in module.__all__ if cls not in doc]
        assert not missing, f"{name}: {missing} not in the docstring tree"
        for cls in module.__all__:
            assert issubclass(getattr(module, cls), Exception)


def test_modules_hold_one_idea_each() -> None:
    """No module of a package exceeds 600 lines (aim: under ~400 where a module holds one idea)."""
    too_long = [
        f"{path.relative_to(ROOT)}: {n}"
        for package in PACKAGES
        for path in _sources(package)
        if (n := len(path.read_text().splitlines())) > 600
    ]
    assert not too_long


def test_the_layout_is_the_one_the_readme_draws() -> None:
    # veil/ holds the `veil` command dispatcher and `veil demo`, nothing else
    dispatcher = ROOT / "veil" / "veil"
    assert sorted(p.name for p in dispatcher.iterdir() if p.name != "__pycache__") == [
        "__main__.py",
        "cli.py",
        "demo",
    ]
    for package, minimum in (("attestation", 3), ("enclave", 3)):
        base = ROOT / package / "veil" / package
        subpackages = [p.name for p in base.iterdir() if (p / "__init__.py").is_file()]
        assert len(subpackages) >= minimum, (package, subpackages)
    readme = (ROOT / "README.md").read_text()
    for folder in ("proto/", "attestation/", "enclave/", "kernels/", "client/", "veil/", "tests/", "bench/"):
        assert f"`{folder}`" in readme, f"README's layout table misses {folder}"
