"""CPU matmul benchmark: Veil's block-quantized kernel vs PyTorch's int4 op and a dense bf16 matmul.

For the embedded model's matmul shapes (fused QKV, O, gate+up, down, LM head) and batch rows
M = 1, 4, 16, 64, 256, in one run on the same threads, times:

* ``veil``   — ``veil_cpu::qmm`` (Q4 for the layers, Q8_0 for the LM head), the engine's kernel;
* ``torch4`` — ``aten::_weight_int4pack_mm_for_cpu`` (the head as the exact int4 pair the fallback
  uses: twice the work);
* ``dense``  — ``torch.nn.functional.linear`` on the bf16 weight (oneDNN), the unquantized peer.

Prints µs per call, Veil's GFLOP/s and the speed-ups (peer time / Veil time). The same weights
are reused call after call, so they sit in cache for the smaller shapes: this measures the
kernels' compute, not the DRAM streaming of a full decode step (``bench/engine.py`` does).

    python bench/cpu_kernels.py [--threads 2] [--rows 1 4 16 64 256]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from veil.kernels import cpu_ext
from veil.kernels.quant_cpu import Int4Linear, Int4Spec, PackedLinear, Q8BlockSpec, Q8PairLinear

SHAPES = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "head": (49152, 576),
}


def _time(fn: Callable[[], object], budget_s: float = 0.3) -> float:
    fn()
    best = float("inf")
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-6)
    n = max(1, int(budget_s / 3 / once))
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def _row(
    name: str,
    n: int,
    k: int,
    rows: int,
    *,
    veil: Callable[[torch.Tensor], torch.Tensor],
    peer: Callable[[torch.Tensor], torch.Tensor],
    wb: torch.Tensor,
    g: torch.Generator,
) -> str:
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    tv = _time(lambda: veil(x))
    tp = _time(lambda: peer(x))
    td = _time(lambda: torch.nn.functional.linear(x, wb))
    gf = 2 * rows * n * k / tv / 1e3
    shape = f"{name} {n}x{k}"
    return f"{shape:>16} {rows:>4} {tv:9.1f} {tp:10.1f} {td:9.1f} {gf:9.0f} {tp / tv:10.2f}x {td / tv:10.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_ext.available():
        print("Veil CPU kernels unavailable here (no AVX-512 BF16, or not built): nothing to compare")
        return 1
    g = torch.Generator().manual_seed(0)
    head = ("shape", "M", "veil us", "torch4 us", "dense us", "veil GF/s", "torch4/veil", "dense/veil")
    print("{:>16} {:>4} {:>9} {:>10} {:>9} {:>9} {:>11} {:>11}".format(*head))
    for name, (n, k) in SHAPES.items():
        d = (torch.rand(n, k // 32, generator=g) * 0.02 + 0.001).half().float()
        if name == "head":
            codes8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            veil = PackedLinear.from_q8(codes8, d)
            peer: Callable[[torch.Tensor], torch.Tensor] = Q8PairLinear(Q8BlockSpec(codes8, d))
            w = Q8BlockSpec(codes8, d).dequantize()
        else:
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            m = (-torch.rand(n, k // 32, generator=g) * 0.1).half().float()
            spec = Int4Spec(codes, d, m + 8 * d, 32)
            veil, peer, w = PackedLinear.from_int4(spec), Int4Linear(spec), spec.dequantize()
        for rows in args.rows:
            print(_row(name, n, k, rows, veil=veil, peer=peer, wb=w.to(torch.bfloat16), g=g))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
