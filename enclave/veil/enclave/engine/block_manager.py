"""Physical KV-cache blocks: a free list, and block tables that grow with their sequences.

Pure bookkeeping: a block is an integer in ``range(num_blocks)``; the model runner maps it to
a slice of its cache tensors. Blocks are never shared between sequences (no prefix caching:
the data-handling policy forbids cross-request KV reuse by default), so every block is either
free or owned by exactly one sequence's ``block_table``. :func:`blocks_for_budget` sizes the
cache from a byte budget.
"""

from __future__ import annotations

from collections import deque

from veil.enclave.engine.sequence import Sequence
from veil.enclave.errors import EngineInternalError

__all__ = ["BlockManager", "blocks_for_budget"]


def blocks_for_budget(kv_cache_bytes: int, kv_bytes_per_token: int, block_size: int = 16) -> int:
    """How many KV blocks of ``block_size`` tokens fit in ``kv_cache_bytes``.

    ``kv_bytes_per_token`` is what one token occupies across all layers in the runner's cache
    (the CPU runner's: ``ModelConfig.kv_bytes_per_token``).
    """
    if kv_bytes_per_token < 1 or block_size < 1:
        raise EngineInternalError("kv_bytes_per_token and block_size must be positive")
    return max(0, kv_cache_bytes // (kv_bytes_per_token * block_size))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise EngineInternalError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._free_set: set[int] = set(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can ever hold in the cache."""
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that cover ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` lacks to hold ``num_tokens`` positions in total."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` enough blocks for ``num_tokens`` positions (call :meth:`can_grow` first)."""
        need = self.extra_blocks(seq, num_tokens)
        if need > len(self._free):
            raise EngineInternalError(f"need {need} blocks, {len(self._free)} free")
        for _ in range(need):
            block = self._free.popleft()
            self._free_set.discard(block)
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` to the free list; its table becomes empty."""
        table = seq.block_table
        if len(set(table)) != len(table) or any(
            b in self._free_set or not 0 <= b < self.num_blocks for b in table
        ):
            raise EngineInternalError("a block freed twice or never allocated")
        self._free.extend(table)
        self._free_set.update(table)
        table.clear()

    def free_blocks(self) -> frozenset[int]:
        """The free blocks (for invariant checks in tests)."""
        return frozenset(self._free_set)
