"""Veil's own CPU kernels (``kernels/cpu/*.cpp``): build, load, and the weight layout they read.

PyTorch's packed int4 CPU op widens every weight to fp32 and multiplies in fp32 FMA, which on
these cores is the ceiling once a decode batch has a few rows; its scales must be bf16, too. The
kernels here multiply with AVX-512 BF16 dot products instead (twice the fp32 rate), on weights
that keep the file's own block layout — per group of 32 inputs, 4- or 8-bit codes and fp16 (or
fp32) scales — so GGUF Q4_0 / Q4_1 / Q8_0 are computed **exactly**: each code is an integer bf16
holds exactly, each product code·x is exact in fp32, and the group scale is applied in fp32. See
``kernels/cpu/qmm.cpp`` for the packed record format.

The library is compiled once per source version with ``torch.utils.cpp_extension`` (g++ and
ninja; ``make`` does it at set-up) into ``$VEIL_KERNEL_CACHE`` (default ``~/.cache/veil/kernels``)
and loaded as ``torch.ops.veil_cpu``. :func:`available` is False — and the model falls back to
PyTorch's ops — when the CPU lacks AVX-512 BF16, the build fails, or ``VEIL_CPU_KERNELS=0``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

__all__ = [
    "KIND_Q4",
    "KIND_Q8",
    "available",
    "build",
    "pack_q4",
    "pack_q8",
    "qmm",
    "qmm_add_",
]

log = logging.getLogger(__name__)

KIND_Q4 = 0
KIND_Q8 = 1
_DIR = Path(__file__).parent / "cpu"
_SOURCES = [_DIR / "qmm.cpp", _DIR / "fused.cpp"]
_HEADERS = [_DIR / "common.h"]
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cache_dir() -> Path:
    env = os.environ.get("VEIL_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "veil" / "kernels"


def _name() -> str:
    h = hashlib.sha256()
    for src in _SOURCES + _HEADERS:
        h.update(src.read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return "veil_cpu_" + h.hexdigest()[:16]


def build(verbose: bool = False) -> Path:
    """Compile (or find already compiled) the kernel library and load it; returns its path."""
    from torch.utils import cpp_extension

    name = _name()
    directory = _cache_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{name}.so"
    if library.exists():
        torch.ops.load_library(str(library))  # type: ignore[no-untyped-call]
        return library
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in _SOURCES],
        extra_cflags=["-O3", "-fopenmp", "-std=c++17"],
        extra_include_paths=[str(_DIR)],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )
    return library


def available() -> bool:
    """Whether the kernels are built, loaded, and supported by this CPU (cached after the first call)."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            ok = False
            if os.environ.get("VEIL_CPU_KERNELS", "1") != "0":
                try:
                    build()
                    ok = bool(torch.ops.veil_cpu.supported())
                    if not ok:
                        log.info("CPU lacks AVX-512 BF16: using PyTorch's quantized ops")
                except Exception as e:  # a missing compiler or ninja: fall back, say why
                    log.warning("Veil CPU kernels unavailable (%s): using PyTorch's quantized ops", e)
            _state["ok"] = ok
    return _state["ok"]


def qmm(x: torch.Tensor, packed: torch.Tensor, kind: int, f16: bool, n_out: int) -> torch.Tensor:
    """``x`` [M, K] bf16 times a packed weight → fp32 [M, n_out]."""
    out: torch.Tensor = torch.ops.veil_cpu.qmm(x, packed, kind, f16, n_out)
    return out


def qmm_add_(out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, kind: int, f16: bool) -> None:
    """``out += x @ Wᵀ`` in place (``out`` fp32 [M, n_out])."""
    torch.ops.veil_cpu.qmm_add_(out, x, packed, kind, f16)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


def _scales_bytes(s: torch.Tensor, nb: int, groups: int, f16: bool) -> torch.Tensor:
    """[N, G] scales → [NB, G, 16 · itemsize] bytes, 16 channels of a block side by side."""
    t = s.to(torch.float16 if f16 else torch.float32)
    return t.view(nb, 16, groups).transpose(1, 2).contiguous().view(torch.uint8).view(nb, groups, -1)


def fp16_exact(*scales: torch.Tensor) -> bool:
    """Whether every value survives a round trip through fp16 (then fp16 records lose nothing)."""
    return all(bool((s.float().half().float() == s.float()).all()) for s in scales)


def pack_q4(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, f16: bool) -> torch.Tensor:
    """Codes [N, K] (0..15) with ``w = d·q + m`` per group of 32 → records [NB, G, 256 + scales]."""
    n, k = codes.shape
    groups, nb = k // 32, (n + 15) // 16
    q = _pad_rows(codes.to(torch.uint8), nb * 16).view(nb, 16, groups, 2, 8, 2)  # (nb, n, g, half, c, parity)
    t = q.permute(0, 2, 3, 4, 1, 5)  # (nb, g, half, c, n, parity)
    nibbles = (t[:, :, 0] | (t[:, :, 1] << 4)).reshape(nb, groups, 256)
    d_b = _scales_bytes(_pad_rows(d, nb * 16), nb, groups, f16)
    m_b = _scales_bytes(_pad_rows(m, nb * 16), nb, groups, f16)
    return torch.cat([nibbles, d_b, m_b], dim=2).contiguous()


def pack_q8(codes: torch.Tensor, d: torch.Tensor, f16: bool) -> torch.Tensor:
    """Codes [N, K] int8 with ``w = d·q`` per group of 32 → records [NB, G, 512 + scales]."""
    n, k = codes.shape
    groups, nb = k // 32, (n + 15) // 16
    q = _pad_rows(codes.to(torch.int8), nb * 16).view(nb, 16, groups, 16, 2)  # (nb, n, g, c, parity)
    body = q.permute(0, 2, 3, 1, 4).reshape(nb, groups, 512).view(torch.uint8)
    d_b = _scales_bytes(_pad_rows(d, nb * 16), nb, groups, f16)
    return torch.cat([body, d_b], dim=2).contiguous()


def _main() -> int:
    """``python -m veil.kernels.cpu_ext``: build now (``make`` set-up), report whether usable."""
    logging.basicConfig(level=logging.INFO)
    try:
        path = build(verbose="-v" in sys.argv)
    except Exception as e:
        print(f"veil CPU kernels: build failed ({e}); the engine will use PyTorch's ops")
        return 0
    print(f"veil CPU kernels: {path} ({'in use' if available() else 'not supported by this CPU'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
