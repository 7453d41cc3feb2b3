"""The OpenAI-shaped objects the SDK returns.

They mirror the field names of the OpenAI Python SDK (``choices[0].message.content``,
``choices[0].delta.content``, ``usage.prompt_tokens``) so existing code reads them
unchanged; they are plain frozen dataclasses, not dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "Choice",
    "ChoiceDelta",
    "ChunkChoice",
    "Completion",
    "CompletionChoice",
    "CompletionUsage",
]


@dataclass(frozen=True, slots=True)
class CompletionUsage:
    """Token counts of one request, as the enclave reported them."""

    prompt_tokens: int
    completion_tokens: int
    # prompt tokens the enclave served from this tenant's prefix cache (OpenAI's
    # prompt_tokens_details.cached_tokens); 0 from an enclave that does not report it
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """``prompt_tokens + completion_tokens``."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in the OpenAI shape (``prompt_tokens_details.cached_tokens``)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(frozen=True, slots=True)
class ChatCompletionMessage:
    """The assistant's answer."""

    content: str
    role: str = "assistant"


@dataclass(frozen=True, slots=True)
class Choice:
    """One completion choice (Veil always returns exactly one)."""

    index: int
    message: ChatCompletionMessage
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    """A whole (non-streamed) chat completion."""

    id: str
    created: int
    model: str
    choices: tuple[Choice, ...]
    usage: CompletionUsage | None
    object: str = "chat.completion"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in the OpenAI response shape."""
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": c.message.role, "content": c.message.content},
                    "finish_reason": c.finish_reason,
                }
                for c in self.choices
            ],
            "usage": self.usage.to_dict() if self.usage else None,
        }


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """The text a streamed chunk adds; ``role`` is set on the first chunk only."""

    content: str | None = None
    role: str | None = None


@dataclass(frozen=True, slots=True)
class ChunkChoice:
    """One choice of a streamed chunk; ``finish_reason`` is set on the last chunk only."""

    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ChatCompletionChunk:
    """One decrypted piece of a streamed completion; the last one carries ``usage``."""

    id: str
    created: int
    model: str
    choices: tuple[ChunkChoice, ...]
    usage: CompletionUsage | None = None
    object: str = "chat.completion.chunk"


@dataclass(frozen=True, slots=True)
class CompletionChoice:
    """One choice of a plain-text completion (``choices[0].text``)."""

    index: int
    text: str
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Completion:
    """A plain-text completion (``client.completions.create``), whole or one streamed piece.

    As in the OpenAI API, a streamed text completion is a sequence of these objects; the last
    carries ``finish_reason`` and ``usage``.
    """

    id: str
    created: int
    model: str
    choices: tuple[CompletionChoice, ...]
    usage: CompletionUsage | None
    object: str = "text_completion"

    @classmethod
    def from_chunk(cls, chunk: ChatCompletionChunk) -> Completion:
        """The text-completion view of one decrypted chunk."""
        return cls(
            id=_text_id(chunk.id),
            created=chunk.created,
            model=chunk.model,
            choices=tuple(
                CompletionChoice(c.index, c.delta.content or "", c.finish_reason) for c in chunk.choices
            ),
            usage=chunk.usage,
        )

    @classmethod
    def from_chat(cls, reply: ChatCompletion) -> Completion:
        """The text-completion view of a whole answer."""
        return cls(
            id=_text_id(reply.id),
            created=reply.created,
            model=reply.model,
            choices=tuple(
                CompletionChoice(c.index, c.message.content, c.finish_reason) for c in reply.choices
            ),
            usage=reply.usage,
        )


def _text_id(chat_id: str) -> str:
    return "cmpl-" + chat_id.removeprefix("chatcmpl-")
