"""OpenAI request bodies to SDK keyword arguments: one table per endpoint (pure, no I/O).

Every parameter the OpenAI API defines is in a table, with what the proxy does with it:
``FORWARD`` it to the SDK under a keyword, handle it in the ``PROXY`` itself, or ``REJECT`` it
with a 400 naming it. A rejected parameter is still accepted at its *neutral* value (``n=1``,
``logprobs=false``, ``presence_penalty=0``, ``null``), since that asks for nothing Veil lacks.
A parameter in no table is refused too ("unrecognized request argument"): nothing is silently
ignored. Supporting a parameter later is a one-line change here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "CHAT_PARAMS",
    "COMPLETION_PARAMS",
    "Action",
    "OpenAIRequest",
    "Param",
    "ProxyRequestError",
    "translate",
]


class Action(Enum):
    FORWARD = "forward"  # passed to the SDK as ``Param.kwarg``
    PROXY = "proxy"  # handled by the proxy itself (stream_options, user)
    REJECT = "reject"  # 400 naming it, unless its value is neutral


@dataclass(frozen=True, slots=True)
class Param:
    """What one OpenAI request parameter becomes."""

    action: Action
    kwarg: str = ""
    neutral: tuple[Any, ...] = ()  # values of a rejected parameter that ask for nothing
    reason: str = ""


class ProxyRequestError(Exception):
    """A request the proxy refuses before sending anything: an OpenAI error object's fields."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = type


def _fwd(kwarg: str) -> Param:
    return Param(Action.FORWARD, kwarg)


def _proxy() -> Param:
    return Param(Action.PROXY)


def _reject(reason: str, *neutral: Any) -> Param:
    return Param(Action.REJECT, neutral=neutral, reason=reason)


_ONE_CHOICE = "Veil returns one choice per request"
_NO_LOGPROBS = "Veil does not return log probabilities"
_NO_TOOLS = "Veil does not support tool or function calling"
_NO_PENALTY = "Veil's sampler has no presence or frequency penalty"
_NOT_HERE = "not supported by the Veil proxy"

_COMMON: dict[str, Param] = {
    "model": _proxy(),  # checked against the attested model
    "max_tokens": _fwd("max_tokens"),
    "temperature": _fwd("temperature"),
    "top_p": _fwd("top_p"),
    "top_k": _fwd("top_k"),  # vLLM's extension
    "seed": _fwd("seed"),
    "stop": _fwd("stop"),
    "stream": _proxy(),
    "stream_options": _proxy(),
    "user": _proxy(),  # an end-user id for the caller's own records: never forwarded, never logged
    "n": _reject(_ONE_CHOICE, 1),
    "best_of": _reject(_ONE_CHOICE, 1),
    "logprobs": _reject(_NO_LOGPROBS, False, 0),
    "top_logprobs": _reject(_NO_LOGPROBS, 0),
    "logit_bias": _reject("Veil's sampler takes no logit bias", {}),
    "presence_penalty": _reject(_NO_PENALTY, 0, 0.0),
    "frequency_penalty": _reject(_NO_PENALTY, 0, 0.0),
    "service_tier": _reject(_NOT_HERE, "auto", "default"),
    "store": _reject("Veil never stores requests", False),
    "metadata": _reject(_NOT_HERE, {}),
}

CHAT_PARAMS: Mapping[str, Param] = {
    **_COMMON,
    "messages": _fwd("messages"),
    "max_completion_tokens": _fwd("max_tokens"),
    "tools": _reject(_NO_TOOLS, []),
    "tool_choice": _reject(_NO_TOOLS, "none"),
    "parallel_tool_calls": _reject(_NO_TOOLS),
    "functions": _reject(_NO_TOOLS, []),
    "function_call": _reject(_NO_TOOLS, "none"),
    # Structured outputs: the OpenAI shapes (json_object, json_schema, text) and Veil's grammar
    # extension go to the SDK as they are; it checks them and seals them with the prompt.
    "response_format": _fwd("response_format"),
    "audio": _reject("Veil serves text only"),
    "modalities": _reject("Veil serves text only", ["text"]),
    "prediction": _reject(_NOT_HERE),
    "reasoning_effort": _reject(_NOT_HERE),
    "verbosity": _reject(_NOT_HERE),
    "web_search_options": _reject(_NOT_HERE),
    "safety_identifier": _proxy(),  # like ``user``
    "prompt_cache_key": _reject(_NOT_HERE),
}

COMPLETION_PARAMS: Mapping[str, Param] = {
    **_COMMON,
    "prompt": _fwd("prompt"),
    "echo": _reject("Veil does not echo the prompt", False),
    "suffix": _reject("Veil does not complete around a suffix"),
}


@dataclass(slots=True)
class OpenAIRequest:
    """A checked request: the SDK's keyword arguments and what the proxy itself handles."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    stream: bool = False
    include_usage: bool = False


def translate(body: object, table: Mapping[str, Param]) -> OpenAIRequest:
    """Check an OpenAI request body against ``table``; a :class:`ProxyRequestError` names the parameter."""
    if not isinstance(body, dict):
        raise ProxyRequestError("the request body must be a JSON object")
    out = OpenAIRequest()
    for name, value in body.items():
        param = table.get(name)
        if param is None:
            raise ProxyRequestError(f"Unrecognized request argument supplied: {name}", param=name)
        if param.action is Action.REJECT:
            if value is None or _neutral(value, param.neutral):
                continue
            raise ProxyRequestError(
                f"'{name}' is not supported: {param.reason}", param=name, code="unsupported_parameter"
            )
        if param.action is Action.FORWARD:
            if value is not None:
                if param.kwarg in out.kwargs:
                    raise ProxyRequestError(f"give '{name}' or its synonym, not both", param=name)
                out.kwargs[param.kwarg] = value
            continue
        _proxy_param(out, name, value)
    if "messages" in table and "messages" not in out.kwargs:
        raise ProxyRequestError("'messages' is required", param="messages")
    if "prompt" in table and "prompt" not in out.kwargs:
        raise ProxyRequestError("'prompt' is required", param="prompt")
    if "messages" in out.kwargs:
        out.kwargs["messages"] = _messages(out.kwargs["messages"])
    if out.include_usage and not out.stream:
        raise ProxyRequestError(
            "'stream_options' is only allowed with 'stream': true", param="stream_options"
        )
    return out


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # compared with their types: false is not the neutral 0 of top_logprobs, nor true the 1 of n
    return any(type(value) is type(n) and value == n for n in neutral)


def _proxy_param(out: OpenAIRequest, name: str, value: Any) -> None:
    if name == "model":
        if value is not None and not isinstance(value, str):
            raise ProxyRequestError("'model' must be a string", param="model")
        out.model = value
    elif name == "stream":
        if value is not None and not isinstance(value, bool):
            raise ProxyRequestError("'stream' must be true or false", param="stream")
        out.stream = bool(value)
    elif name == "stream_options":
        if value is None:
            return
        if not isinstance(value, dict) or set(value) - {"include_usage"}:
            raise ProxyRequestError(
                "'stream_options' supports only {'include_usage': bool}", param="stream_options"
            )
        usage = value.get("include_usage", False)
        if not isinstance(usage, bool):
            raise ProxyRequestError(
                "'stream_options.include_usage' must be a boolean", param="stream_options"
            )
        out.include_usage = usage
    elif value is not None and not isinstance(value, str):  # user, safety_identifier
        raise ProxyRequestError(f"'{name}' must be a string", param=name)


_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages to the SDK's ``{role, content}``: text content parts joined, roles mapped.

    Anything that is not text (images, audio, tool calls) is a 400 naming where it is; the
    SDK checks roles and order.
    """
    if not isinstance(messages, list):
        raise ProxyRequestError("'messages' must be a list", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ProxyRequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            key = sorted(extra)[0]
            raise ProxyRequestError(
                f"messages[{i}].{key} is not supported ({_NO_TOOLS})", param=f"messages[{i}].{key}"
            )
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):
            content = _text_parts(content, i)
        out.append({"role": _ROLES.get(role, role) if isinstance(role, str) else role, "content": content})
    return out


def _text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ProxyRequestError(
                f"messages[{i}].content[{j}]: only text content parts are supported",
                param=f"messages[{i}].content",
            )
        texts.append(part["text"])
    return "".join(texts)
