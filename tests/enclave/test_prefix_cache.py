"""Prefix caching, pure part: the tenant key, the hash chain, and the block manager and scheduler
under random multi-tenant workloads against a paged cache double that tags every slot with the
tenant that wrote it (so a block shared across tenants, a stale slot read or a lost block fails)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.enclave.engine.block_manager import BlockManager
from veil.enclave.engine.prefix_cache import (
    block_hash,
    check_tenant_secret,
    extend_block_hashes,
    tenant_cache_key,
)
from veil.enclave.engine.scheduler import Scheduler
from veil.enclave.engine.sequence import Sequence, SequenceStatus
from veil.enclave.errors import EngineInternalError, InvalidRequestError

ENCLAVE = b"\x11" * 32
KEY_A = tenant_cache_key(ENCLAVE, b"A" * 32)
KEY_B = tenant_cache_key(ENCLAVE, b"B" * 32)


# ---------------------------------------------------------------------------- keys and chain


def test_cache_key_depends_on_enclave_secret_and_tenant() -> None:
    assert KEY_A != KEY_B
    assert tenant_cache_key(b"\x22" * 32, b"A" * 32) != KEY_A  # another enclave: another key
    assert tenant_cache_key(ENCLAVE, b"A" * 32) == KEY_A
    assert KEY_A != b"A" * 32 and len(KEY_A) == 32  # never the client's bytes themselves


@pytest.mark.parametrize("bad", [b"short", b"x" * 65, "a string of forty characters, not bytes", 7])
def test_tenant_secret_must_be_16_to_64_bytes(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        check_tenant_secret(bad)
    assert check_tenant_secret(None) is None and check_tenant_secret(b"") is None
    with pytest.raises(EngineInternalError):
        tenant_cache_key(b"short", b"A" * 32)


def test_hash_chain_covers_every_earlier_token_and_the_tenant() -> None:
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 5, 6, 7, 8]
    ha: list[bytes] = []
    hb: list[bytes] = []
    extend_block_hashes(ha, KEY_A, a, 4, 2)
    extend_block_hashes(hb, KEY_A, b, 4, 2)
    assert ha[0] != hb[0] and ha[1] != hb[1]  # same second block, different history
    hb2: list[bytes] = []
    extend_block_hashes(hb2, KEY_B, a, 4, 2)
    assert set(hb2).isdisjoint(ha)  # same tokens, other tenant
    assert ha[1] == block_hash(KEY_A, ha[0], a[4:])
    with pytest.raises(EngineInternalError):
        extend_block_hashes([], KEY_A, a, 4, 3)  # block 3 is not full


# ---------------------------------------------------------------------------- block manager


def _seq(seq_id: int, tokens: list[int], key: bytes | None) -> Sequence:
    return Sequence(seq_id, list(tokens), cache_key=key)


def _run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admit ``seq`` with its cached prefix, compute the rest, name its full blocks."""
    hits = bm.match_prefix(seq)
    assert bm.can_admit(seq, hits, len(seq.token_ids))
    bm.admit(seq, hits)
    bm.grow(seq, len(seq.token_ids))
    seq.num_computed = len(seq.token_ids)
    bm.seal(seq)


def test_same_tenant_reuses_full_blocks_other_tenant_never() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a1 = _seq(0, prompt, KEY_A)
    _run_prefill(bm, a1)
    a1_blocks = list(a1.block_table)
    bm.free(a1)
    assert bm.num_cached == 2 and bm.num_free == 16

    b = _seq(1, prompt, KEY_B)
    assert bm.match_prefix(b) == []
    _run_prefill(bm, b)
    a2 = _seq(2, [*prompt, 99], KEY_A)
    hits = bm.match_prefix(a2)
    assert hits == a1_blocks[:2]
    assert set(hits).isdisjoint(b.block_table)
    bm.admit(a2, hits)
    assert a2.num_computed == 8
    anon = _seq(3, prompt, None)
    assert bm.match_prefix(anon) == []  # no tenant: shares nothing


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = _seq(0, list(range(8)), KEY_A)
    _run_prefill(bm, first)
    bm.free(first)
    again = _seq(1, list(range(8)), KEY_A)
    hits = bm.match_prefix(again)
    assert len(hits) == 1  # block 2 would leave nothing to compute: it is recomputed


def test_shared_blocks_are_ref_counted_and_idle_ones_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    x = _seq(0, [1, 2, 3, 4, 5], KEY_A)
    _run_prefill(bm, x)  # 3 blocks, 2 named
    y = _seq(1, [1, 2, 3, 4, 6], KEY_A)
    hits = bm.match_prefix(y)
    assert hits == x.block_table[:2]
    bm.admit(y, hits)
    assert [bm.ref_count(b) for b in hits] == [2, 2]
    bm.free(x)
    assert [bm.ref_count(b) for b in hits] == [1, 1]
    bm.free(y)
    assert bm.num_free == 4 and bm.num_cached == 2
    z = _seq(2, [7] * 8, KEY_B)  # needs all 4 blocks: both idle named blocks are evicted
    bm.grow(z, 8)
    assert bm.num_cached == 0 and bm.num_evictions == 2
    # the two blocks that held tenant A's data are zeroed before tenant B uses them
    zeroed = bm.take_zero_list()
    assert set(hits) <= set(zeroed) and bm.take_zero_list() == []


def test_clean_false_zeroes_every_block_before_first_use() -> None:
    bm = BlockManager(num_blocks=3, block_size=2, clean=False)
    s = _seq(0, [1, 2, 3], None)
    bm.grow(s, 3)
    assert sorted(bm.take_zero_list()) == sorted(s.block_table)


def test_same_tenant_reuse_is_not_zeroed() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    a = _seq(0, [1, 2, 3], KEY_A)
    bm.grow(a, 3)
    bm.free(a)
    a2 = _seq(1, [4, 5, 6], KEY_A)
    bm.grow(a2, 3)
    assert bm.take_zero_list() == []
    bm.free(a2)
    anon = _seq(2, [1], None)  # a request with no tenant is a tenant of its own
    bm.grow(anon, 1)
    assert bm.take_zero_list() == anon.block_table


def test_sealing_a_shared_block_or_freeing_twice_is_an_internal_error() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq(0, [1, 2, 3], KEY_A)
    _run_prefill(bm, a)
    forged = _seq(1, [1, 2, 3], KEY_B)
    with pytest.raises(EngineInternalError):
        bm.admit(forged, a.block_table[:1])  # another tenant's cached block
    bm.free(a)
    a.block_table.extend([0])
    with pytest.raises(EngineInternalError):
        bm.free(a)


# ---------------------------------------------------------------------------- scheduler + cache double


@dataclass
class PagedDouble:
    """A paged KV cache of (tenant, position, token) per slot, read the way the runners read:
    whole blocks, including the masked tail past the context."""

    block_size: int
    slots: dict[int, tuple[object, int, int]] = field(default_factory=dict)

    def zero(self, blocks: list[int]) -> None:
        for b in blocks:
            for i in range(self.block_size):
                self.slots.pop(b * self.block_size + i, None)

    def run(self, seq: Sequence, start: int, n: int) -> int | None:
        bs, table = self.block_size, seq.block_table
        for p in range(start, start + n):
            self.slots[table[p // bs] * bs + p % bs] = (seq.tenant, p, seq.token_ids[p])
        end = start + n
        if end != len(seq.token_ids):
            return None
        for p in range(-(-end // bs) * bs):
            slot = self.slots.get(table[p // bs] * bs + p % bs)
            if p < end:  # attended: must hold exactly this sequence's token at this position
                assert slot is not None, "read a slot nobody wrote"
                who, pos, tok = slot
                assert (pos, tok) == (p, seq.token_ids[p]), "wrong KV content"
                # a shared slot was written by this tenant (its cache key), or by this sequence
                assert who == seq.tenant, "another tenant's KV was attended"
            else:  # masked tail: zeroed, or this tenant's own leftovers
                assert slot is None or slot[0] == seq.tenant, "another tenant's residue in the tail"
        return next_token(seq.token_ids)


def next_token(tokens: list[int]) -> int:
    h = hashlib.blake2b(repr(tokens).encode(), digest_size=4).digest()
    return int.from_bytes(h, "big") % 7


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt) :]


def check_invariants(bm: BlockManager, sched: Scheduler) -> None:
    holders: dict[int, list[Sequence]] = {}
    for s in sched.running:
        assert len(set(s.block_table)) == len(s.block_table)
        for b in s.block_table:
            holders.setdefault(b, []).append(s)
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed == 0
    free = bm.free_blocks()
    for b in range(bm.num_blocks):
        owners = holders.get(b, [])
        assert bm.ref_count(b) == len(owners), "ref count differs from the block tables"
        assert (b in free) == (not owners), "a block both free and owned, or neither (leaked)"
        if len(owners) > 1:
            assert bm.cached_hash(b) is not None, "an unnamed block is shared"
            assert len({o.tenant for o in owners}) == 1, "a block shared across tenants"
            assert all(o.cache_key is not None for o in owners)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[int, int, int, list[tuple[int, list[int], int]]]:
    block_size = draw(st.sampled_from([2, 3, 4]))
    shared = [draw(st.lists(st.integers(0, 3), min_size=0, max_size=12)) for _ in range(2)]
    reqs = []
    for _ in range(draw(st.integers(1, 10))):
        tenant = draw(st.integers(0, 2))  # 0, 1: tenants A, B; 2: a request with no tenant
        prompt = draw(st.sampled_from(shared)) + draw(st.lists(st.integers(0, 3), min_size=1, max_size=6))
        reqs.append((tenant, prompt, draw(st.integers(1, 6))))
    longest = max(len(p) + m for _, p, m in reqs)
    num_blocks = draw(st.integers(-(-longest // block_size), -(-longest // block_size) + 8))
    budget = draw(st.integers(1, 16))
    return block_size, num_blocks, budget, reqs


def simulate(
    block_size: int, num_blocks: int, budget: int, reqs: list[tuple[int, list[int], int]], *, caching: bool
) -> tuple[dict[int, list[int]], BlockManager, Scheduler]:
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget)
    kv = PagedDouble(block_size)
    keys = [KEY_A, KEY_B, None]
    seqs: dict[int, Sequence] = {}
    limits: dict[int, int] = {}
    pending = list(enumerate(reqs))
    for _ in range(5000):
        if pending and (not sched.running or len(pending) % 2):  # arrivals interleave with steps
            i, (tenant, prompt, max_tokens) = pending.pop(0)
            seqs[i] = Sequence(i, list(prompt), cache_key=keys[tenant] if caching else None)
            limits[i] = max_tokens
            sched.add(seqs[i], len(prompt) + max_tokens)
        if not sched.has_unfinished():
            if not pending:
                break
            continue
        out = sched.schedule()
        assert out.scheduled, "requests queued but none scheduled"
        kv.zero(out.zero_blocks)
        sampled = [(item.seq, kv.run(item.seq, item.start_pos, item.num_tokens)) for item in out.scheduled]
        sched.commit(out)
        for seq, tok in sampled:
            if tok is None:
                continue
            seq.append_token(tok)
            if seq.num_completion_tokens >= limits[seq.seq_id]:
                sched.finish(seq)
        check_invariants(bm, sched)
    else:
        raise AssertionError("the workload did not finish")
    assert all(s.status is SequenceStatus.FINISHED for s in seqs.values())
    assert bm.num_free == num_blocks, "a block leaked"
    return {i: s.token_ids[s.num_prompt_tokens :] for i, s in seqs.items()}, bm, sched


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_random_multi_tenant_workloads_keep_every_invariant(
    work: tuple[int, int, int, list[tuple[int, list[int], int]]],
) -> None:
    block_size, num_blocks, budget, reqs = work
    outputs, _, _ = simulate(block_size, num_blocks, budget, reqs, caching=True)
    # outputs equal what each request gives alone, whatever was cached, evicted or preempted
    assert outputs == {i: reference(p, m) for i, (_, p, m) in enumerate(reqs)}


def test_a_second_turn_hits_its_own_cache_and_preemption_keeps_outputs_equal() -> None:
    turn1 = [1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    reqs = [(0, turn1, 4), (0, turn1 + reference(turn1, 4) + [3, 3], 4), (1, turn1, 4)]
    outputs, bm, _ = simulate(4, 64, 64, reqs, caching=True)
    assert outputs == {i: reference(p, m) for i, (_, p, m) in enumerate(reqs)}
    assert bm.num_cache_hits >= 3  # turn 2 reused turn 1's three full blocks; tenant B none of them
    # a cache so small that sequences preempt each other, with and without caching: same outputs
    many = [(i % 2, [*turn1, i % 4], 6) for i in range(8)]
    tight, tbm, tsched = simulate(4, 5, 8, many, caching=True)
    loose, _, _ = simulate(4, 5, 8, many, caching=False)
    assert tight == loose == {i: reference(p, m) for i, (_, p, m) in enumerate(many)}
    assert tsched.num_preemptions > 0 and tbm.num_evictions > 0


def test_two_tenants_sending_the_same_prefix_never_share_a_block() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=256)
    prompt = list(range(20))
    a = Sequence(0, list(prompt), cache_key=KEY_A)
    sched.add(a, 30)
    sched.commit(sched.schedule())  # A's prompt computed and named
    a.append_token(5)
    b = Sequence(1, list(prompt), cache_key=KEY_B)
    a2 = Sequence(2, list(prompt), cache_key=KEY_A)
    sched.add(b, 30)
    sched.add(a2, 30)
    out = sched.schedule()
    starts = {item.seq.seq_id: item.start_pos for item in out.scheduled}
    assert starts == {0: 20, 1: 0, 2: 16}
    assert set(b.block_table).isdisjoint(a.block_table) and set(b.block_table).isdisjoint(a2.block_table)
    assert a2.block_table[:4] == a.block_table[:4]
    assert b.num_cached_tokens == 0 and a2.num_cached_tokens == 16


# ---------------------------------------------------------------------------- data policy switch


def test_data_policy_says_whether_a_tenant_may_share() -> None:
    from importlib import resources

    from veil.enclave.data_policy import parse_data_policy
    from veil.enclave.errors import DataPolicyError

    default = resources.files("veil.enclave").joinpath("data_policy.toml").read_bytes()
    assert parse_data_policy(default).share_kv_within_tenant is True
    line = b"share_kv_within_tenant = true"
    off = parse_data_policy(default.replace(line, b"share_kv_within_tenant = false"))
    absent = parse_data_policy(default.replace(line, b""))
    assert off.share_kv_within_tenant is False and absent.share_kv_within_tenant is False  # fail closed
    assert len({parse_data_policy(default).digest, off.digest, absent.digest}) == 3  # attested
    with pytest.raises(DataPolicyError, match="share_kv_within_tenant"):
        parse_data_policy(default.replace(line, b'share_kv_within_tenant = "yes"'))
    with pytest.raises(DataPolicyError, match="share_kv_across_requests"):
        parse_data_policy(
            default.replace(b"share_kv_across_requests = false", b"share_kv_across_requests = true")
        )
