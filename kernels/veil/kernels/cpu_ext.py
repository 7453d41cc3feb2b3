"""Veil's own CPU kernels (``kernels/cpu/*.cpp``): build, load, and the weight layout they read.

PyTorch's packed int4 CPU op widens every weight to fp32 and multiplies in fp32 FMA, which on
these cores is the ceiling once a decode batch has a few rows; its scales must be bf16, too. The
kernels here multiply with AVX-512 BF16 dot products instead (twice the fp32 rate), on weights
that keep the file's own block layout — per group of 32 inputs, 4- or 8-bit codes and fp16 (or
fp32) scales — so GGUF Q4_0 / Q4_1 / Q8_0 are computed **exactly**: each code is an integer bf16
holds exactly, each product code·x is exact in fp32, and the group scale is applied in fp32. See
``kernels/cpu/qmm.cpp`` for the packed record format.

The library is compiled with ``torch.utils.cpp_extension`` (g++ and ninja; ``make`` does it at
set-up) from private copies of exactly the source bytes it hashed, and loaded as
``torch.ops.veil_cpu`` only after :func:`veil.kernels.kernel_cache.verify_cached` has checked its
sidecar (sources, torch and Python versions, flags, the ``.so`` bytes' SHA-256). Where: the cache
directory of :func:`configure` — the enclave passes ``STATE_DIR/kernels`` and, as a read-only
source of verified bytes, ``$VEIL_KERNEL_CACHE`` (default ``~/.cache/veil/kernels``, where
``make setup`` builds); without :func:`configure` that default is the cache. An entry that does
not verify is never loaded: it is removed and rebuilt. :func:`available` is False — and the model
falls back to PyTorch's ops — when the CPU lacks AVX-512 BF16, the build fails, or
``VEIL_CPU_KERNELS=0``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from veil.kernels.errors import KernelCacheError
from veil.kernels.kernel_cache import KernelIdentity, identify, read_sources, sidecar_bytes, verify_cached

__all__ = [
    "KIND_Q4",
    "KIND_Q8",
    "available",
    "build",
    "configure",
    "default_cache_dir",
    "identity",
    "pack_q4",
    "pack_q8",
    "qmm",
    "qmm_add_",
]

log = logging.getLogger(__name__)

KIND_Q4 = 0
KIND_Q8 = 1
_DIR = Path(__file__).parent / "cpu"
_CFLAGS = ("-O3", "-fopenmp", "-std=c++17")
# Each build runs in a fresh temporary directory; mapping it to one fixed name keeps that random
# path out of the library (``__FILE__`` in TORCH_CHECK messages, debug info, hence the build id),
# so the same sources, compiler and flags give the same bytes (a reproducible image, #15).
_BUILD_PREFIX = "/veil-kernels-build"
_LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_state: dict[str, bool] = {}
_where: dict[str, tuple[Path, ...]] = {}
_loaded: dict[str, Path] = {}  # library name → cache entry (a second dlopen would register twice)


def default_cache_dir() -> Path:
    """``$VEIL_KERNEL_CACHE``, else ``~/.cache/veil/kernels`` (where ``make setup`` builds)."""
    env = os.environ.get("VEIL_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "veil" / "kernels"


def configure(cache_dir: Path, prebuilt: Sequence[Path] = ()) -> None:
    """Build into and load from ``cache_dir`` only; ``prebuilt`` dirs are read, verified, copied."""
    _where["cache"] = (Path(cache_dir),)
    _where["prebuilt"] = tuple(Path(p) for p in prebuilt)


def identity() -> tuple[KernelIdentity, dict[str, bytes]]:
    """The identity of the library these sources make here, and the source bytes it was taken from."""
    sources = read_sources(_DIR)
    flags = (*_CFLAGS, f"-ffile-prefix-map=BUILD={_BUILD_PREFIX}", *(f"ld:{f}" for f in _LDFLAGS))
    return identify(sources, torch.__version__, sys.version, flags), sources


def _install(cache: Path, ident: KernelIdentity, library: bytes) -> Path:
    """Write ``library`` and its sidecar to ``cache/NAME/`` (a fresh directory, then a rename)."""
    target = cache / ident.name
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=cache))
    (staging / f"{ident.name}.so").write_bytes(library)
    (staging / f"{ident.name}.json").write_bytes(sidecar_bytes(ident, library))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target / f"{ident.name}.so"


def _compile(cache: Path, ident: KernelIdentity, sources: dict[str, bytes], verbose: bool) -> bytes:
    """Compile the hashed source bytes in a fresh directory (loading the result); its ``.so`` bytes."""
    from torch.utils import cpp_extension

    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        src = work / "src"
        src.mkdir()
        for name, data in sources.items():
            (src / name).write_bytes(data)
        cpp_extension.load(
            name=ident.name,
            sources=[str(src / n) for n in sorted(sources) if n.endswith((".cpp", ".cc", ".c"))],
            extra_cflags=[*_CFLAGS, f"-ffile-prefix-map={work}={_BUILD_PREFIX}"],
            extra_include_paths=[str(src)],
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(work),
            is_python_module=False,
            verbose=verbose,
        )
        return (work / f"{ident.name}.so").read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(verbose: bool = False, *, compile: bool = True) -> Path:
    """Load a verified kernel library, copying a verified prebuilt one or compiling if need be.

    Order: the cache's own entry (a failing one is removed), each prebuilt directory's entry
    (verified bytes are copied into the cache), then — if ``compile`` — a fresh build. Returns
    the path of the cache entry; raises :class:`KernelCacheError` when nothing verifies and
    ``compile`` is False.
    """
    ident, sources = identity()
    if ident.name in _loaded:
        return _loaded[ident.name]
    cache = _where.get("cache", (default_cache_dir(),))[0]
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = _find(cache, ident)
    if path is not None:
        torch.ops.load_library(str(path))  # type: ignore[no-untyped-call]
    elif not compile:
        raise KernelCacheError(f"no verified kernel library {ident.name} and compiling is off")
    else:
        path = _install(cache, ident, _compile(cache, ident, sources, verbose))
    _loaded[ident.name] = path
    return path


def _find(cache: Path, ident: KernelIdentity) -> Path | None:
    """The verified cache entry, copying a verified prebuilt one there first if need be."""
    library: bytes | None = None
    try:
        library = verify_cached(cache / ident.name, ident)
    except KernelCacheError as exc:
        if (cache / ident.name).exists():
            log.warning("kernel cache entry refused (%s): rebuilding", exc)
            shutil.rmtree(cache / ident.name, ignore_errors=True)
    if library is not None:
        return cache / ident.name / f"{ident.name}.so"
    for directory in _where.get("prebuilt", ()):
        try:
            library = verify_cached(directory / ident.name, ident)
        except KernelCacheError as exc:
            log.info("prebuilt kernel not used (%s)", exc)
            continue
        return _install(cache, ident, library)
    return None


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
