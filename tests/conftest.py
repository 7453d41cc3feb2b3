"""Shared test fixtures: paths to the real evidence and the embedded model, hardware markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
