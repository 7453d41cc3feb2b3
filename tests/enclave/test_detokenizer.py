"""Incremental detokenization and text stop rules, on the embedded model's real tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.enclave.engine.detokenizer import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    CompletionTracker,
    IncrementalDetokenizer,
)
from veil.enclave.engine.sampling import SamplingParams

MULTIBYTE = "Grüße 🌍 wörld ✓ 日本語 👩‍👩‍👧 naïve café 🇫🇷 Ω≈ç√ end"


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Any:
    from veil.enclave.model.gguf_loader import load_gguf_tokenizer

    digest = hashlib.sha256(model_path.read_bytes()).digest()
    return load_gguf_tokenizer(model_path, digest)  # cached after the first build


@pytest.fixture(scope="module")
def eos(tok: Any) -> int:
    return int(tok.eos_token_id)


def stream(tok: Any, prompt: str, text: str) -> list[str]:
    detok = IncrementalDetokenizer(tok, tok.encode(prompt))
    return [detok.add(t) for t in tok.encode(text)] + [detok.flush()]


def test_multibyte_characters_are_never_split(tok: Any) -> None:
    ids = tok.encode(MULTIBYTE)
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles), "the test text must split characters over tokens"
    deltas = stream(tok, "Say it:", MULTIBYTE)
    assert "".join(deltas) == MULTIBYTE
    for d in deltas:
        assert "\ufffd" not in d
        d.encode("utf-8")  # whole code points only (a lone surrogate would raise)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(
        alphabet=st.characters(exclude_categories=["Cs", "Cc", "Cn", "Co"], exclude_characters="\ufffd"),
        min_size=1,
        max_size=40,
    ),
    prompt=st.sampled_from(["", "Hi", "Translate: ", "<|im_start|>assistant\n"]),
)
def test_deltas_join_to_the_full_decode(tok: Any, text: str, prompt: str) -> None:
    ids = tok.encode(text)
    full = tok.decode(ids, skip_special_tokens=True)
    deltas = stream(tok, prompt, text)
    assert "".join(deltas) == full
    if "\ufffd" not in full:  # text the byte-level vocabulary can represent
        assert all("\ufffd" not in d for d in deltas)


def test_truncated_character_is_flushed_as_replacement(tok: Any) -> None:
    ids = tok.encode("a🌍")
    detok = IncrementalDetokenizer(tok, [])
    out = [detok.add(i) for i in ids[:-1]]  # stop one byte-token short of the emoji
    assert "".join(out) == "a"
    assert detok.flush().endswith("\ufffd")


def track(tok: Any, text: str, params: SamplingParams, eos: int, extra: list[int] | None = None) -> Any:
    tracker = CompletionTracker(tok, tok.encode("Q:"), params, {eos})
    deltas: list[str] = []
    fed: list[int] = []
    got: list[int] = []
    for t in [*tok.encode(text), *(extra or [])]:
        tracker.append(t)
        fed.append(t)
        text_delta, ids = tracker.take_delta()
        assert bool(ids) == bool(text_delta) or tracker.finished
        got.extend(ids)
        deltas.append(text_delta)
        if tracker.finished:
            break
    if tracker.finished:
        assert got == fed  # every sampled id is reported exactly once
    return tracker, deltas


def test_stop_string_cuts_the_text_and_is_not_emitted(tok: Any, eos: int) -> None:
    text = "The answer is 42. END of story, more text"
    tracker, deltas = track(tok, text, SamplingParams(stop=("END", "never")), eos)
    assert tracker.finish_reason == FINISH_STOP
    assert "".join(deltas) == "The answer is 42. "
    assert tracker.text == "The answer is 42. "
    # the prefix "EN" of the stop string was never streamed before the match
    assert all("E" not in d for d in deltas)


def test_earliest_stop_string_wins_and_can_span_tokens(tok: Any, eos: int) -> None:
    text = "alpha beta gamma delta"
    tracker, deltas = track(tok, text, SamplingParams(stop=("delta", "ta gam")), eos)
    assert tracker.finish_reason == FINISH_STOP
    assert "".join(deltas) == "alpha be"


def test_stop_string_inside_multibyte_text(tok: Any, eos: int) -> None:
    tracker, deltas = track(tok, MULTIBYTE, SamplingParams(stop=("日本",)), eos)
    assert tracker.finish_reason == FINISH_STOP
    assert "".join(deltas) == MULTIBYTE[: MULTIBYTE.index("日本")]


def test_eos_and_stop_token_ids_end_without_text(tok: Any, eos: int) -> None:
    tracker, deltas = track(tok, "Hello there", SamplingParams(), eos, extra=[eos, 100])
    assert tracker.finish_reason == FINISH_STOP
    assert "".join(deltas) == "Hello there"
    assert tracker.completion_tokens == len(tok.encode("Hello there")) + 1  # EOS is counted
    stop_id = tok.encode(" there")[0]
    tracker, deltas = track(tok, "Hello there", SamplingParams(stop_token_ids=(stop_id,)), eos)
    assert tracker.finish_reason == FINISH_STOP and "".join(deltas) == "Hello"


def test_ignore_eos_and_min_tokens(tok: Any, eos: int) -> None:
    tracker, _ = track(tok, "Hi", SamplingParams(ignore_eos=True, max_tokens=10), eos, extra=[eos] * 3)
    assert not tracker.finished and tracker.completion_tokens == 4
    n = len(tok.encode("Hi"))
    tracker, _ = track(tok, "Hi", SamplingParams(min_tokens=n + 2, max_tokens=10), eos, extra=[eos] * 3)
    assert tracker.finish_reason == FINISH_STOP and tracker.completion_tokens == n + 2


def test_max_tokens_gives_length_and_flushes(tok: Any, eos: int) -> None:
    ids = tok.encode("one two three four five")
    tracker, deltas = track(tok, "one two three four five", SamplingParams(max_tokens=3), eos)
    assert tracker.finish_reason == FINISH_LENGTH
    assert tracker.completion_tokens == 3
    assert "".join(deltas) == tok.decode(ids[:3])
    # the last token completes no character: the flush shows U+FFFD rather than dropping it
    emoji = tok.encode("x🌍")
    tracker, deltas = track(tok, "x🌍", SamplingParams(max_tokens=len(emoji) - 1), eos)
    assert tracker.finish_reason == FINISH_LENGTH and "".join(deltas).endswith("\ufffd")


def test_held_back_text_is_released_at_the_end(tok: Any, eos: int) -> None:
    text = "no stop here at all"
    params = SamplingParams(stop=("zzzzzz",), max_tokens=len(tok.encode(text)))
    tracker, deltas = track(tok, text, params, eos)
    assert tracker.finish_reason == FINISH_LENGTH
    assert "".join(deltas) == text
    assert deltas[0] == ""  # held back: could have been the start of the stop string


def test_abort_drops_held_text(tok: Any, eos: int) -> None:
    tracker = CompletionTracker(tok, [], SamplingParams(stop=("zzzzzz",)), {eos})
    for t in tok.encode("partial text"):
        tracker.append(t)
    tracker.abort(FINISH_CANCELLED)
    assert tracker.finish_reason == FINISH_CANCELLED
    tracker.append(5)  # ignored once finished
    text, ids = tracker.take_delta()
    assert ids == (*tok.encode("partial text"),)  # reported with the final delta
    assert text == "" and tracker.completion_tokens == len(tok.encode("partial text"))
