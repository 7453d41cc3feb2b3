"""Incremental detokenization and the stop rules that work on text.

:class:`IncrementalDetokenizer` turns one token at a time into text deltas that are always
whole characters: byte-level BPE splits an emoji over several tokens, and decoding a token
alone gives U+FFFD. Like vLLM and TGI it decodes a short window of ids twice, with and
without the newest token, and releases the difference only when it does not end in an
incomplete character (``prefix_offset`` / ``read_offset``). The window starts inside the
prompt so that tokenizers which decode a leading space differently at the start of a text
(SentencePiece) still produce the right first delta.

:class:`CompletionTracker` applies a request's stop rules to each sampled token: stop token
ids and end-of-sequence (the token is counted, never decoded), stop strings matched on the
decoded text (the completion is cut where the match begins, the stop string is not
returned), and ``max_tokens``. While stop strings are set, the last ``len(longest) - 1``
characters are held back until the completion ends, so a prefix of a stop string is never
streamed and then taken back. A completion that ends inside a character (cut by
``max_tokens``, or a stop token after half an emoji) ends with U+FFFD, as with vLLM and HF's
``TextStreamer``: the streamed text is always the decode of the completion's ids.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Final, Literal, Protocol

from veil.enclave.engine.sampling import SamplingParams

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_ERROR",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "AbortReason",
    "CompletionTracker",
    "IncrementalDetokenizer",
    "TokenDecoder",
]

# Every finish reason a completion can end with: the stop rules produce the first two, the engine
# the last two (a cancelled request, a failure confined to one request).
FINISH_STOP: Final = "stop"
FINISH_LENGTH: Final = "length"
FINISH_CANCELLED: Final = "cancelled"
FINISH_ERROR: Final = "error"
AbortReason = Literal["cancelled", "error"]

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded with the first completion token


class TokenDecoder(Protocol):
    """What the detokenizer needs of a tokenizer (a Hugging Face tokenizer satisfies it)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int], *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        tail = list(prompt_token_ids[-_PROMPT_CONTEXT - 1 :])
        self._ids = tail
        self._read_offset = len(tail)
        self._prefix_offset = max(len(tail) - _PROMPT_CONTEXT, 0)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character decodes to U+FFFD here)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not final):
            return ""
        # Drop ids we no longer need as context, so the window stays short.
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)


class CompletionTracker:
    """The generated text of one request, its stop rules and its finish reason."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Collection[int],
    ) -> None:
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(eos_token_ids)
        self._stop_ids = frozenset(stop_ids)
        self._stops = params.stop
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._emitted = 0
        self._pending_ids: list[int] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The completion text so far, stop string excluded (for tests; never log it)."""
        return self._text

    def append(self, token_id: int) -> None:
        """Account for one sampled token and apply the stop rules."""
        if self.finished:
            return
        self.completion_tokens += 1
        self._pending_ids.append(token_id)
        may_stop = self.completion_tokens >= self.params.min_tokens
        if may_stop and token_id in self._stop_ids:
            self._finish(FINISH_STOP, flush=True)
            return
        self._add_text(self._detok.add(token_id), may_stop)
        if not self.finished and self.completion_tokens >= self.params.max_tokens:
            self._finish(FINISH_LENGTH, flush=True)

    def abort(self, reason: AbortReason) -> None:
        """End without further text (``cancelled`` or ``error``)."""
        if not self.finished:
            self.finish_reason = reason
            self._emitted = len(self._text)

    def take_delta(self) -> tuple[str, tuple[int, ...]]:
        """Text ready to stream, and the token ids sampled since the last delta.

        While no text is ready (and the completion goes on) this returns ``("", ())`` and the
        ids wait for the next delta, so ids are never lost between deltas.
        """
        end = len(self._text) if self.finished else max(self._emitted, len(self._text) - self._holdback)
        if end == self._emitted and not self.finished:
            return "", ()
        text = self._text[self._emitted : end]
        self._emitted = end
        ids = tuple(self._pending_ids)
        self._pending_ids.clear()
        return text, ids

    def _add_text(self, new: str, may_stop: bool) -> None:
        if not new:
            return
        start = len(self._text)
        self._text += new
        if not (self._stops and may_stop):
            return
        search_from = max(0, start - self._holdback)
        hits = [i for i in (self._text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self._emitted = min(self._emitted, len(self._text))
            self._finish(FINISH_STOP, flush=False)

    def _finish(self, reason: str, *, flush: bool) -> None:
        self.finish_reason = reason
        if flush:
            tail = self._detok.flush()
            if tail:
                # The flushed tail (an incomplete character) may still complete a stop string.
                self.finish_reason = None
                self._add_text(tail, self.completion_tokens >= self.params.min_tokens)
                if self.finish_reason is None:
                    self.finish_reason = reason
