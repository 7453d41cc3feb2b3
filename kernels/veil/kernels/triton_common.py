"""Small shared pieces of the Triton kernels: input checks, launch heuristics, device facts.

Nothing here launches a kernel. The heuristics are starting points chosen from the kernels'
memory-traffic shape, not measured on a GPU yet: ``bench/kernels.py`` sweeps the configurations on a
real device and prints the best one, which is how the defaults below must be confirmed or replaced.
"""

from __future__ import annotations

import functools
import os

import torch

from veil.kernels.errors import KernelInputError, KernelUnavailableError

__all__ = [
    "DEFAULT_SM_COUNT",
    "check_device",
    "interpreter_block_n",
    "interpreting",
    "kernels_run_on_cpu",
    "next_power_of_2",
    "pick_split",
    "sm_count",
]

# An H100 SXM has 132 streaming multiprocessors; used when no device can be asked (the interpreter).
DEFAULT_SM_COUNT = 132


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "yes", "on"}


def kernels_run_on_cpu() -> bool:
    """True when the kernel modules were defined under the interpreter, so CPU tensors can be passed.

    ``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is *defined*: setting it after the
    kernel modules were imported changes nothing, so this looks at a defined kernel, not at the variable.
    """
    from triton.runtime.interpreter import InterpretedFunction

    from veil.kernels import triton_w4a16

    return isinstance(triton_w4a16._w4a16_splitk_kernel, InterpretedFunction)


def check_device(*tensors: torch.Tensor) -> None:
    """Raise unless all tensors sit where a Triton kernel can read them (CUDA, or CPU when interpreting)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelInputError(f"tensors are on different devices: {sorted(str(d) for d in devices)}")
    device = next(iter(devices))
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise KernelUnavailableError(
        f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
        "the kernel modules to run them on the CPU"
    )


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device`` (a fixed H100 figure on the CPU interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SM_COUNT


# Output columns per program of a matmul launched on CPU tensors (the interpreter), see below.
INTERPRETER_BLOCK_N = 2048


def interpreter_block_n(n: int) -> int:
    """Output columns per program for a matmul of ``n`` columns run by the Triton interpreter.

    The interpreter runs a launch's programs one after another in Python, each op costing a numpy
    call, so time grows with the number of programs, not with the work in each: a GPU launch shape
    (64 columns per program, K split to fill 132 SMs) makes one SmolLM2 token take minutes. Default
    launches on CPU tensors therefore use the fewest, widest programs (this many columns, no split-K).
    Same kernels, other tile sizes; the parity tests pin GPU-shaped configs explicitly."""
    return min(INTERPRETER_BLOCK_N, max(16, next_power_of_2(n)))


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pick_split(tiles: int, steps: int, sms: int, waves: int = 4) -> int:
    """How many ways to split a reduction of ``steps`` blocks so ``tiles × split`` fills ``waves`` × SMs.

    Memory-bound kernels need enough programs in flight to cover DRAM latency; with few output tiles
    (decode GEMV, attention over few sequences) the reduction axis is cut instead.
    """
    if tiles <= 0 or steps <= 0:
        return 1
    want = -(-waves * sms // tiles)
    return max(1, min(steps, want))
