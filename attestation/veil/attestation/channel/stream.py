"""The encrypted response stream: libsodium ``crypto_secretstream_xchacha20poly1305``.

Keyed by the request's fresh 32-byte ``response_key``; the request id is the
additional data of every chunk. The first wire message is the 24-byte stream
header, each later one an encrypted, padded ``ResponseChunk``; the last one
carries the FINAL tag. Secretstream's internal counter makes reordering,
replay and tampering fail authentication; this module adds the two rules the
library leaves to its caller: nothing may follow FINAL, and a stream that ends
without FINAL is an error (:class:`TruncatedStreamError`), never a short answer.

How many chunks the enclave sends, how large and when, is the response framing rule in
:mod:`veil.attestation.channel.padding` (:meth:`StreamEncryptor.encrypt_frame`): equal-size
frames on a cadence, or one bucketed frame, so the wire does not show the token count.
"""

from __future__ import annotations

from collections.abc import Callable

from nacl import bindings as sodium
from nacl import exceptions as sodium_errors

from veil.attestation.channel.hpke import REQUEST_ID_SIZE, RESPONSE_KEY_SIZE
from veil.attestation.channel.padding import MAX_CHUNK_BYTES, chunk_bucket, pad_to_bucket
from veil.attestation.errors import (
    MalformedInputError,
    MessageTooLargeError,
    StreamError,
    TruncatedStreamError,
)
from veil.proto.v1 import generate_pb2

__all__ = ["HEADER_SIZE", "StreamDecryptor", "StreamEncryptor"]

HEADER_SIZE = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL


def _check_key(key: bytes, request_id: bytes) -> None:
    if len(key) != RESPONSE_KEY_SIZE:
        raise MalformedInputError(f"response key must be {RESPONSE_KEY_SIZE} bytes, got {len(key)}")
    if len(request_id) != REQUEST_ID_SIZE:
        raise MalformedInputError(f"request id must be {REQUEST_ID_SIZE} bytes, got {len(request_id)}")


class StreamEncryptor:
    """Enclave side: encrypts ``ResponseChunk`` messages; ``header`` goes out first."""

    def __init__(self, key: bytes, request_id: bytes) -> None:
        _check_key(key, request_id)
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header: bytes = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._state, key)
        self._ad = request_id
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def push_bytes(self, plaintext: bytes, *, final: bool = False) -> bytes:
        """Encrypt raw bytes as the next chunk (tests and the chunk API build on this)."""
        if self._finished:
            raise StreamError("stream already finished")
        if len(plaintext) > MAX_CHUNK_BYTES:
            raise MessageTooLargeError(f"chunk of {len(plaintext)} bytes exceeds {MAX_CHUNK_BYTES}")
        tag = _TAG_FINAL if final else _TAG_MESSAGE
        out: bytes = sodium.crypto_secretstream_xchacha20poly1305_push(self._state, plaintext, self._ad, tag)
        self._finished = final
        return out

    def encrypt(self, chunk: generate_pb2.ResponseChunk, *, final: bool = False) -> bytes:
        """Pad ``chunk`` to its bucket and encrypt it; ``final`` tags the last chunk."""
        padded = generate_pb2.ResponseChunk()
        padded.CopyFrom(chunk)
        return self.push_bytes(pad_to_bucket(padded, chunk_bucket), final=final)

    def encrypt_frame(
        self, chunk: generate_pb2.ResponseChunk, bucket: Callable[[int], int], *, final: bool = False
    ) -> bytes:
        """Pad ``chunk`` by ``bucket`` (``response_bucket`` or an ``exact_size`` rule) and encrypt it."""
        padded = generate_pb2.ResponseChunk()
        padded.CopyFrom(chunk)
        return self.push_bytes(pad_to_bucket(padded, bucket), final=final)


class StreamDecryptor:
    """Client side: authenticates chunks in order and enforces the FINAL rules."""

    def __init__(self, key: bytes, request_id: bytes, header: bytes) -> None:
        _check_key(key, request_id)
        if len(header) != HEADER_SIZE:
            raise MalformedInputError(f"stream header must be {HEADER_SIZE} bytes, got {len(header)}")
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        except sodium_errors.CryptoError:
            raise StreamError("invalid stream header") from None
        self._ad = request_id
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def pull_bytes(self, ciphertext: bytes) -> tuple[bytes, bool]:
        """Authenticate and decrypt the next chunk; returns ``(plaintext, is_final)``."""
        if self._finished:
            raise StreamError("chunk received after the FINAL chunk")
        if len(ciphertext) < _ABYTES or len(ciphertext) > MAX_CHUNK_BYTES + _ABYTES:
            raise StreamError(f"chunk of {len(ciphertext)} bytes has an impossible size")
        try:
            plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, ciphertext, self._ad
            )
        except sodium_errors.CryptoError:
            raise StreamError("chunk failed authentication (tampered, reordered or replayed)") from None
        if tag not in (_TAG_MESSAGE, _TAG_FINAL):
            raise StreamError(f"unexpected stream tag {tag}")
        self._finished = tag == _TAG_FINAL
        return bytes(plaintext), self._finished

    def decrypt(self, ciphertext: bytes) -> tuple[generate_pb2.ResponseChunk, bool]:
        """Decrypt the next chunk into a ``ResponseChunk``; returns ``(chunk, is_final)``."""
        plaintext, final = self.pull_bytes(ciphertext)
        chunk = generate_pb2.ResponseChunk()
        try:
            chunk.ParseFromString(plaintext)
        except Exception:
            raise StreamError("authenticated chunk is not a ResponseChunk") from None
        return chunk, final

    def close(self) -> None:
        """Call when the transport ends: raises unless the FINAL chunk was seen."""
        if not self._finished:
            raise TruncatedStreamError("response stream ended without its FINAL chunk")
