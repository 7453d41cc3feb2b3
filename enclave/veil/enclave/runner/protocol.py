"""What the engine asks of a model runner: :class:`Runner`, the :class:`SeqStep` it executes, and the
checks every runner applies to a step before it touches the KV cache.

The scheduler (pure Python) decides which sequences run and which KV blocks they own; the engine
hands the runner a list of :class:`SeqStep` and gets back the logits of the last position of each
step that asked for them. A runner knows nothing about requests, sampling or text. It owns one
thread for device work: :meth:`Runner.submit` queues a whole engine step there.

Pure: no torch at run time (``torch.Tensor`` appears in annotations only), no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from veil.enclave.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

__all__ = ["Runner", "SeqStep", "validate_steps"]

T = TypeVar("T")


@dataclass(slots=True)
class SeqStep:
    """One sequence's work in a step."""

    seq_id: int
    token_ids: list[int]  # tokens to run now: a prefill chunk, or 1 token in decode
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int] = field(default_factory=list)  # physical blocks covering [0, start_pos + n)
    want_logits: bool = True  # only the last position's logits are returned


class Runner(Protocol):
    """Everything the engines (``LLMEngine``, ``AsyncEngine``) use of a model runner.

    Implemented by :class:`veil.enclave.runner.cpu.CpuRunner` and
    :class:`veil.enclave.runner.cuda.CudaRunner`.
    """

    @property
    def tokenizer(self) -> Any: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def model_digest(self) -> bytes: ...
    @property
    def max_context(self) -> int: ...
    @property
    def num_kv_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...

    def execute(self, steps: list[SeqStep]) -> torch.Tensor:
        """Run ``steps``; fp32 logits ``[number of steps with want_logits, vocab]``, in step order."""
        ...

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` on the runner's device thread (``AsyncEngine`` runs each step there)."""
        ...


def validate_steps(
    steps: list[SeqStep], *, block_size: int, num_kv_blocks: int, max_context: int, vocab: int
) -> None:
    """Reject a step no runner may execute (called by every runner before it writes the cache)."""
    bs = block_size
    for s in steps:
        n = len(s.token_ids)
        end = s.start_pos + n
        if n == 0 or s.start_pos < 0:
            raise InvalidRequestError(f"sequence {s.seq_id}: empty step or negative start position")
        if end > max_context:
            raise InvalidRequestError(f"sequence {s.seq_id}: position {end} exceeds the context")
        if len(s.block_table) * bs < end:
            raise InvalidRequestError(f"sequence {s.seq_id}: block table too short for {end} tokens")
        if any(b < 0 or b >= num_kv_blocks for b in s.block_table[: (end + bs - 1) // bs]):
            raise InvalidRequestError(f"sequence {s.seq_id}: block id out of range")
        if any(t < 0 or t >= vocab for t in s.token_ids):
            raise InvalidRequestError(f"sequence {s.seq_id}: token id out of range")
