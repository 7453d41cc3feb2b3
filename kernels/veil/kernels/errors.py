"""Every exception ``veil.kernels`` raises.

::

    KernelError                base
    ├── KernelInputError       a tensor handed to a kernel has the wrong shape, dtype, device or layout
    │                          (the message names the argument and what was expected)
    ├── KernelUnavailableError the requested kernel cannot run here (no Triton, no CUDA device and
    │                          the Triton interpreter is not enabled)
    └── KernelCacheError       a compiled library on disk is not a build of exactly these sources
                               for this torch and Python, or its bytes differ from its sidecar
                               record (it is never loaded; the caller rebuilds)

Kernels never see request text, so messages carry shapes and dtypes only.
"""

from __future__ import annotations

__all__ = ["KernelCacheError", "KernelError", "KernelInputError", "KernelUnavailableError"]


class KernelError(Exception):
    """Base of every error raised by ``veil.kernels``."""


class KernelInputError(KernelError):
    """A kernel argument has the wrong shape, dtype, device or layout."""


class KernelUnavailableError(KernelError):
    """The kernel cannot run in this process (no Triton, or no GPU and no interpreter)."""


class KernelCacheError(KernelError):
    """A cached or prebuilt kernel library does not verify against the sources it must come from."""
