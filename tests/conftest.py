"""Shared test fixtures: the real evidence, the embedded model (loaded once per session), hardware markers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from veil.enclave.model.loader import LoadedModel

ROOT = Path(__file__).resolve().parent.parent
EVIDENCE = Path(os.environ.get("VEIL_EVIDENCE_DIR", ROOT.parent / "shared" / "evidence"))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _has_tee() -> bool:
    return (
        Path("/dev/sev-guest").exists()
        or Path("/dev/tdx_guest").exists()
        or any(Path("/sys/kernel/config/tsm/report").glob("*"))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = _has_cuda() if any("gpu" in i.keywords for i in items) else True
    tee = _has_tee()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none present"))
        if "tee" in item.keywords and not tee:
            item.add_marker(pytest.mark.skip(reason="needs TEE hardware; none present"))


@pytest.fixture(scope="session")
def evidence_dir() -> Path:
    if not EVIDENCE.is_dir():
        pytest.fail(f"real evidence not found at {EVIDENCE} (expected ../shared/evidence)")
    return EVIDENCE


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF, where the engine finds it."""
    from veil.enclave.errors import ModelLoadError
    from veil.enclave.model.loader import default_model_path

    try:
        return default_model_path()
    except ModelLoadError as exc:
        pytest.fail(f"{exc} (make setup installs it)")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's cache directory for the embedded model's tokenizer (built from the GGUF once)."""
    return tmp_path_factory.mktemp("veil-cache")


@pytest.fixture(scope="session")
def loaded_model(model_path: Path, model_cache_dir: Path) -> LoadedModel:
    """The embedded model, loaded once per session with its unpacked specs kept (for reference weights).

    Shared by every test that only reads it: build runners and engines from it, never change it.
    """
    from veil.enclave.model.loader import load_model

    return load_model(model_path, cache_dir=model_cache_dir, keep_specs=True)
