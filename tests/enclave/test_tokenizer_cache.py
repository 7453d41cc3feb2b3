"""The GGUF tokenizer cache: an entry is loaded only if every file has the hash its record names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.enclave.model.gguf_loader import load_gguf_tokenizer, read_gguf


@pytest.mark.slow  # builds the tokenizer from the GGUF (seconds) more than once
def test_a_tampered_tokenizer_cache_is_rebuilt_never_loaded(model_path: Path, tmp_path: Path) -> None:
    digest = read_gguf(model_path, lazy=True).digest
    text = "Hello, world"
    expected = load_gguf_tokenizer(model_path, digest, tmp_path)(text).input_ids
    entry = tmp_path / "tokenizers" / digest.hex()
    record = json.loads((entry / "veil-tokenizer.json").read_text())
    assert record["model_digest"] == digest.hex() and "tokenizer.json" in record["files"]
    original = (entry / "tokenizer.json").read_bytes()

    # Swap two tokens' ids in the cached vocabulary: loaded as is, "Hello" would encode differently.
    doc = json.loads(original)
    vocab = doc["model"]["vocab"]
    hello = expected[0]
    other = next(t for t, i in vocab.items() if i == hello + 1)
    mine = next(t for t, i in vocab.items() if i == hello)
    vocab[mine], vocab[other] = vocab[other], vocab[mine]
    (entry / "tokenizer.json").write_text(json.dumps(doc))
    assert load_gguf_tokenizer(model_path, digest, tmp_path)(text).input_ids == expected
    assert (entry / "tokenizer.json").read_bytes() == original  # rebuilt from the GGUF

    # An extra file in the entry (say, a planted tokenizer_config override) is refused too.
    (entry / "added_tokens.json").write_text('{"Hello": 7}')
    assert load_gguf_tokenizer(model_path, digest, tmp_path)(text).input_ids == expected
    assert not (entry / "added_tokens.json").exists()
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [digest.hex()]  # no temp left
