"""Fused RMSNorm + residual and RoPE + KV-cache write against their PyTorch references."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from veil.kernels.errors import KernelInputError
from veil.kernels.reference_gpu import rmsnorm_residual_ref, rope_cos_sin, rope_kv_write_ref
from veil.kernels.triton_fused import rmsnorm_residual, rope_kv_write


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("hidden", [96, 576])  # 96: row shorter than its power-of-two block
def test_rmsnorm_residual_matches_reference(
    hidden: int, with_residual: bool, dtype: torch.dtype, kernel_device: torch.device
) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(2, 3, hidden, generator=g) * 3).to(kernel_device, dtype)
    residual = torch.randn(2, 3, hidden, generator=g).to(kernel_device, dtype) if with_residual else None
    weight = torch.randn(hidden, generator=g).to(kernel_device, dtype)
    out, new_residual = rmsnorm_residual(x, residual, weight, 1e-5)
    ref_out, ref_residual = rmsnorm_residual_ref(x, residual, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(new_residual, ref_residual)
    # Same roundings as the reference: fp32 exact up to the reduction order, fp16 within one ulp.
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=1e-3)


def test_rmsnorm_rejects_mismatched_inputs(kernel_device: torch.device) -> None:
    x = torch.zeros(2, 8, device=kernel_device)
    with pytest.raises(KernelInputError):
        rmsnorm_residual(x, None, torch.ones(4, device=kernel_device), 1e-5)
    with pytest.raises(KernelInputError):
        rmsnorm_residual(
            x,
            torch.zeros(2, 8, dtype=torch.float16, device=kernel_device),
            torch.ones(8, device=kernel_device),
            1e-5,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("neox", [True, False])
def test_rope_kv_write_matches_reference(neox: bool, dtype: torch.dtype, kernel_device: torch.device) -> None:
    tokens, heads, kv_heads, head_dim, block_size = 7, 6, 2, 24, 10  # D/2 = 12 is not a power of two
    g = torch.Generator().manual_seed(int(neox))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(kernel_device, dtype)
    # q, k, v as strided views of one fused projection, as the model produces them
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    cos, sin = rope_cos_sin(64, head_dim, 10000.0, device=kernel_device)
    positions = torch.tensor([0, 5, 9, 63, 1, 2, 3], device=kernel_device)
    slots = torch.tensor([0, 7, -1, 30, 12, 13, 5], device=kernel_device)  # -1: a padding token
    caches = [
        torch.zeros(4, block_size, kv_heads, head_dim, dtype=dtype, device=kernel_device) for _ in range(4)
    ]
    kwargs = {"positions": positions, "cos": cos, "sin": sin, "slot_mapping": slots, "neox": neox}
    q_out, k_out = rope_kv_write(q, k, v, k_cache=caches[0], v_cache=caches[1], **kwargs)
    q_ref, k_ref = rope_kv_write_ref(q, k, v, k_cache=caches[2], v_cache=caches[3], **kwargs)
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=1e-3)
    torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=1e-3)
    torch.testing.assert_close(caches[0], caches[2], atol=atol, rtol=1e-3)
    assert torch.equal(caches[1], caches[3])  # v is copied, not computed
    written = caches[1].flatten(0, 1).abs().sum(dim=(1, 2)) > 0
    assert written.nonzero().flatten().tolist() == [0, 5, 7, 12, 13, 30]
    # Position 0 is the identity rotation.
    torch.testing.assert_close(q_out[0], q[0], atol=atol, rtol=0)


def test_rope_matches_hf_rotate_half_formula(kernel_device: torch.device) -> None:
    head_dim = 16
    cos, sin = rope_cos_sin(32, head_dim, 10000.0, device=kernel_device)
    q = torch.randn(1, 1, head_dim, generator=torch.Generator().manual_seed(3)).to(kernel_device)
    pos = torch.tensor([11], device=kernel_device)
    cache = torch.zeros(1, 1, 1, head_dim, device=kernel_device)
    out, _ = rope_kv_write(
        q, q, q, positions=pos, cos=cos, sin=sin, k_cache=cache, v_cache=cache.clone(),
        slot_mapping=torch.tensor([0], device=kernel_device),
    )  # fmt: skip
    c = torch.cat((cos[11], cos[11]))
    s = torch.cat((sin[11], sin[11]))
    rotate_half = torch.cat((-q[0, 0, head_dim // 2 :], q[0, 0, : head_dim // 2]))
    torch.testing.assert_close(out[0, 0], q[0, 0] * c + rotate_half * s, atol=1e-6, rtol=1e-5)


def test_rope_rejects_bad_tables(kernel_device: torch.device) -> None:
    q = torch.zeros(2, 2, 8, device=kernel_device)
    cos, sin = rope_cos_sin(8, 6, 10000.0, device=kernel_device)  # built for head_dim 6
    cache = torch.zeros(1, 4, 2, 8, device=kernel_device)
    zeros = torch.zeros(2, dtype=torch.long, device=kernel_device)
    with pytest.raises(KernelInputError):
        rope_kv_write(
            q,
            q,
            q,
            positions=zeros,
            cos=cos,
            sin=sin,
            k_cache=cache,
            v_cache=cache.clone(),
            slot_mapping=zeros,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fused_llama8b_sizes(dtype: torch.dtype, cuda_device: torch.device) -> None:
    x = torch.randn(333, 4096, device=cuda_device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(4096, device=cuda_device, dtype=dtype)
    out, new_residual = rmsnorm_residual(x, residual, weight, 1e-5)
    ref_out, ref_residual = rmsnorm_residual_ref(x, residual, weight, 1e-5)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=1e-2)
    assert torch.equal(new_residual, ref_residual)

    tokens, heads, kv_heads, head_dim = 333, 32, 8, 128
    q = torch.randn(tokens, heads, head_dim, device=cuda_device, dtype=dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=cuda_device, dtype=dtype)
    v = torch.randn_like(k)
    cos, sin = rope_cos_sin(8192, head_dim, 500000.0, device=cuda_device)
    positions = torch.randint(0, 8192, (tokens,), device=cuda_device)
    slots = torch.randperm(64 * 16, device=cuda_device)[:tokens]
    caches = [torch.zeros(64, 16, kv_heads, head_dim, device=cuda_device, dtype=dtype) for _ in range(4)]
    kwargs = {"positions": positions, "cos": cos, "sin": sin, "slot_mapping": slots}
    got = rope_kv_write(q, k, v, k_cache=caches[0], v_cache=caches[1], **kwargs)
    want = rope_kv_write_ref(q, k, v, k_cache=caches[2], v_cache=caches[3], **kwargs)
    for a, b in [*zip(got, want, strict=True), (caches[0], caches[2]), (caches[1], caches[3])]:
        torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)
