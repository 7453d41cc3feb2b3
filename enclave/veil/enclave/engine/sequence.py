"""One sequence as the scheduler sees it: token ids, KV progress, block table, tenant. No tensors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """A prompt and the tokens generated for it so far.

    ``num_computed`` counts the leading tokens whose keys and values are in the KV cache.
    A sequence needs the model for ``token_ids[num_computed:]``; when a step covers all of
    them, the last position's logits give the next token. Preemption by recompute sets
    ``num_computed`` back to 0 and frees the blocks: the tokens themselves are kept, so the
    recomputed prefill covers prompt and completion alike and sampling resumes where it was.

    ``cache_key`` (see :mod:`~veil.enclave.engine.prefix_cache`) is the tenant's prefix-cache key,
    or None when the sequence may share KV blocks with no one. ``block_hashes`` is the hash chain
    of its full blocks computed so far, ``num_sealed`` how many of its leading blocks are
    registered in (or were taken from) the prefix cache, ``num_cached_tokens`` how many prompt
    tokens the cache supplied at its first admission.
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int = -1
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0
    cache_key: bytes | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_sealed: int = 0
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens the model still has to read before this sequence can produce logits."""
        return len(self.token_ids) - self.num_computed

    @property
    def tenant(self) -> object:
        """Whose data this sequence writes into its blocks: its cache key, or itself alone."""
        return self.cache_key if self.cache_key is not None else ("seq", self.seq_id)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
