"""Physical KV-cache blocks: reference counts, a per-tenant prefix cache, and which blocks to zero.

Pure bookkeeping: a block is an integer in ``range(num_blocks)``; the model runner maps it to a
slice of its cache tensors. Every block is in exactly one state:

* **owned**: ``ref > 0``, in the ``block_table`` of ``ref`` running sequences. Only a *cached*
  block (full, named by its tenant's hash chain, see :mod:`~veil.enclave.engine.prefix_cache`)
  can have ``ref > 1``, and only sequences of that one tenant ever hold it;
* **cached, idle**: ``ref == 0`` but still named in the cache; evicted least recently used
  first when a free block is needed;
* **free**: ``ref == 0``, unnamed.

Sharing and writing never meet: a sequence writes only positions ``>= num_computed``, and every
block it took from the cache lies wholly below ``num_computed``; a block is named (sealed) only
once all its positions are computed, so a named block is never written again until evicted.

**Zeroing before another tenant reads.** Each block remembers whose data it last held
(``Sequence.tenant``: the tenant's cache key, or the sequence itself when it shares nothing).
When a block is handed to a sequence of another tenant it is listed in :meth:`take_zero_list`,
and the engine has the runner zero those blocks before the step that first writes them. The new
owner overwrites each position before attending to it, but the runners' attention reads a
whole block and masks the positions past the context: a masked weight is exactly 0, yet
``0 × inf`` is NaN, so a stale non-finite value of another tenant could still reach the new
owner's output. Zeroing closes that; it costs one memset per reused block. A block manager built
with ``clean=False`` (over a cache that held data before it, as after an engine rebuild) treats
every block as holding someone else's data.

:func:`blocks_for_budget` sizes the cache from a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from veil.enclave.engine.prefix_cache import extend_block_hashes
from veil.enclave.engine.sequence import Sequence
from veil.enclave.errors import EngineInternalError

__all__ = ["BlockManager", "blocks_for_budget"]

_UNKNOWN = ("unknown",)  # residue of a block whose previous contents nobody knows


def blocks_for_budget(kv_cache_bytes: int, kv_bytes_per_token: int, block_size: int = 16) -> int:
    """How many KV blocks of ``block_size`` tokens fit in ``kv_cache_bytes``.

    ``kv_bytes_per_token`` is what one token occupies across all layers in the runner's cache
    (the CPU runner's: ``ModelConfig.kv_bytes_per_token``).
    """
    if kv_bytes_per_token < 1 or block_size < 1:
        raise EngineInternalError("kv_bytes_per_token and block_size must be positive")
    return max(0, kv_cache_bytes // (kv_bytes_per_token * block_size))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, clean: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise EngineInternalError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._residue: list[object] = [None if clean else _UNKNOWN] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, ref 0: least recently used first
        self._by_hash: dict[bytes, int] = {}
        self._zero: list[int] = []
        self.num_cache_hits = 0  # blocks taken from the cache (for tests and benchmarks)
        self.num_evictions = 0

    # ------------------------------------------------------------------ capacity

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given now: free ones and idle cached ones (evicted on demand)."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        """Blocks named in the prefix cache (owned or idle)."""
        return len(self._by_hash)

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
        return self.extra_blocks(seq, num_tokens) <= self.num_free

    # ------------------------------------------------------------------ the prefix cache

    def match_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding ``seq``'s leading full blocks (its tenant's only); takes nothing.

        At least the last token is always left to compute, since its logits give the next token.
        """
        if seq.cache_key is None or seq.block_table or seq.num_computed:
            return []
        n_full = (len(seq.token_ids) - 1) // self.block_size
        extend_block_hashes(seq.block_hashes, seq.cache_key, seq.token_ids, self.block_size, n_full)
        hits: list[int] = []
        for h in seq.block_hashes[:n_full]:
            block = self._by_hash.get(h)
            # the residue check is defence in depth: a tenant's key names only its own blocks
            if block is None or self._residue[block] != seq.tenant:
                break
            hits.append(block)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether ``seq`` can take ``hits`` and grow to ``num_tokens`` positions."""
        need = max(0, self.blocks_for(num_tokens) - len(hits))
        taken_idle = sum(1 for b in hits if self._ref[b] == 0)
        return need <= self.num_free - taken_idle

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a sequence with no blocks the cached blocks ``hits``; they count as computed."""
        if seq.block_table or seq.num_computed:
            raise EngineInternalError("prefix blocks given to a sequence that already has blocks")
        for b in hits:
            if self._hash[b] is None or self._residue[b] != seq.tenant:
                raise EngineInternalError("a block of another tenant or no cached block was matched")
            if self._ref[b] == 0:
                del self._idle[b]
            self._ref[b] += 1
            seq.block_table.append(b)
        self.num_cache_hits += len(hits)
        seq.num_computed = len(hits) * self.block_size
        seq.num_sealed = len(hits)

    def seal(self, seq: Sequence) -> None:
        """Name ``seq``'s newly computed full blocks in its tenant's cache (after a step committed)."""
        if seq.cache_key is None:
            return
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        if full <= seq.num_sealed:
            return
        extend_block_hashes(seq.block_hashes, seq.cache_key, seq.token_ids, self.block_size, full)
        for i in range(seq.num_sealed, full):
            b, h = seq.block_table[i], seq.block_hashes[i]
            if self._ref[b] != 1 or self._hash[b] is not None:
                raise EngineInternalError("sealing a block that is shared or already named")
            if h not in self._by_hash:  # else another block holds the same tokens: keep that one
                self._by_hash[h] = b
                self._hash[b] = h
        seq.num_sealed = full

    # ------------------------------------------------------------------ allocation

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` enough blocks for ``num_tokens`` positions (call :meth:`can_grow` first)."""
        need = self.extra_blocks(seq, num_tokens)
        if need > self.num_free:
            raise EngineInternalError(f"need {need} blocks, {self.num_free} free")
        tenant = seq.tenant
        for _ in range(need):
            block = self._take()
            if self._residue[block] is not None and self._residue[block] != tenant:
                self._zero.append(block)
            self._residue[block] = tenant
            self._ref[block] = 1
            seq.block_table.append(block)

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._idle.popitem(last=False)
        h = self._hash[block]
        if h is None or self._by_hash.get(h) != block:
            raise EngineInternalError("an idle block that is not named in the cache")
        del self._by_hash[h]
        self._hash[block] = None
        self.num_evictions += 1
        return block

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks; its table becomes empty.

        A named block whose last holder leaves stays cached (idle) for the tenant's next
        request; the rest are free. The table is released last block first, so a chain's tail
        is evicted before its head.
        """
        table = seq.block_table
        if len(set(table)) != len(table) or any(
            not 0 <= b < self.num_blocks or self._ref[b] < 1 for b in table
        ):
            raise EngineInternalError("a block freed twice or never allocated")
        for b in reversed(table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is not None:
                    self._idle[b] = None
                else:
                    self._free.append(b)
        table.clear()
        seq.num_sealed = 0

    def take_zero_list(self) -> list[int]:
        """Blocks handed to a new tenant since the last call: zero them before the next step."""
        blocks, self._zero = list(dict.fromkeys(self._zero)), []
        return blocks

    def mark_unknown(self, blocks: list[int]) -> None:
        """Zeroing ``blocks`` failed: whoever is given them next gets them zeroed first.

        The engine must not run the step (its sequences would read the blocks unzeroed)."""
        for b in blocks:
            self._residue[b] = _UNKNOWN

    # ------------------------------------------------------------------ inspection (tests)

    def free_blocks(self) -> frozenset[int]:
        """The blocks no sequence holds (free or idle cached)."""
        return frozenset(self._free) | frozenset(self._idle)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def cached_hash(self, block: int) -> bytes | None:
        return self._hash[block]

    def residue(self, block: int) -> object:
        """Whose data ``block`` last held (a tenant's cache key, a sequence, or nobody: None)."""
        return self._residue[block]
