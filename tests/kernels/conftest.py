"""Kernel tests: without a CUDA device the Triton kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, before any
test module of this folder imports a kernel module. (If something imported the kernel modules earlier in
the same process without it, the ``kernel_device`` fixture notices and skips rather than crash.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where the interpreter-sized parity tests run: the GPU when there is one, else the CPU interpreter."""
    if HAS_CUDA:
        return torch.device("cuda")
    pytest.importorskip("triton")
    from veil.kernels.triton_common import kernels_run_on_cpu

    if not kernels_run_on_cpu():
        pytest.skip("no CUDA device, and the kernel modules were imported without TRITON_INTERPRET=1")
    return torch.device("cpu")


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """The GPU, for tests marked ``gpu`` (the root conftest skips those when there is none)."""
    return torch.device("cuda")


@pytest.fixture(scope="session")
def gguf_reader(model_path: Path) -> Any:
    """The embedded SmolLM2 GGUF, parsed once per session (parsing takes seconds)."""
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(model_path)
