"""Padding hides plaintext lengths within a bucket."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from veil.attestation.channel.hpke import HpkeSuite, PrivateKey, seal_request
from veil.attestation.channel.padding import (
    MAX_REQUEST_BYTES,
    chunk_bucket,
    pad_to_bucket,
    request_bucket,
)
from veil.attestation.errors import MessageTooLargeError
from veil.proto.v1 import generate_pb2


def _req(prompt: str) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        request_id=bytes(16),
        response_key=bytes(32),
        prompt=prompt,
        params=generate_pb2.SamplingParams(max_tokens=16),
    )


def test_bucket_rule() -> None:
    assert request_bucket(1) == 1024
    assert request_bucket(1024) == 1024
    assert request_bucket(1025) == 2048
    assert request_bucket(65536) == 65536
    assert request_bucket(65537) == 131072
    assert request_bucket(200_000) == 262144
    assert chunk_bucket(3) == 128
    assert chunk_bucket(129) == 256


def test_over_limit_is_typed() -> None:
    import pytest

    with pytest.raises(MessageTooLargeError):
        request_bucket(MAX_REQUEST_BYTES + 1)
    with pytest.raises(MessageTooLargeError):
        chunk_bucket(70_000)


@given(st.text(max_size=3000))
def test_padded_size_is_exactly_a_bucket(prompt: str) -> None:
    msg = _req(prompt)
    data = pad_to_bucket(msg, request_bucket)
    base = _req(prompt).ByteSize()
    assert len(data) == request_bucket(base) or len(data) == request_bucket(request_bucket(base) + 1)
    parsed = generate_pb2.GenerateRequest.FromString(data)
    assert parsed.prompt == prompt


@given(st.text(max_size=120))
def test_chunk_padding(delta: str) -> None:
    chunk = generate_pb2.ResponseChunk(text_delta=delta)
    data = pad_to_bucket(chunk, chunk_bucket)
    assert len(data) in (128, 256, 512, 1024)
    assert generate_pb2.ResponseChunk.FromString(data).text_delta == delta


def test_ciphertexts_of_prompts_in_one_bucket_have_one_length() -> None:
    public = PrivateKey.generate(HpkeSuite.X25519).public_key()
    lengths = {len(seal_request(_req("a" * n), public).ciphertext) for n in (0, 1, 50, 400, 900)}
    assert len(lengths) == 1, lengths
    bigger = len(seal_request(_req("a" * 1500), public).ciphertext)
    assert bigger > lengths.pop()
