"""Length padding of channel plaintexts to size buckets.

An observer of the wire sees ciphertext sizes only; padding makes that size a
function of a coarse bucket rather than of the prompt or token text.

Bucket rule (the size of the *serialized protobuf*, before encryption):

* requests (``GenerateRequest``): the smallest power of two ≥ the unpadded
  size, at least 1 KiB, up to 64 KiB; above 64 KiB the next multiple of 64 KiB,
  at most ``MAX_REQUEST_BYTES`` (1 MiB). Every request of up to ~1000 bytes of
  prompt looks alike; above that the length leaks at most its order of magnitude
  (one bit per doubling) and, past 64 KiB, its size to within 64 KiB.
* response chunks (``ResponseChunk``): the smallest power of two ≥ the
  unpadded size, at least 128 bytes, at most ``MAX_CHUNK_BYTES`` (64 KiB). A
  typical delta of one token, and the final chunk with its usage, are all 128 bytes.

Padding fills the message's ``padding`` field (field 15) with zero bytes so the
serialized size equals the bucket exactly. A gap too small to hold the field's
tag and length moves the message to the next bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from veil.attestation.errors import MessageTooLargeError

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_REQUEST_BYTES",
    "chunk_bucket",
    "pad_to_bucket",
    "request_bucket",
]

MIN_REQUEST_BYTES = 1024
REQUEST_STEP_ABOVE = 64 * 1024
MAX_REQUEST_BYTES = 1024 * 1024
MIN_CHUNK_BYTES = 128
MAX_CHUNK_BYTES = 64 * 1024
_PADDING_TAG_BYTES = 1  # field 15, wire type 2: one tag byte


class PaddedMessage(Protocol):
    """A protobuf message with a ``bytes padding = 15`` field."""

    padding: bytes

    def ByteSize(self) -> int: ...
    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...
    def ClearField(self, field_name: str, /) -> None: ...


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def request_bucket(size: int) -> int:
    """The request bucket for an unpadded size (see the module docstring)."""
    if size <= REQUEST_STEP_ABOVE:
        bucket = max(MIN_REQUEST_BYTES, _next_pow2(size))
    else:
        bucket = -(-size // REQUEST_STEP_ABOVE) * REQUEST_STEP_ABOVE
    if bucket > MAX_REQUEST_BYTES:
        raise MessageTooLargeError(f"request of {size} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit")
    return bucket


def chunk_bucket(size: int) -> int:
    """The response-chunk bucket for an unpadded size."""
    bucket = max(MIN_CHUNK_BYTES, _next_pow2(size))
    if bucket > MAX_CHUNK_BYTES:
        raise MessageTooLargeError(f"chunk of {size} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
    return bucket


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _padding_length(gap: int) -> int | None:
    """n ≥ 1 with tag + varint(n) + n == gap, or None when no n fits."""
    for vlen in (1, 2, 3, 4):
        n = gap - _PADDING_TAG_BYTES - vlen
        if n >= 1 and _varint_len(n) == vlen:
            return n
    return None


def pad_to_bucket(message: PaddedMessage, bucket: Callable[[int], int]) -> bytes:
    """Set ``message.padding`` so it serializes to exactly a bucket size; return the bytes.

    ``bucket`` is :func:`request_bucket` or :func:`chunk_bucket`.
    """
    message.ClearField("padding")
    base = message.ByteSize()
    target = bucket(base)
    while True:
        if target == base:
            break
        n = _padding_length(target - base)
        if n is not None:
            message.padding = bytes(n)
            break
        target = bucket(target + 1)
    data = message.SerializeToString(deterministic=True)
    if len(data) != target:  # internal invariant of the arithmetic above
        raise MessageTooLargeError(f"padding arithmetic failed: {len(data)} != {target}")
    return data
