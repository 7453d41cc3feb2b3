"""The one rule for chat messages, shared by the client (before sealing) and the enclave (after opening).

A chat is a non-empty sequence of ``(role, content)`` pairs: ``role`` one of :data:`CHAT_ROLES`,
``content`` a string. :func:`check_chat` raises :class:`ChatMessageError` naming the first message
that breaks the rule; each side turns it into its own typed error with the same message (the
client's ``ConfigurationError``, the enclave's ``InvalidRequestError``). Messages name positions and
fields only, never content. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CHAT_ROLES", "ChatMessageError", "check_chat"]

CHAT_ROLES = ("system", "user", "assistant", "tool")


class ChatMessageError(Exception):
    """A chat message list that breaks the rule; the message says which item and field."""


def check_chat(messages: Iterable[tuple[object, object]]) -> list[tuple[str, str]]:
    """Return ``messages`` as ``(role, content)`` string pairs, or raise :class:`ChatMessageError`."""
    out: list[tuple[str, str]] = []
    for i, (role, content) in enumerate(messages):
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ChatMessageError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ChatMessageError(f"messages[{i}].content must be a string")
        out.append((role, content))
    if not out:
        raise ChatMessageError("messages must not be empty")
    return out
