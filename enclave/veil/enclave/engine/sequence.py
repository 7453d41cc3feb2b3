"""One sequence as the scheduler sees it: token ids, KV progress, block table. No tensors."""

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
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int = -1
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0

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

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
