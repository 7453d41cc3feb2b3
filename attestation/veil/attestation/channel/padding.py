"""Length padding of channel plaintexts to size buckets.

An observer of the wire sees ciphertext sizes only; padding makes that size a
function of a coarse bucket rather than of the prompt or token text.

Bucket rule (the size of the *serialized protobuf*, before encryption):

* requests (``GenerateRequest``): the smallest power of two ≥ the unpadded
  size, at least 1 KiB, up to 64 KiB; above 64 KiB the next multiple of 64 KiB,
  at most ``MAX_REQUEST_BYTES`` (1 MiB). Every request of up to ~1000 bytes of
  prompt looks alike; above that the length leaks at most its order of magnitude
  (one bit per doubling) and, past 64 KiB, its size to within 64 KiB.
* single response chunks (``ResponseChunk`` through ``StreamEncryptor.encrypt``, the
  low-level API): the smallest power of two ≥ the unpadded size, at least 128 bytes, at
  most ``MAX_CHUNK_BYTES`` (64 KiB). The enclave does not send chunks one per token: it
  sends *frames* (below), because one message per token puts the token count on the wire.

Padding fills the message's ``padding`` field (field 15) with zero bytes so the
serialized size equals the bucket exactly. A gap too small to hold the field's
tag and length moves the message to the next bucket.

Response framing (what the enclave sends for one request; the request says which):

* always first: the 24-byte secretstream header, one message;
* **non-streamed** (``GenerateRequest.stream`` false): the whole answer as ONE frame,
  padded to :func:`response_bucket` (the request rule below 64 KiB: a power of two, at
  least 1 KiB); an answer too long for one 64 KiB frame is sent as full 64 KiB frames
  followed by the bucketed last one. The host learns the answer's size to a power of two
  and the total time, not its token count. An error is a frame like any other (1 KiB).
* **streamed** (``stream`` true): every frame, the FINAL one and an error included, is
  exactly :data:`STREAM_FRAME_BYTES` (1 KiB); the enclave sends one on every tick of its
  cadence (``veil serve --frame-interval-ms``, default 75 ms), the header on the first
  tick, each frame carrying whatever text accrued since the last one, possibly none. At
  most :func:`frame_text_capacity` bytes of text fit in a frame; more waits for the next
  tick. The number of frames reveals the elapsed time in ticks, nothing else.
* the cost: streamed text reaches the client up to one interval late (half on average),
  the first text no earlier than the first tick, and the FINAL frame waits for the tick
  after the answer ended; a non-streamed answer arrives all at once. Bandwidth: one
  1 KiB frame per tick per stream, whatever the token rate (``bench/channel.py`` prints it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from veil.attestation.errors import MessageTooLargeError

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_REQUEST_BYTES",
    "STREAM_FRAME_BYTES",
    "chunk_bucket",
    "exact_size",
    "frame_text_capacity",
    "pad_to_bucket",
    "request_bucket",
    "response_bucket",
]

MIN_REQUEST_BYTES = 1024
REQUEST_STEP_ABOVE = 64 * 1024
MAX_REQUEST_BYTES = 1024 * 1024
MIN_CHUNK_BYTES = 128
MAX_CHUNK_BYTES = 64 * 1024
STREAM_FRAME_BYTES = 1024
MIN_RESPONSE_BYTES = 1024
# What a frame needs besides its text: the text field's tag and length (≤ 4), a finish reason (2),
# usage (≤ 14) and the shortest padding field (3); rounded up.
FRAME_OVERHEAD = 32
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


def response_bucket(size: int) -> int:
    """The bucket of a non-streamed answer's frame: a power of two, 1 KiB to 64 KiB."""
    bucket = max(MIN_RESPONSE_BYTES, _next_pow2(size))
    if bucket > MAX_CHUNK_BYTES:
        raise MessageTooLargeError(f"frame of {size} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
    return bucket


def exact_size(frame_bytes: int) -> Callable[[int], int]:
    """A bucket rule with one size: ``frame_bytes`` (streamed frames); larger is an error."""
    if not FRAME_OVERHEAD < frame_bytes <= MAX_CHUNK_BYTES:
        raise MessageTooLargeError(f"frame size {frame_bytes} outside ({FRAME_OVERHEAD}, {MAX_CHUNK_BYTES}]")

    def bucket(size: int) -> int:
        if size > frame_bytes:
            raise MessageTooLargeError(f"frame content of {size} bytes exceeds the {frame_bytes}-byte frame")
        return frame_bytes

    return bucket


def frame_text_capacity(frame_bytes: int) -> int:
    """How many bytes of UTF-8 text one frame of ``frame_bytes`` always has room for."""
    return frame_bytes - FRAME_OVERHEAD


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

    ``bucket`` is :func:`request_bucket`, :func:`chunk_bucket`, :func:`response_bucket` or
    an :func:`exact_size` rule.
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
