"""Constrained decoding: compiled grammars, one matcher per request, batched token masks.

The grammar library is llguidance (guidance-ai; the Rust core behind the llguidance backends of
vLLM, SGLang and llama.cpp). Chosen over xgrammar because of what the enclave attests: llguidance
is one self-contained abi3 wheel with no Python dependencies, while xgrammar pulls in
apache-tvm-ffi, pydantic, triton and a transformers floor of its own, all of which would become
part of the attested build. It compiles JSON Schemas and Lark grammars lazily (no per-vocabulary
precompute), computes a mask in tens of microseconds, and releases the GIL while it does.

* :class:`GrammarCompiler` (one per engine) turns a :class:`ResponseFormat` into a compiled
  matcher, refusing what llguidance cannot enforce with a :class:`ResponseFormatError` that names
  the problem; compiled grammars are cached by the format's digest (LRU), so a schema sent by
  many requests is compiled once. Compiling happens in ``LLMEngine.encode`` (the tokenizer
  thread): no model work is done for an invalid schema and no batch waits on a compile.
* :class:`GrammarMatcher` (one per request) follows the completion token by token. Before each
  mask it checks it has consumed exactly the request's completion tokens and replays them if not
  (a recompute after preemption keeps them; a future rollback would not).
* :meth:`GrammarCompiler.start_masks` computes the masks of every constrained row of a step on a
  worker thread (llguidance's parallel executor, GIL released) while the model runs, so
  unconstrained rows never wait for them. A mask is xgrammar's packed layout: int32 words of
  shape ``[ceil(vocab / 32)]``, token t allowed iff ``(mask[t // 32] >> (t % 32)) & 1``;
  ``Sampler.sample(..., allowed=...)`` applies it. EOS is in the mask only where the grammar
  accepts, so a constrained answer ends exactly when it is complete (or at ``max_tokens``).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import llguidance
import torch

from veil.enclave.engine.response_format import ResponseFormat
from veil.enclave.errors import EngineInternalError, ResponseFormatError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["GrammarCompiler", "GrammarMatcher", "MaskJob"]

# Compact JSON (", " and ": " between items; no free whitespace): a small model given free
# whitespace can fill max_tokens with newlines. A schema's own "x-guidance" options override it.
_JSON_DEFAULTS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_JSON_OBJECT_SCHEMA = '{"type": "object"}'
_MAX_ERROR_CHARS = 400
DEFAULT_CACHE_SIZE = 64


class GrammarMatcher:
    """The grammar state of one request: what it has consumed, what it allows next."""

    __slots__ = ("_matcher", "consumed")

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher
        self.consumed = 0

    def sync(self, completion: Sequence[int]) -> None:
        """Make the matcher's state follow exactly ``completion`` (reset and replay if it does not)."""
        if self.consumed == len(completion):
            return
        self._matcher.reset()
        self._matcher.consume_tokens(list(completion))
        self.consumed = len(completion)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar refuses it (the request must end)."""
        ok = self._matcher.consume_token(token)
        self.consumed += 1
        return bool(ok) and not self._matcher.is_error()

    @property
    def is_accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str:
        return str(self._matcher.get_error())


class MaskJob:
    """The masks of one step's constrained rows, being computed on the grammar worker thread."""

    def __init__(self, rows: dict[int, int], future: Future[torch.Tensor] | None) -> None:
        self._rows = rows  # id(GrammarMatcher) -> row of the bitmask
        self._future = future

    def mask(self, grammar: GrammarMatcher) -> torch.Tensor:
        """The next-token mask of one constrained row (waits for the worker).

        A row whose mask was not computed (or whose computation failed) gets an all-zero mask:
        the sampler then refuses that row alone. Fail closed, never unconstrained.
        """
        masks: torch.Tensor | None = None
        if self._future is not None:
            with contextlib.suppress(Exception):
                masks = self._future.result()
        row = self._rows.get(id(grammar))
        if masks is None or row is None:
            return torch.zeros(1 if masks is None else int(masks.shape[1]), dtype=torch.int32)
        return masks[row]

    def wait(self) -> None:
        """Block until the worker is done with the matchers (before anything else touches them)."""
        if self._future is not None:
            with contextlib.suppress(Exception):  # mask() turns a failure into refused rows
                self._future.result()


_NO_MASKS = MaskJob({}, None)


class GrammarCompiler:
    """Compiles response formats against one tokenizer; caches compiled grammars by digest.

    Thread-safe: ``check`` runs on the tokenizer thread, ``matcher`` on the event loop's, masks
    on the grammar worker. The llguidance tokenizer is built on first use (about 0.3 s).
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        threads: int | None = None,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be positive")
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        self._cache_size = cache_size
        self._threads = threads
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[bytes, llguidance.LLMatcher] = OrderedDict()
        self.compiles = 0  # grammars compiled (cache misses), for tests and benchmarks

    # ------------------------------------------------------------------ compiling

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=self._eos)
            return self._tokenizer

    @property
    def mask_words(self) -> int:
        """int32 words of one mask: ceil(tokenizer vocabulary / 32)."""
        return (int(self.tokenizer().vocab_size) + 31) // 32

    def check(self, fmt: ResponseFormat) -> None:
        """Compile ``fmt`` (or find it in the cache); raises :class:`ResponseFormatError`."""
        self._template(fmt)

    def matcher(self, fmt: ResponseFormat) -> GrammarMatcher:
        """A fresh matcher for one request (from the cached compiled grammar)."""
        return GrammarMatcher(self._template(fmt).deep_copy())

    def cached(self, fmt: ResponseFormat) -> bool:
        with self._lock:
            return fmt.digest in self._cache

    def _template(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        key = fmt.digest
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        template = self._compile(fmt)  # outside the lock: a large grammar may take a while
        with self._lock:
            self.compiles += 1
            self._cache[key] = template
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template

    def _compile(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        tok = self.tokenizer()
        what = "JSON Schema" if fmt.kind == "json_schema" else "grammar"

        def refused(problem: str) -> ResponseFormatError:
            return ResponseFormatError(f"response_format: invalid or unsupported {what}: {_short(problem)}")

        try:
            if fmt.kind == "lark_grammar":
                grammar = llguidance.LLMatcher.grammar_from_lark(fmt.text)
            else:
                schema = fmt.text if fmt.kind == "json_schema" else _JSON_OBJECT_SCHEMA
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    json.loads(schema), defaults=_JSON_DEFAULTS
                )
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise refused(str(exc)) from None
        if is_error:
            raise refused("; ".join(messages))
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise refused(matcher.get_error())
        return matcher

    # ------------------------------------------------------------------ masks

    def start_masks(self, grammars: Sequence[tuple[GrammarMatcher, Sequence[int]]]) -> MaskJob:
        """Start computing the next-token masks of ``(matcher, completion so far)`` pairs.

        Each matcher is first synced with its completion (here, on the caller's thread); the
        masks are filled on the worker thread. ``MaskJob.mask`` waits for them.
        """
        if not grammars:
            return _NO_MASKS
        rows: dict[int, int] = {}
        for g, completion in grammars:
            g.sync(completion)
            rows[id(g)] = len(rows)
        pairs = [(g._matcher, rows[id(g)]) for g, _ in grammars]
        words = self.mask_words
        with self._lock:
            if self._worker is None:
                self._executor = llguidance.LLExecutor(self._threads)
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-grammar")
            worker, executor = self._worker, self._executor
        if executor is None:  # pragma: no cover - set together with the worker
            raise EngineInternalError("grammar executor missing")
        return MaskJob(rows, worker.submit(_fill_masks, executor, pairs, words))


def _fill_masks(
    executor: llguidance.LLExecutor, pairs: list[tuple[llguidance.LLMatcher, int]], words: int
) -> torch.Tensor:
    """Fill one mask row per matcher in parallel (llguidance.torch.fill_next_token_bitmask_par,
    without importing that module: it sets up torch.compile at import)."""
    masks = torch.zeros((len(pairs), words), dtype=torch.int32)
    executor.unsafe_compute_mask_ptr(pairs, masks.data_ptr(), words * 4, len(pairs))
    return masks


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 1] + "…"
