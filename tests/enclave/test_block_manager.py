from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.enclave.engine.block_manager import BlockManager, blocks_for_budget
from veil.enclave.engine.sequence import Sequence
from veil.enclave.errors import EngineInternalError


def test_grow_allocates_whole_blocks_only_when_needed() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    seq = Sequence(0, list(range(20)))
    assert bm.blocks_for(0) == 0
    assert bm.blocks_for(16) == 1
    assert bm.blocks_for(17) == 2
    bm.grow(seq, 16)
    assert len(seq.block_table) == 1
    bm.grow(seq, 16)  # already covered
    assert len(seq.block_table) == 1
    bm.grow(seq, 17)
    assert len(seq.block_table) == 2
    assert bm.num_free == 2
    assert bm.capacity_tokens == 64


def test_free_returns_blocks_and_empties_table() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = Sequence(0, [1, 2, 3]), Sequence(1, [4])
    bm.grow(a, 3)
    bm.grow(b, 1)
    assert bm.num_free == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free == 2
    bm.free(a)  # nothing left to free: no-op
    assert bm.num_free == 2


def test_grow_beyond_free_blocks_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence(0, [0] * 12)
    assert not bm.can_grow(seq, 12)
    with pytest.raises(EngineInternalError):
        bm.grow(seq, 12)
    assert seq.block_table == []
    assert bm.num_free == 2


def test_double_free_is_detected() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    a = Sequence(0, [0])
    bm.grow(a, 1)
    b = Sequence(1, [0], block_table=list(a.block_table))  # a forged second owner
    bm.free(a)
    with pytest.raises(EngineInternalError):
        bm.free(b)


def test_bad_sizes_rejected() -> None:
    with pytest.raises(EngineInternalError):
        BlockManager(num_blocks=0, block_size=16)
    with pytest.raises(EngineInternalError):
        BlockManager(num_blocks=4, block_size=0)


@given(
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 5),
    ops=st.lists(st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 4), st.integers(1, 30))),
)
def test_blocks_are_never_leaked_or_double_owned(
    num_blocks: int, block_size: int, ops: list[tuple[str, int, int]]
) -> None:
    bm = BlockManager(num_blocks, block_size)
    seqs = [Sequence(i, [0]) for i in range(5)]
    for op, who, n in ops:
        seq = seqs[who]
        if op == "grow":
            if bm.can_grow(seq, n):
                bm.grow(seq, n)
                assert len(seq.block_table) * block_size >= n
            else:
                with pytest.raises(EngineInternalError):
                    bm.grow(seq, n)
        else:
            bm.free(seq)
        owned = [b for s in seqs for b in s.block_table]
        assert len(owned) == len(set(owned)), "a block has two owners"
        assert set(owned).isdisjoint(bm.free_blocks()), "an owned block is also free"
        assert set(owned) | bm.free_blocks() == set(range(num_blocks)), "a block leaked"


def test_blocks_for_budget() -> None:
    assert blocks_for_budget(6 * 16 * 10 + 5, 6, 16) == 10
    assert blocks_for_budget(6 * 16 - 1, 6, 16) == 0
    assert blocks_for_budget(100, 1, 1) == 100
    with pytest.raises(EngineInternalError):
        blocks_for_budget(100, 0, 16)


def test_the_pure_engine_modules_import_no_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "triton", "transformers", "gguf"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import veil.enclave.engine.block_manager, veil.enclave.engine.scheduler
        import veil.enclave.engine.sequence, veil.enclave.engine.sampling, veil.enclave.engine.detokenizer
        import veil.enclave.runner.protocol, veil.proto.chat
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
