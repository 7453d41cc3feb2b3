"""The chat-message rule shared by the client and the enclave."""

from __future__ import annotations

import pytest

from veil.proto.chat import CHAT_ROLES, ChatMessageError, check_chat


def test_every_role_is_accepted_and_pairs_come_back_in_order() -> None:
    pairs = [(role, f"text {i}") for i, role in enumerate(CHAT_ROLES)]
    assert check_chat(pairs) == pairs
    assert check_chat(iter([("user", "")])) == [("user", "")]  # any iterable; empty content is fine
    assert set(CHAT_ROLES) == {"system", "user", "assistant", "tool"}


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "messages must not be empty"),
        ([("robot", "x")], "messages[0].role must be one of system, user, assistant, tool"),
        ([("user", "x"), (None, "x")], "messages[1].role must be one of"),
        ([("User", "x")], "messages[0].role"),
        ([("user", 3)], "messages[0].content must be a string"),
        ([("user", "ok"), ("assistant", None)], "messages[1].content must be a string"),
        ([("user", b"bytes")], "messages[0].content"),
    ],
)
def test_bad_messages_raise_the_typed_error(messages: list[tuple[object, object]], message: str) -> None:
    with pytest.raises(ChatMessageError) as info:
        check_chat(messages)
    assert str(info.value).startswith(message)
    assert not isinstance(info.value, ValueError)


def test_the_message_never_contains_content() -> None:
    with pytest.raises(ChatMessageError) as info:
        check_chat([("wizard", "secret prompt text")])
    assert "secret" not in str(info.value)
