"""Paged attention (decode kernel with split-KV, prefill via SDPA and via Triton) against the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from veil.kernels.errors import KernelInputError
from veil.kernels.reference_gpu import paged_attention_decode_ref, paged_attention_prefill_ref
from veil.kernels.triton_paged_attention import paged_attention_decode, pick_decode_config
from veil.kernels.triton_paged_prefill import paged_attention_prefill

TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


@dataclass
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor


def _paged_kv(
    lens: list[int],
    block_size: int,
    kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> PagedKV:
    """A cache with shuffled physical blocks (so block tables are not the identity) and spare blocks."""
    g = torch.Generator().manual_seed(sum(lens) + block_size)
    per_seq = [-(-n // block_size) for n in lens]
    max_blocks = max([*per_seq, 1])
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(lens), max_blocks), num_blocks - 1, dtype=torch.int32)  # junk past the end
    used = 0
    for b, count in enumerate(per_seq):
        tables[b, :count] = order[used : used + count]
        used += count
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return PagedKV(
        torch.randn(shape, generator=g).to(device, dtype),
        torch.randn(shape, generator=g).to(device, dtype),
        tables.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
    )


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "layout",
    [
        (4, 4, 16, 16),  # MHA
        (6, 2, 32, 12),  # GQA 3:1 (padded to 16 rows), block size not a power of two
        (9, 3, 64, 16),  # SmolLM2-135M's head layout
        (8, 1, 16, 32),  # MQA
    ],
)
def test_decode_matches_reference(
    layout: tuple[int, int, int, int], dtype: torch.dtype, kernel_device: torch.device
) -> None:
    heads, kv_heads, head_dim, block_size = layout
    lens = [1, 17, 50, 0, 33]  # ragged, one sequence with nothing cached, tails inside a block
    kv = _paged_kv(lens, block_size, kv_heads, head_dim, dtype=dtype, device=kernel_device)
    q = torch.randn(len(lens), heads, head_dim, generator=torch.Generator().manual_seed(heads)).to(
        kernel_device, dtype
    )
    ref = paged_attention_decode_ref(
        q, kv.k_cache, kv.v_cache, kv.block_tables, context_lens=kv.context_lens, scale=head_dim**-0.5
    )
    out = paged_attention_decode(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, block_n=16)
    _assert_close(out, ref)
    assert not out[3].any()  # an empty context attends to nothing


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_decode_split_kv_matches_unsplit(num_splits: int, kernel_device: torch.device) -> None:
    lens = [80, 3, 65]  # with 5 splits of 16 positions the 3-token sequence leaves 4 splits empty
    kv = _paged_kv(lens, 16, 2, 32, dtype=torch.float32, device=kernel_device)
    q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    ref = paged_attention_decode_ref(
        q, kv.k_cache, kv.v_cache, kv.block_tables, context_lens=kv.context_lens, scale=0.3
    )
    out = paged_attention_decode(
        q,
        kv.k_cache,
        kv.v_cache,
        kv.block_tables,
        kv.context_lens,
        scale=0.3,
        num_splits=num_splits,
        block_n=16,
    )
    _assert_close(out, ref)


def test_decode_writes_into_out_and_bounds_by_max_context_len(kernel_device: torch.device) -> None:
    kv = _paged_kv([40, 7], 8, 2, 16, dtype=torch.float16, device=kernel_device)
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2)).to(kernel_device, torch.float16)
    out = torch.full_like(q, float("nan"))
    res = paged_attention_decode(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, max_context_len=48, out=out, block_n=16
    )
    assert res is out
    ref = paged_attention_decode_ref(
        q, kv.k_cache, kv.v_cache, kv.block_tables, context_lens=kv.context_lens, scale=0.25
    )
    _assert_close(out, ref)


def test_split_choice_depends_on_shapes_only() -> None:
    cpu = torch.device("cpu")
    few = pick_decode_config(1, 8, 32768, cpu)
    many = pick_decode_config(256, 8, 32768, cpu)
    assert few.num_splits > 1 and many.num_splits == 1
    assert few.partition * few.num_splits >= 32768
    assert pick_decode_config(4, 2, 100, cpu, num_splits=64, block_n=16).num_splits <= 7


def test_decode_rejects_mismatched_inputs(kernel_device: torch.device) -> None:
    kv = _paged_kv([4], 4, 2, 16, dtype=torch.float32, device=kernel_device)
    with pytest.raises(KernelInputError):  # 5 heads do not share 2 kv heads evenly
        paged_attention_decode(
            torch.zeros(1, 5, 16, device=kernel_device),
            kv.k_cache,
            kv.v_cache,
            kv.block_tables,
            kv.context_lens,
        )
    with pytest.raises(KernelInputError):  # dtype mismatch
        paged_attention_decode(
            torch.zeros(1, 4, 16, device=kernel_device, dtype=torch.float16),
            kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens,
        )  # fmt: skip
    with pytest.raises(KernelInputError):  # batch of 2 against one block-table row
        paged_attention_decode(
            torch.zeros(2, 4, 16, device=kernel_device),
            kv.k_cache,
            kv.v_cache,
            kv.block_tables,
            kv.context_lens,
        )


# -------------------------------------------------------------------------------------------- prefill


def _prefill_case(
    q_lens: list[int], heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=torch.Generator().manual_seed(len(q_lens)))
    return q.to(device, dtype), starts


@pytest.mark.parametrize("impl", ["sdpa", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_reference(impl: str, dtype: torch.dtype, kernel_device: torch.device) -> None:
    # Whole prompts (q_len == context), a continued chunk (q_len < context), an empty chunk, one token.
    lens, q_lens = [20, 45, 9, 5], [20, 13, 0, 1]
    heads, kv_heads, head_dim = 6, 2, 32
    kv = _paged_kv(lens, 16, kv_heads, head_dim, dtype=dtype, device=kernel_device)
    q, starts = _prefill_case(q_lens, heads, head_dim, dtype=dtype, device=kernel_device)
    ref = paged_attention_prefill_ref(
        q,
        kv.k_cache,
        kv.v_cache,
        kv.block_tables,
        context_lens=kv.context_lens,
        query_start_loc=starts,
        scale=0.2,
    )
    out = paged_attention_prefill(
        q, kv.k_cache, kv.v_cache, kv.block_tables,
        context_lens=kv.context_lens, query_start_loc=starts, max_query_len=max(q_lens), scale=0.2, impl=impl,
    )  # fmt: skip
    _assert_close(out, ref)


def test_prefill_rejects_unknown_impl_and_overlong_chunks(kernel_device: torch.device) -> None:
    kv = _paged_kv([4], 4, 1, 16, dtype=torch.float32, device=kernel_device)
    q = torch.zeros(6, 2, 16, device=kernel_device)
    starts = torch.tensor([0, 6], dtype=torch.int32, device=kernel_device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables)
    with pytest.raises(KernelInputError):
        paged_attention_prefill(
            *args, context_lens=kv.context_lens, query_start_loc=starts, max_query_len=6, impl="flash"
        )
    with pytest.raises(KernelInputError):  # six queries but only four cached positions
        paged_attention_prefill(*args, context_lens=kv.context_lens, query_start_loc=starts, max_query_len=6)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_decode_llama8b_heads(batch: int, dtype: torch.dtype, cuda_device: torch.device) -> None:
    lens = [2048 - 31 * i for i in range(batch)]  # ragged: 2048 down to 95
    kv = _paged_kv(lens, 16, 8, 128, dtype=dtype, device=cuda_device)
    q = torch.randn(batch, 32, 128, device=cuda_device, dtype=dtype)
    ref = paged_attention_decode_ref(
        q, kv.k_cache, kv.v_cache, kv.block_tables, context_lens=kv.context_lens, scale=128**-0.5
    )
    _assert_close(paged_attention_decode(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_prefill(impl: str, dtype: torch.dtype, cuda_device: torch.device) -> None:
    lens, q_lens = [512, 1000, 300], [512, 200, 1]
    kv = _paged_kv(lens, 16, 8, 128, dtype=dtype, device=cuda_device)
    q, starts = _prefill_case(q_lens, 32, 128, dtype=dtype, device=cuda_device)
    ref = paged_attention_prefill_ref(
        q,
        kv.k_cache,
        kv.v_cache,
        kv.block_tables,
        context_lens=kv.context_lens,
        query_start_loc=starts,
        scale=128**-0.5,
    )
    out = paged_attention_prefill(
        q, kv.k_cache, kv.v_cache, kv.block_tables,
        context_lens=kv.context_lens, query_start_loc=starts, max_query_len=512, impl=impl,
    )  # fmt: skip
    _assert_close(out, ref)
