"""The secretstream response: order, integrity and the FINAL rules."""

from __future__ import annotations

import pytest

from veil.attestation.channel.stream import HEADER_SIZE, StreamDecryptor, StreamEncryptor
from veil.attestation.errors import (
    MalformedInputError,
    MessageTooLargeError,
    StreamError,
    TruncatedStreamError,
)
from veil.proto.v1 import generate_pb2

KEY = bytes(range(32))
RID = bytes(range(16))


def _stream(n: int = 4) -> tuple[bytes, list[bytes]]:
    enc = StreamEncryptor(KEY, RID)
    chunks = [
        enc.encrypt(generate_pb2.ResponseChunk(text_delta=f"part {i} "), final=i == n - 1) for i in range(n)
    ]
    return enc.header, chunks


def _drain(header: bytes, chunks: list[bytes], key: bytes = KEY, rid: bytes = RID) -> str:
    dec = StreamDecryptor(key, rid, header)
    text = "".join(dec.decrypt(c)[0].text_delta for c in chunks)
    dec.close()
    return text


def test_round_trip() -> None:
    header, chunks = _stream()
    assert len(header) == HEADER_SIZE
    assert _drain(header, chunks) == "part 0 part 1 part 2 part 3 "


def test_final_flag_reported() -> None:
    header, chunks = _stream(2)
    dec = StreamDecryptor(KEY, RID, header)
    assert dec.decrypt(chunks[0])[1] is False
    assert dec.decrypt(chunks[1])[1] is True
    assert dec.finished


def test_tampered_chunk() -> None:
    header, chunks = _stream()
    bad = bytearray(chunks[1])
    bad[len(bad) // 2] ^= 0x40
    chunks[1] = bytes(bad)
    with pytest.raises(StreamError, match="authentication"):
        _drain(header, chunks)


def test_reordered_chunks() -> None:
    header, chunks = _stream()
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(StreamError):
        _drain(header, chunks)


def test_replayed_chunk() -> None:
    header, chunks = _stream()
    with pytest.raises(StreamError):
        _drain(header, [chunks[0], chunks[0], *chunks[1:]])


def test_dropped_final_is_truncation_not_short_answer() -> None:
    header, chunks = _stream()
    with pytest.raises(TruncatedStreamError):
        _drain(header, chunks[:-1])


def test_dropped_middle_chunk() -> None:
    header, chunks = _stream()
    with pytest.raises(StreamError):
        _drain(header, [chunks[0], *chunks[2:]])


def test_chunk_after_final() -> None:
    header, chunks = _stream(2)
    dec = StreamDecryptor(KEY, RID, header)
    for c in chunks:
        dec.decrypt(c)
    with pytest.raises(StreamError, match="after the FINAL"):
        dec.decrypt(chunks[0])


def test_wrong_request_id_or_key() -> None:
    header, chunks = _stream()
    with pytest.raises(StreamError):
        _drain(header, chunks, rid=bytes(16))
    with pytest.raises(StreamError):
        _drain(header, chunks, key=bytes(32))


def test_chunk_from_another_stream() -> None:
    header, chunks = _stream()
    _, other = _stream()
    with pytest.raises(StreamError):
        _drain(header, [chunks[0], other[1]])


def test_encryptor_refuses_after_final_and_oversize() -> None:
    enc = StreamEncryptor(KEY, RID)
    enc.push_bytes(b"x", final=True)
    with pytest.raises(StreamError):
        enc.push_bytes(b"y")
    with pytest.raises(MessageTooLargeError):
        StreamEncryptor(KEY, RID).push_bytes(bytes(70_000))


def test_bad_sizes_are_typed() -> None:
    with pytest.raises(MalformedInputError, match="response key"):
        StreamEncryptor(bytes(16), RID)
    with pytest.raises(MalformedInputError, match="request id"):
        StreamEncryptor(KEY, bytes(3))
    with pytest.raises(MalformedInputError, match="header"):
        StreamDecryptor(KEY, RID, bytes(5))
    header, _ = _stream()
    with pytest.raises(StreamError, match="size"):
        StreamDecryptor(KEY, RID, header).decrypt(b"short")


def test_chunks_are_padded_to_buckets() -> None:
    enc = StreamEncryptor(KEY, RID)
    sizes = {len(enc.encrypt(generate_pb2.ResponseChunk(text_delta="x" * n))) for n in (0, 1, 7, 60, 100)}
    assert len(sizes) == 1, sizes
