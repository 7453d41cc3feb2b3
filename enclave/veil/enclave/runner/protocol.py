"""What the engine asks of a model runner: :class:`Runner`, the :class:`SeqStep` it executes, the
:class:`SampleSpec` that says how a step's next token is drawn, and the checks every runner applies to
a step before it touches the KV cache.

The scheduler (pure Python) decides which sequences run and which KV blocks they own; the engine
hands the runner a list of :class:`SeqStep` and gets back one **sampled token id** per step that
carries a :class:`SampleSpec`. Logits never leave the runner: it samples them where they were made
(``veil.enclave.engine.sampler.Sampler``, on the runner's device), so a GPU runner copies a few
integers to the host per step, not ``batch × vocab`` floats. A runner knows nothing about requests or
text. It owns one thread for device work: :meth:`Runner.submit` queues a whole engine step there.

KV-cache layout (both runners)
------------------------------
Keys and values are two tensors of shape ``[n_layers, n_kv_heads, num_blocks, block_size, head_dim]``.
A sequence's position ``t`` lives in physical block ``block_table[t // block_size]`` at row
``t % block_size``; its *slot* is ``block * block_size + row``. Heads lead, so one head's rows of one
block are a contiguous ``[block_size, head_dim]`` tile: the CPU runner gathers a sequence's blocks
with one index (``k[layer][:, table]``), and the Triton kernels read a tile per (block, head) with
unit stride. The element type is the runner's: the CPU runner keeps keys in fp32 and values in bf16
(``veil.enclave.model.llama.KVCache``), the CUDA runner both in its compute dtype (bf16 on a GPU, fp32
under the Triton interpreter). Block ids, block tables and slots mean the same thing in both, which
is all the block manager (and a prefix cache over it) relies on.

Pure: no torch at run time (``torch.Tensor`` appears in annotations only), no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

    from veil.enclave.engine.sampler import Sampler

__all__ = ["GREEDY", "Runner", "SampleSpec", "SeqStep", "sample_steps", "validate_steps"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """How to draw the token that follows a step: the request's parameters, its seed, the index of
    the token being drawn (tokens the request generated so far; the seed is mixed with it, so a draw
    does not depend on batch-mates or on preemption), and an optional packed token bitmask.

    ``allowed``: int32 ``[ceil(vocab / 32)]`` (xgrammar's layout): token ``t`` may be drawn iff
    ``(allowed[t // 32] >> (t % 32)) & 1``; None allows every token. It may also be a callable
    returning that mask: the runner calls it only after the forward pass, so a mask being computed
    on another thread (structured output) overlaps the model instead of delaying the batch.
    """

    params: SamplingParams
    seed: int
    index: int
    allowed: torch.Tensor | Callable[[], torch.Tensor] | None = None


GREEDY = SampleSpec(SamplingParams(temperature=0.0), seed=0, index=0)
"""Greedy argmax (tests and benchmarks; the engine builds one spec per request and token)."""


@dataclass(slots=True)
class SeqStep:
    """One sequence's work in a step: run ``token_ids`` at positions ``start_pos ...`` and, when
    ``sample`` is set, draw the next token from the last position's logits."""

    seq_id: int
    token_ids: list[int]  # tokens to run now: a prefill chunk, or 1 token in decode
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int] = field(default_factory=list)  # physical blocks covering [0, start_pos + n)
    sample: SampleSpec | None = None  # None: a prefill chunk that does not reach the last token

    @property
    def want_logits(self) -> bool:
        return self.sample is not None


class Runner(Protocol):
    """Everything the engines (``LLMEngine``, ``AsyncEngine``) use of a model runner.

    Implemented by :class:`veil.enclave.runner.cpu.CpuRunner` and
    :class:`veil.enclave.runner.cuda.CudaRunner`. Both also offer ``logits(steps)`` (the fp32 logits
    of the sampled positions, on the host) for parity tests and benchmarks; the engines never call it.
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
    @property
    def device(self) -> str:
        """Where the model runs, for the start-up log (``"cpu"``, ``"cuda:0"``)."""
        ...

    def execute(self, steps: list[SeqStep]) -> list[int]:
        """Run ``steps`` and sample: one token id per step whose ``sample`` is set, in step order.

        Raises on a bad step (:class:`InvalidRequestError`, before the cache is written) and on any
        failure of the forward pass or of sampling; the engine then re-runs the steps one by one to
        find the sequence at fault (re-running writes the same KV positions)."""
        ...

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero every slot of KV ``blocks`` in every layer, before a step hands them to another
        tenant (prefix caching); raises when it cannot, and the engine then fails the step closed."""
        ...

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` on the runner's device thread (``AsyncEngine`` runs each step there)."""
        ...


def validate_steps(
    steps: list[SeqStep], *, block_size: int, num_kv_blocks: int, max_context: int, vocab: int
) -> None:
    """Reject a step no runner may execute (called by every runner before it writes the cache)."""
    bs = block_size
    words = -(-vocab // 32)
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
        allowed = s.sample.allowed if s.sample is not None else None
        if callable(allowed):
            continue  # a mask still being computed: the sampler checks it when it arrives
        # A mask may be narrower than the model's vocabulary (a tokenizer smaller than the padded
        # embedding): the tokens past its end are not allowed (see ``apply_token_bitmask``).
        if allowed is not None and (
            allowed.dim() != 1 or str(allowed.dtype) != "torch.int32" or not 1 <= allowed.shape[0] <= words
        ):
            raise InvalidRequestError(
                f"sequence {s.seq_id}: token bitmask must be at most {words} int32 words"
            )


def sample_steps(sampler: Sampler, logits: torch.Tensor, steps: list[SeqStep]) -> list[int]:
    """Draw one token per step with a :class:`SampleSpec` from ``logits`` (one row per such step, on
    the runner's device, in step order): the one sampling call both runners make."""
    specs = [s.sample for s in steps if s.sample is not None]
    if not specs:
        return []
    masks = [sp.allowed() if callable(sp.allowed) else sp.allowed for sp in specs]
    return sampler.sample(
        logits,
        [sp.params for sp in specs],
        [sp.seed for sp in specs],
        [sp.index for sp in specs],
        allowed=masks if any(m is not None for m in masks) else None,
    )
