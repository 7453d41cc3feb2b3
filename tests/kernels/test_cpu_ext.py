"""Veil's AVX-512 BF16 CPU kernels (``kernels/cpu``) against plain fp32 PyTorch references."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from veil.enclave.model.gguf_loader import _decode
from veil.kernels import cpu_ext
from veil.kernels.quant_cpu import Int4Spec, PackedLinear, Q8BlockSpec

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason="Veil CPU kernels not built or CPU lacks AVX-512 BF16"
)

EPS32 = 2.0**-24
OPS = torch.ops.veil_cpu


def _q4(n: int, k: int, seed: int, f16: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = torch.rand(n, k // 32, generator=g) * 0.02 + 0.001
    m = -torch.rand(n, k // 32, generator=g) * 0.1
    if f16:
        d, m = d.half().float(), m.half().float()
    return codes, d, m


def _bound(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """fp32 summation in a different order: ≤ 64·u·Σ|terms| (32-term group sums, then K/32 group
    terms; the Q4 offset trick sums (128 + q)·x and subtracts 128·Σx, so its terms are ~16× larger:
    ``magnitude`` includes that)."""
    return 64 * EPS32 * (x.float().abs() @ magnitude.t()) + 1e-30


@pytest.mark.parametrize("n,k", [(960, 576), (50, 64), (576, 1536)])
@pytest.mark.parametrize("f16", [True, False])
def test_q4_matches_dense_fp32(n: int, k: int, f16: bool) -> None:
    codes, d, m = _q4(n, k, seed=n + k, f16=f16)
    w = (codes.float().view(n, -1, 32) * d[..., None] + m[..., None]).view(n, k)
    mag = ((128 + codes.float()).view(n, -1, 32) * d[..., None] + (m + 128 * d).abs()[..., None]).view(n, k)
    packed = cpu_ext.pack_q4(codes, d, m, f16)
    for rows in (1, 5, 12, 13, 16, 40, 500):  # 500 rows at K=1536 spans several L2 row chunks
        x = torch.randn(rows, k).to(torch.bfloat16)
        ref = x.float() @ w.t()
        y = cpu_ext.qmm(x, packed, cpu_ext.KIND_Q4, f16, n)
        assert y.dtype == torch.float32 and y.shape == (rows, n)
        assert bool(((y - ref).abs() <= _bound(x, mag)).all()), (rows, float((y - ref).abs().max()))
        acc = torch.randn(rows, n)
        out = acc.clone()
        cpu_ext.qmm_add_(out, x, packed, cpu_ext.KIND_Q4, f16)
        assert bool(((out - acc - ref).abs() <= _bound(x, mag) + 4 * EPS32 * (acc.abs() + ref.abs())).all())


@pytest.mark.parametrize("f16", [True, False])
def test_q8_matches_dense_fp32(f16: bool) -> None:
    n, k = 200, 576
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    d = torch.rand(n, k // 32, generator=g) * 0.01
    d = d.half().float() if f16 else d
    w = (codes.float().view(n, -1, 32) * d[..., None]).view(n, k)
    packed = cpu_ext.pack_q8(codes, d, f16)
    for rows in (1, 7, 16, 33):
        x = torch.randn(rows, k).to(torch.bfloat16)
        y = cpu_ext.qmm(x, packed, cpu_ext.KIND_Q8, f16, n)
        assert bool(((y - x.float() @ w.t()).abs() <= _bound(x, w.abs())).all())


def test_rows_are_batch_invariant() -> None:
    """A row's result is bit-identical alone and inside any batch (tiles only change which rows
    share a weight unpack, never the order of a row's own sums)."""
    codes, d, m = _q4(320, 576, seed=9)
    packed = cpu_ext.pack_q4(codes, d, m, True)
    x = torch.randn(41, 576).to(torch.bfloat16)
    full = cpu_ext.qmm(x, packed, cpu_ext.KIND_Q4, True, 320)
    for r in (0, 13, 40):
        assert torch.equal(cpu_ext.qmm(x[r : r + 1], packed, cpu_ext.KIND_Q4, True, 320)[0], full[r])
    assert torch.equal(cpu_ext.qmm(x[5:21], packed, cpu_ext.KIND_Q4, True, 320), full[5:21])


def test_gguf_q4_1_tensor_packs_losslessly(gguf_reader: Any) -> None:
    """The embedded model's Q4_1 tensors keep their fp16 scales exactly (no bf16 rounding), and the
    kernel reproduces gguf's own dequantization times x up to fp32 summation order."""
    reader: Any = gguf_reader
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_gate.weight")
    n, k = int(np.prod([int(s) for s in t.shape[1:]])), int(t.shape[0])
    _, spec = _decode("Q4_1", t.data, n, k)
    assert isinstance(spec, Int4Spec)
    lin = PackedLinear.from_int4(spec)
    assert lin.f16, "GGUF's fp16 d and m must survive the packing exactly"
    theirs = torch.from_numpy(dequantize(np.asarray(t.data), GGMLQuantizationType.Q4_1).astype(np.float32))
    theirs = theirs.reshape(n, k)
    x = torch.randn(3, k).to(torch.bfloat16)
    mag = theirs.abs() + 136 * spec.scale.repeat_interleave(32, 1)
    assert bool(((lin(x) - x.float() @ theirs.t()).abs() <= _bound(x, mag)).all())


def test_q8_block_spec_packs_exactly() -> None:
    g = torch.Generator().manual_seed(4)
    spec = Q8BlockSpec(
        torch.randint(-127, 128, (48, 96), generator=g, dtype=torch.int8), torch.rand(48, 3).half().float()
    )
    lin = PackedLinear.from_q8(spec.codes, spec.scale)
    x = torch.randn(4, 96).to(torch.bfloat16)
    w = spec.dequantize()
    assert lin.f16 and bool(((lin(x) - x.float() @ w.t()).abs() <= _bound(x, w.abs())).all())


def test_rms_norm_bf16() -> None:
    x = torch.randn(7, 576) * 3
    w = torch.rand(576) + 0.5
    ours = OPS.rms_norm_bf16(x, w, 1e-5)
    ref = F.rms_norm(x, (576,), w, 1e-5)
    # one bf16 rounding of an fp32 value that itself differs by a few ulp: ≤ 1 bf16 ulp (2⁻⁸ rel.)
    assert ours.dtype == torch.bfloat16
    assert bool(((ours.float() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-30).all())


def test_silu_mul_bf16() -> None:
    gu = torch.randn(5, 2 * 1536) * 4
    gu[0, :8] = torch.tensor([-100.0, -88.0, -20.0, 0.0, 20.0, 88.0, 100.0, 1e-30])
    ours = OPS.silu_mul_bf16(gu)
    ref = F.silu(gu[:, :1536]) * gu[:, 1536:]
    assert bool(((ours.float() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-30).all())


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_rope_store_writes_cache_and_returns_q() -> None:
    nh, nkv, hd, t = 9, 3, 64, 6
    qkv = torch.randn(t, (nh + 2 * nkv) * hd)
    ang = torch.rand(40, hd // 2) * 6
    cos, sin = torch.cat([ang, ang], 1).cos(), torch.cat([ang, ang], 1).sin()
    pos = torch.tensor([0, 1, 2, 17, 39, 5])
    slots = torch.tensor([3, 4, 5, 60, 11, 0])
    kc = torch.zeros(nkv, 64, hd)
    vc = torch.zeros(nkv, 64, hd, dtype=torch.bfloat16)
    q = OPS.rope_store(qkv, cos, sin, pos, slots, kc, vc, nh, nkv)
    c, s = cos[pos][:, None], sin[pos][:, None]
    x = qkv.view(t, nh + 2 * nkv, hd)
    torch.testing.assert_close(q, _rope_ref(x[:, :nh], c, s), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        kc[:, slots].transpose(0, 1), _rope_ref(x[:, nh : nh + nkv], c, s), rtol=0, atol=1e-5
    )
    assert torch.equal(vc[:, slots].transpose(0, 1), x[:, nh + nkv :].to(torch.bfloat16))
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not bool(kc[:, untouched].any()) and not bool(vc[:, untouched].float().any())


@pytest.mark.parametrize("ctx", [[1], [16], [17, 5, 40], [100, 1, 33, 64]])
def test_decode_attention_matches_dense_softmax(ctx: list[int]) -> None:
    nh, nkv, hd, bs, nblocks = 9, 3, 64, 16, 40
    b = len(ctx)
    kc = torch.randn(nkv, nblocks * bs, hd)
    vc = torch.randn(nkv, nblocks * bs, hd).to(torch.bfloat16)
    q = torch.randn(b, nh, hd) * 2
    width = max((c + bs - 1) // bs for c in ctx)
    perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(sum(ctx)))  # scattered blocks
    tables = perm[: b * width].view(b, width).clone()
    scale = 1 / math.sqrt(hd)
    out = OPS.decode_attention(q, kc, vc, tables, torch.tensor(ctx), bs, scale, False).view(b, nh, hd)
    out16 = OPS.decode_attention(q, kc, vc, tables, torch.tensor(ctx), bs, scale, True)
    assert torch.equal(out16, out.view(b, -1).to(torch.bfloat16))
    for i, c in enumerate(ctx):
        slots = (tables[i][:, None] * bs + torch.arange(bs)).view(-1)[:c]
        k = kc[:, slots].repeat_interleave(nh // nkv, 0)  # [nh, c, hd]
        v = vc[:, slots].float().repeat_interleave(nh // nkv, 0)
        p = torch.softmax((q[i][:, None, :] * k).sum(-1) * scale, -1)
        ref = (p[..., None] * v).sum(1)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_rejects_bad_tables() -> None:
    kc = torch.zeros(3, 64, 64)
    vc = torch.zeros(3, 64, 64, dtype=torch.bfloat16)
    q = torch.zeros(1, 9, 64)
    with pytest.raises(RuntimeError, match="block id out of range"):
        OPS.decode_attention(q, kc, vc, torch.tensor([[7]]), torch.tensor([3]), 16, 0.125, False)
    with pytest.raises(RuntimeError, match="context length"):
        OPS.decode_attention(q, kc, vc, torch.tensor([[0]]), torch.tensor([17]), 16, 0.125, False)
    with pytest.raises(RuntimeError, match="x has"):
        cpu_ext.qmm(
            torch.zeros(1, 64, dtype=torch.bfloat16), cpu_ext.pack_q4(*_q4(16, 32, 0), True), 0, True, 16
        )


@pytest.mark.slow  # loads the model again in a subprocess
def test_fallback_without_the_kernels() -> None:
    """``VEIL_CPU_KERNELS=0``: the model packs for PyTorch's ops and runs the unfused forward."""
    code = (
        "from veil.enclave.model.loader import default_model_path, load_model\n"
        "from veil.enclave.runner.cpu import CpuRunner\n"
        "from veil.enclave.runner.protocol import GREEDY, SeqStep\n"
        "from veil.kernels.quant_cpu import Int4Linear\n"
        "m = load_model(default_model_path())\n"
        "assert isinstance(m.weights.layers[0].qkv, Int4Linear)\n"
        "r = CpuRunner(m, num_kv_blocks=8, block_size=16)\n"
        "assert not r.model.fused\n"
        "print(r.execute([SeqStep(0, [1, 2, 3], 0, [0], GREEDY)])[0])\n"
    )
    env = {**os.environ, "VEIL_CPU_KERNELS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().isdigit()


# --- which compiled library may be loaded (issue #12) -------------------------------------------


def _fake_entry(directory: Any, ident: Any, library: bytes = b"\x7fELF not really") -> Any:
    from veil.kernels.kernel_cache import sidecar_bytes

    entry = directory / ident.name
    entry.mkdir(parents=True)
    (entry / f"{ident.name}.so").write_bytes(library)
    (entry / f"{ident.name}.json").write_bytes(sidecar_bytes(ident, library))
    return entry


def test_a_library_loads_only_if_its_sidecar_names_these_sources_and_its_bytes(tmp_path: Any) -> None:
    from veil.kernels.errors import KernelCacheError
    from veil.kernels.kernel_cache import identify, verify_cached

    ident, sources = cpu_ext.identity()
    assert set(sources) == {"qmm.cpp", "fused.cpp", "common.h"}
    entry = _fake_entry(tmp_path, ident)
    assert verify_cached(entry, ident) == b"\x7fELF not really"
    # the .so swapped: refused before load
    (entry / f"{ident.name}.so").write_bytes(b"\x7fELF swapped")
    with pytest.raises(KernelCacheError, match="library bytes"):
        verify_cached(entry, ident)
    # a header changed, another torch, another Python: a different identity, the old entry refused
    for changed in (
        identify(
            {**sources, "common.h": sources["common.h"] + b"\n"}, torch.__version__, sys.version, ident.flags
        ),
        identify(sources, "9.9.9", sys.version, ident.flags),
        identify(sources, torch.__version__, "3.99", ident.flags),
    ):
        assert changed.name != ident.name
        fresh = _fake_entry(tmp_path / changed.name, ident)  # an entry built from the old identity ...
        (fresh / f"{ident.name}.so").rename(fresh / f"{changed.name}.so")
        (fresh / f"{ident.name}.json").rename(fresh / f"{changed.name}.json")
        with pytest.raises(KernelCacheError):
            verify_cached(fresh, changed)  # ... does not pass as a build of the new one
    with pytest.raises(KernelCacheError):
        verify_cached(tmp_path / "missing", ident)


def test_the_build_digest_covers_every_kernel_source() -> None:
    from veil.enclave.keys import build_manifest

    names = {name for name, _ in build_manifest()}
    _ident, sources = cpu_ext.identity()
    assert {f"veil/kernels/cpu/{n}" for n in sources} <= names


@pytest.mark.slow  # a subprocess imports torch
def test_a_swapped_prebuilt_library_is_refused_and_a_good_one_copied(tmp_path: Any) -> None:
    ident, _ = cpu_ext.identity()
    real = cpu_ext.default_cache_dir() / ident.name
    prebuilt = tmp_path / "prebuilt"
    shutil.copytree(real, prebuilt / ident.name)
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from veil.kernels import cpu_ext
        from veil.kernels.errors import KernelCacheError
        cpu_ext.configure(Path({str(tmp_path / "state")!r}), prebuilt=[Path({str(prebuilt)!r})])
        try:
            print(cpu_ext.build(compile=False))
        except KernelCacheError as exc:
            print("refused:", exc)
        """
    )

    def run() -> str:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    so = prebuilt / ident.name / f"{ident.name}.so"
    good = so.read_bytes()
    so.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit of native code changed
    assert run().startswith("refused:")
    assert not (tmp_path / "state" / ident.name).exists()  # nothing copied
    so.write_bytes(good)
    assert run() == str(tmp_path / "state" / ident.name / f"{ident.name}.so")  # verified, copied
    # the state copy swapped: refused; the prebuilt copy verifies and replaces it
    state_so = tmp_path / "state" / ident.name / f"{ident.name}.so"
    state_so.write_bytes(b"\x7fELF swapped")
    assert run() == str(state_so)
    assert state_so.read_bytes() == good
