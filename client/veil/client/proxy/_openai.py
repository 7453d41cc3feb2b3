"""The OpenAI wire shapes the proxy answers with (pure, no I/O).

Response objects as the OpenAI REST API writes them, Server-Sent Events framing (``data: {...}``
then a blank line; ``data: [DONE]`` last), and the error object
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status each SDK error maps to:

=================================  ======  ==========================
SDK error                          status  ``type`` / ``code``
=================================  ======  ==========================
ConfigurationError                 400     invalid_request_error
RequestRejectedError               400     invalid_request_error /
                                           ``context_length_exceeded``, or 500 when internal
AttestationError                   502     attestation_error (``failed_checks`` listed)
ChannelError                       502     channel_error
StreamInterruptedError             502     stream_interrupted
ServerError RESOURCE_EXHAUSTED     429     rate_limit_error (``Retry-After``)
ServerError UNAVAILABLE            503     server_error
ServerError DEADLINE_EXCEEDED      504     server_error
other ServerError                  502     server_error
ClientClosedError                  503     server_error
=================================  ======  ==========================

A stream that fails after its first byte cannot change its status: it ends with
``event: error`` and the same error object, and never with ``[DONE]``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from veil.client._types import ChatCompletion, ChatCompletionChunk, Completion, CompletionUsage
from veil.client.errors import (
    AttestationError,
    ChannelError,
    ClientClosedError,
    ConfigurationError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
    VeilClientError,
)

__all__ = [
    "DONE",
    "chat_chunk",
    "chat_completion",
    "error_body",
    "error_event",
    "error_response",
    "sse",
    "text_chunk",
    "text_completion",
    "usage_chunk",
]

DONE = b"data: [DONE]\n\n"
# ConfigurationError messages start with the argument they are about; the request field it came from.
_KWARG_PARAMS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "messages",
    "prompt",
    "model",
    "response_format",
)


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}


def error_response(exc: VeilClientError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, error body, extra headers) for an SDK error."""
    message = " ".join(str(exc).split())
    if isinstance(exc, ClientClosedError):
        return 503, error_body("the proxy is shutting down", type="server_error"), {}
    if isinstance(exc, ConfigurationError):
        return 400, error_body(message, type="invalid_request_error", param=_param_of(message)), {}
    if isinstance(exc, AttestationError):
        body = error_body(
            f"attestation failed: {message}",
            type="attestation_error",
            code="attestation_failed",
            failed_checks=list(exc.failed_checks),
        )
        return 502, body, {}
    if isinstance(exc, ChannelError):
        return 502, error_body(f"encrypted channel failed: {message}", type="channel_error"), {}
    if isinstance(exc, StreamInterruptedError):
        return 502, error_body(message, type="stream_interrupted", code=exc.code.lower()), {}
    if isinstance(exc, RequestRejectedError):
        if exc.code == "PROMPT_TOO_LONG":
            return 400, error_body(message, type="invalid_request_error", code="context_length_exceeded"), {}
        if exc.code == "INVALID_REQUEST":  # e.g. "response_format: invalid or unsupported JSON Schema"
            param = _param_of(" ".join(exc.message.split()))
            return 400, error_body(message, type="invalid_request_error", param=param), {}
        return 500, error_body(message, type="server_error", code=exc.code.lower()), {}
    if isinstance(exc, ServerError):
        if exc.code == "RESOURCE_EXHAUSTED":
            headers = {}
            if exc.retry_after is not None:
                headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            return 429, error_body(message, type="rate_limit_error", code="overloaded"), headers
        status = {"UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}.get(exc.code, 502)
        return status, error_body(message, type="server_error", code=exc.code.lower()), {}
    return 500, error_body(message, type="server_error"), {}


def _param_of(message: str) -> str | None:
    head = message.split(" ", 1)[0].rstrip(":")
    name = head.split("[", 1)[0].split(".", 1)[0]
    if name not in _KWARG_PARAMS:
        return None
    return head if "[" in head else name


def sse(data: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def error_event(body: dict[str, Any]) -> bytes:
    """The event that ends a failed stream (OpenAI's clients raise it as an ``APIError``)."""
    return b"event: error\n" + sse(body)


def _usage(usage: CompletionUsage | None) -> dict[str, Any] | None:
    return usage.to_dict() if usage else None


def chat_completion(reply: ChatCompletion) -> dict[str, Any]:
    """A whole chat completion."""
    out = reply.to_dict()
    for choice in out["choices"]:
        choice["logprobs"] = None
    return out


def chat_chunk(chunk: ChatCompletionChunk, *, include_usage: bool) -> dict[str, Any]:
    """One ``chat.completion.chunk``; with ``include_usage`` it carries ``"usage": null``."""
    choices = []
    for c in chunk.choices:
        delta: dict[str, Any] = {}
        if c.delta.role:
            delta["role"] = c.delta.role
        if c.delta.content or c.delta.role:
            delta["content"] = c.delta.content or ""
        choices.append({"index": c.index, "delta": delta, "logprobs": None, "finish_reason": c.finish_reason})
    out: dict[str, Any] = {
        "id": chunk.id,
        "object": "chat.completion.chunk",
        "created": chunk.created,
        "model": chunk.model,
        "choices": choices,
    }
    if include_usage:
        out["usage"] = None
    return out


def usage_chunk(
    *, id: str, created: int, model: str, usage: CompletionUsage | None, object: str
) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the token counts."""
    return {
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(usage),
    }


def text_completion(reply: Completion) -> dict[str, Any]:
    """A whole (or one streamed piece of a) text completion."""
    return {
        "id": reply.id,
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [
            {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for c in reply.choices
        ],
        "usage": _usage(reply.usage),
    }


def text_chunk(piece: Completion, *, include_usage: bool) -> dict[str, Any]:
    """One streamed text-completion piece."""
    out = text_completion(piece)
    if include_usage:
        out["usage"] = None
    else:
        del out["usage"]
    return out
