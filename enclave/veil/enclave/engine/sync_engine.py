"""The synchronous engine core: :class:`LLMEngine` and the types the engine API speaks.

One :meth:`LLMEngine.step` is: schedule → ``runner.execute`` (forward pass and sampling, on the
runner's device: only token ids come back) → detokenize and apply stop rules → one :class:`Delta`
per request that has something to say. Each sampled step carries its request's
:class:`~veil.enclave.runner.protocol.SampleSpec` (parameters, seed, token index), so a seeded
request draws the same tokens whatever shares its batch. Failures stay with the request that caused
them: a batch whose ``execute`` raises (in the forward pass or in sampling, e.g. NaN logits) is
re-run one sequence at a time, and whatever still fails (or a detokenizer error) ends that request
alone with finish reason ``error``.

Prefix caching (``prefix_caching=True``, the data policy's ``share_kv_within_tenant``): a request
that carries a tenant secret gets a cache key derived here from it and the engine's own secret
(:func:`~veil.enclave.engine.prefix_cache.tenant_cache_key`), so it reuses the KV blocks of its
tenant's earlier requests and no one else's. Blocks that held another tenant's data are zeroed
by the runner before the step that hands them over (``runner.zero_blocks``, see
:mod:`~veil.enclave.engine.block_manager`).

Logs carry metadata only (request ids, counts, exception types): never prompt or completion
text, which also never appears in an exception message raised from here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
import secrets
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import partial
from typing import Any

from veil.enclave.data_policy import log_event
from veil.enclave.engine.block_manager import BlockManager
from veil.enclave.engine.detokenizer import FINISH_CANCELLED, FINISH_ERROR, AbortReason, CompletionTracker
from veil.enclave.engine.grammar import GrammarCompiler, GrammarMatcher, MaskJob
from veil.enclave.engine.prefix_cache import ENCLAVE_SECRET_SIZE, check_tenant_secret, tenant_cache_key
from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from veil.enclave.engine.sequence import Sequence
from veil.enclave.errors import (
    EngineInternalError,
    InvalidRequestError,
    PromptTooLargeError,
    PromptTooLongError,
)
from veil.enclave.runner.protocol import Runner, SampleSpec, SeqStep
from veil.proto.chat import ChatMessageError, check_chat

__all__ = [
    "ENGINE_VERSION",
    "ERROR_TEXT",
    "Delta",
    "EngineRequest",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
]

ENGINE_VERSION = f"veil-engine/{importlib.metadata.version('veil')}"
MAX_REQUEST_ID_CHARS = 128
# Default byte limit of a prompt (or of all chat roles and contents) per token of context: checked
# before tokenizing, so no request makes the tokenizer or the chat template work on more text
# than could ever fit. Real text averages 3 to 6 bytes per token.
PROMPT_BYTES_PER_TOKEN = 32
ERROR_TEXT = "internal error while generating"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A prompt, or chat messages to render with the model's template, and how to sample.

    ``tenant_secret`` (16 to 64 bytes, from inside the sealed request) names the tenant whose
    cached KV blocks the request may reuse; None shares nothing."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: Seq[Mapping[str, str]] | None = None
    tenant_secret: bytes | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """New text for one request. The last delta of a stream has ``finish_reason`` set."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the tenant's prefix cache


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    free_kv_blocks: int
    total_kv_blocks: int
    preemptions: int = 0


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    delta: Delta


@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    seq: Sequence
    params: SamplingParams
    seed: int
    tracker: CompletionTracker
    grammar: GrammarMatcher | None = None  # structured output: the request's grammar state


class LLMEngine:
    """The synchronous engine core; not thread-safe (one caller at a time)."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch: int = 64,
        max_num_batched_tokens: int = 512,
        rng: random.Random | None = None,
        decode_tokenizer: Any = None,
        max_prompt_bytes: int | None = None,
        prefix_caching: bool = False,
        cache_secret: bytes | None = None,
        kv_clean: bool = True,
        grammar: GrammarCompiler | None = None,
    ) -> None:
        """``prefix_caching``: reuse KV blocks within a tenant (the data policy says whether).
        ``cache_secret``: the 32-byte secret tenant cache keys are derived with (default: fresh
        random bytes). ``kv_clean``: the runner's KV cache holds nothing yet (else every block is
        zeroed before its first use)."""
        if max_batch < 1 or max_num_batched_tokens < 1:
            raise InvalidRequestError("max_batch and max_num_batched_tokens must be positive")
        if max_prompt_bytes is not None and max_prompt_bytes < 1:
            raise InvalidRequestError("max_prompt_bytes must be positive")
        self.runner = runner
        self.tokenizer = runner.tokenizer  # encodes prompts (encode)
        # decodes completions (step); a separate copy when encode and step run on two threads
        self.decode_tokenizer = decode_tokenizer if decode_tokenizer is not None else runner.tokenizer
        self.eos_token_ids = frozenset(runner.eos_token_ids)
        self.max_context = int(runner.max_context)
        self.max_prompt_bytes = max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * self.max_context
        if cache_secret is None:
            cache_secret = secrets.token_bytes(ENCLAVE_SECRET_SIZE)
        if not isinstance(cache_secret, bytes) or len(cache_secret) != ENCLAVE_SECRET_SIZE:
            raise InvalidRequestError(f"cache_secret must be {ENCLAVE_SECRET_SIZE} bytes")
        self.prefix_caching = bool(prefix_caching)
        self._cache_secret = cache_secret
        self.block_manager = BlockManager(runner.num_kv_blocks, runner.block_size, clean=kv_clean)
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=max_batch, max_num_batched_tokens=max_num_batched_tokens
        )
        # compiles response formats (cached by digest) and computes their token masks
        self.grammar = grammar or GrammarCompiler(runner.tokenizer, self.eos_token_ids)
        self._settings = (max_batch, max_num_batched_tokens)
        self._rng = rng if rng is not None else random.SystemRandom()
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}
        self._next_seq_id = 0

    def fresh(self) -> LLMEngine:
        """A new engine over the same runner and settings, with no requests."""
        max_batch, max_tokens = self._settings
        return LLMEngine(
            self.runner,
            max_batch=max_batch,
            max_num_batched_tokens=max_tokens,
            rng=self._rng,
            decode_tokenizer=self.decode_tokenizer,
            max_prompt_bytes=self.max_prompt_bytes,
            prefix_caching=self.prefix_caching,
            cache_secret=self._cache_secret,
            kv_clean=False,  # the runner's cache still holds this engine's data
            grammar=self.grammar,
        )

    # ------------------------------------------------------------------ requests

    def encode(self, request: EngineRequest) -> list[int]:
        """Validate ``request`` and return its prompt token ids (raises before anything is queued)."""
        if not isinstance(request.params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams")
        rid = request.request_id
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} characters")
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages")
        check_tenant_secret(request.tenant_secret)
        if _input_bytes(request) > self.max_prompt_bytes:  # before any tokenizing or templating
            raise PromptTooLargeError(f"prompt larger than the {self.max_prompt_bytes}-byte limit")
        if request.prompt is not None:
            if not isinstance(request.prompt, str) or not request.prompt:
                raise InvalidRequestError("prompt must be a non-empty string")
            ids = self._tokenize(request.prompt, add_special_tokens=True)
        else:
            ids = self._tokenize(self._render_chat(request.messages), add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("prompt has no tokens")
        self._check_length(len(ids), request.params)
        if request.params.response_format is not None:  # compiled (or found cached) before any model work
            self.grammar.check(request.params.response_format)
        return ids

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        tenant_secret: bytes | None = None,
    ) -> None:
        """Queue a request whose prompt was checked by :meth:`encode`.

        With prefix caching on, ``tenant_secret`` selects the tenant cache the request may reuse
        and fill; the key is derived here, inside the enclave, never taken from the request."""
        if request_id in self._requests:
            raise InvalidRequestError("duplicate request_id")
        if not prompt_token_ids:
            raise InvalidRequestError("prompt has no tokens")
        self._check_length(len(prompt_token_ids), params)
        secret = check_tenant_secret(tenant_secret)
        cache_key = (
            tenant_cache_key(self._cache_secret, secret)
            if self.prefix_caching and secret is not None
            else None
        )
        seed = params.seed if params.seed is not None else self._rng.getrandbits(64)
        seq = Sequence(self._next_seq_id, list(prompt_token_ids), cache_key=cache_key)
        self._next_seq_id += 1
        tracker = CompletionTracker(self.decode_tokenizer, seq.token_ids, params, self.eos_token_ids)
        grammar = self.grammar.matcher(params.response_format) if params.response_format is not None else None
        req = _Request(request_id, seq, params, seed, tracker, grammar)
        self.scheduler.add(seq, len(prompt_token_ids) + params.max_tokens)
        self._requests[request_id] = req
        self._by_seq[seq.seq_id] = req

    def abort_request(self, request_id: str, reason: AbortReason = FINISH_CANCELLED) -> RequestOutput | None:
        """End a request now (its blocks are freed); returns its final delta, None if unknown."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        req.tracker.abort(reason)
        return self._end(req)

    def abort_all(self, reason: AbortReason) -> list[RequestOutput]:
        return [out for rid in list(self._requests) if (out := self.abort_request(rid, reason))]

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            free_kv_blocks=self.block_manager.num_free,
            total_kv_blocks=self.block_manager.num_blocks,
            preemptions=self.scheduler.num_preemptions,
        )

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.has_unfinished():
                raise EngineInternalError("requests are queued but none can be scheduled")
            return []
        self._zero(sched.zero_blocks)
        outputs: list[RequestOutput] = []
        masks = self._start_masks(sched)  # structured output: computed while the model runs
        try:
            done, tokens, failed = self._execute(sched, masks)
        finally:
            masks.wait()  # the worker is done with the matchers before anything else touches them
        for item in failed:
            outputs.append(self._fail(self._by_seq[item.seq.seq_id], "engine.execute_failed"))
        self.scheduler.commit(SchedulerOutput(done))
        want = [self._by_seq[item.seq.seq_id] for item in done if item.want_logits]
        if len(tokens) != len(want):
            raise EngineInternalError("the runner returned the wrong number of tokens")
        for req, token in zip(want, tokens, strict=True):
            if req.grammar is not None and not req.grammar.accept(token):
                outputs.append(self._fail(req, "engine.grammar_rejected"))  # fail closed
                continue
            try:
                req.seq.append_token(token)
                req.tracker.append(token)
                text, ids = req.tracker.take_delta()
            except Exception as exc:
                outputs.append(self._fail(req, "engine.detokenize_failed", exc))
                continue
            if req.tracker.finished:
                self._release(req)
            if text or req.tracker.finished:
                outputs.append(RequestOutput(req.request_id, self._delta(req, text, ids)))
        return outputs

    def _execute(
        self, sched: SchedulerOutput, masks: MaskJob
    ) -> tuple[list[ScheduledSeq], list[int], list[ScheduledSeq]]:
        """(sequences that ran, their sampled tokens in order, sequences that failed)."""
        steps = [self._seq_step(item, masks) for item in sched.scheduled]
        try:
            return sched.scheduled, self.runner.execute(steps), []
        except Exception as exc:
            log_event(log, "engine.batch_failed", logging.WARNING, error_type=type(exc).__name__)
        if len(steps) == 1:
            return [], [], list(sched.scheduled)
        # Find the culprit: run each sequence alone. Re-running writes the same KV positions, and a
        # draw depends only on the request's seed and token index, so the survivors' tokens are the
        # ones the batch would have given them.
        done: list[ScheduledSeq] = []
        tokens: list[int] = []
        failed: list[ScheduledSeq] = []
        for item, step in zip(sched.scheduled, steps, strict=True):
            try:
                out = self.runner.execute([step])
            except Exception:
                failed.append(item)
                continue
            if len(out) != (1 if item.want_logits else 0):
                raise EngineInternalError("the runner returned the wrong number of tokens")
            done.append(item)
            tokens.extend(out)
        return done, tokens, failed

    def _seq_step(self, item: ScheduledSeq, masks: MaskJob) -> SeqStep:
        sample = None
        if item.want_logits:
            req = self._by_seq[item.seq.seq_id]
            allowed = None if req.grammar is None else partial(masks.mask, req.grammar)
            sample = SampleSpec(req.params, req.seed, req.seq.num_completion_tokens, allowed)
        return SeqStep(
            seq_id=item.seq.seq_id,
            token_ids=item.token_ids,
            start_pos=item.start_pos,
            block_table=list(item.seq.block_table),
            sample=sample,
        )

    def _start_masks(self, sched: SchedulerOutput) -> MaskJob:
        """Start the next-token masks of the constrained sequences that sample this step.

        They are computed on the grammar worker thread while the runner's forward pass runs; each
        constrained step's :class:`SampleSpec` carries a callable the runner calls only when it
        samples (see ``SampleSpec.allowed``). A row whose mask could not be computed gets one that
        allows nothing: the runner refuses that row (the engine fails that request alone), never
        samples it unconstrained.
        """
        reqs = [self._by_seq[i.seq.seq_id] for i in sched.scheduled if i.want_logits]
        return self.grammar.start_masks(
            [(r.grammar, r.seq.token_ids[r.seq.num_prompt_tokens :]) for r in reqs if r.grammar is not None]
        )

    # ------------------------------------------------------------------ helpers

    def _zero(self, blocks: list[int]) -> None:
        """Have the runner zero ``blocks`` (another tenant's data) before the step writes them."""
        if not blocks:
            return
        try:
            self.runner.zero_blocks(blocks)
        except Exception as exc:
            # fail closed: the step must not run over another tenant's data
            self.block_manager.mark_unknown(blocks)
            raise EngineInternalError("the runner could not zero reused KV blocks") from exc

    def _fail(self, req: _Request, event: str, exc: BaseException | None = None) -> RequestOutput:
        log_event(
            log,
            event,
            logging.ERROR,
            request=req.request_id,
            error_type=type(exc).__name__ if exc is not None else None,
        )
        req.tracker.abort(FINISH_ERROR)
        return self._end(req)

    def _end(self, req: _Request) -> RequestOutput:
        self._release(req)
        text, ids = req.tracker.take_delta()
        return RequestOutput(req.request_id, self._delta(req, text, ids))

    def _release(self, req: _Request) -> None:
        self.scheduler.finish(req.seq)
        self._requests.pop(req.request_id, None)
        self._by_seq.pop(req.seq.seq_id, None)

    def _delta(self, req: _Request, text: str, ids: tuple[int, ...]) -> Delta:
        reason = req.tracker.finish_reason
        return Delta(
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=req.seq.num_prompt_tokens,
            completion_tokens=req.tracker.completion_tokens,
            error=ERROR_TEXT if reason == FINISH_ERROR else None,
            cached_tokens=req.seq.num_cached_tokens,
        )

    def _check_length(self, num_prompt: int, params: SamplingParams) -> None:
        total = num_prompt + params.max_tokens
        if total > self.max_context:
            raise PromptTooLongError(
                f"prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the {self.max_context}-token context"
            )
        if not self.scheduler.fits(total):
            raise PromptTooLongError(
                f"prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the KV cache ({self.block_manager.capacity_tokens} tokens)"
            )

    def _tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as exc:
            raise InvalidRequestError("the prompt could not be tokenized") from exc
        return [int(i) for i in ids]

    def _render_chat(self, messages: object) -> str:
        template = self.runner.chat_template
        if template is None:
            raise InvalidRequestError("this model has no chat template; send a prompt")
        if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Seq) or not messages:
            raise InvalidRequestError("messages must be a non-empty list")
        if not all(isinstance(m, Mapping) for m in messages):
            raise InvalidRequestError("each message must be a mapping with role and content")
        try:
            chat = check_chat((m.get("role"), m.get("content")) for m in messages)
        except ChatMessageError as exc:
            raise InvalidRequestError(str(exc)) from exc
        clean = [{"role": role, "content": content} for role, content in chat]
        try:
            text = self.tokenizer.apply_chat_template(
                clean, chat_template=template, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            raise InvalidRequestError("the chat template rejected these messages") from exc
        if not isinstance(text, str) or not text:
            raise InvalidRequestError("the chat template produced no text")
        return text


def _input_bytes(request: EngineRequest) -> int:
    """UTF-8 bytes of the prompt, or of every chat role and content (malformed parts count 0)."""
    if isinstance(request.prompt, str):
        texts: list[object] = [request.prompt]
    elif isinstance(request.messages, list | tuple):
        texts = [m.get(k) for m in request.messages if isinstance(m, Mapping) for k in ("role", "content")]
    else:
        texts = []
    # surrogatepass: a lone surrogate is counted here and refused by the tokenizer, not here
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if isinstance(t, str))
