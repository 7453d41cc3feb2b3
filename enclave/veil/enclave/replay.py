"""The replay guard: a captured ``EncryptedRequest`` runs at most once (pure; clock injected).

Every sealed ``GenerateRequest`` carries its 16-byte ``request_id`` and ``issued_at_ms``
(the client's clock). :meth:`ReplayGuard.admit` accepts a request only if

* its time is inside the window, ``|now - issued_at| <= window_s`` (default ±5 min): an
  older capture is refused outright, so ids need to be remembered only that long; and
* its request id was not seen inside the window: every admitted id is remembered until
  its own time leaves the window.

Memory is bounded: ids sit in buckets of ``bucket_s`` seconds of ``issued_at``, and a
bucket is dropped whole once every time it covers is outside the window. When
``capacity`` ids are remembered the guard refuses new requests (:class:`ReplayCacheFullError`)
rather than forget one still inside the window: forgetting would let that request's replay
through, refusing only costs availability (clients retry with a fresh request), and the
capacity (default 262 144 ids, about 25 MiB) is far above what one replica serves in a
window. The guard is per enclave key: a restarted enclave has a new key, so requests
sealed to the old one are refused as stale anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from veil.enclave.errors import ReplayCacheFullError, ReplayRefusedError

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_WINDOW_S", "ReplayGuard"]

DEFAULT_WINDOW_S = 300.0
DEFAULT_CAPACITY = 262_144
DEFAULT_BUCKET_S = 10.0


class ReplayGuard:
    """Admits each (request id, time) once inside a ±``window_s`` window; ``clock`` is Unix seconds."""

    def __init__(
        self,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        capacity: int = DEFAULT_CAPACITY,
        bucket_s: float = DEFAULT_BUCKET_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0 or capacity < 1 or bucket_s <= 0:
            raise ValueError("window_s and bucket_s must be > 0, capacity >= 1")  # configuration bug
        self.window_s = window_s
        self.capacity = capacity
        self._bucket_s = bucket_s
        self._clock = clock
        self._buckets: dict[int, set[bytes]] = {}
        self._size = 0

    def __len__(self) -> int:
        """How many request ids are remembered now."""
        return self._size

    def _evict(self, now: float) -> None:
        oldest = now - self.window_s
        for key in [k for k in self._buckets if (k + 1) * self._bucket_s < oldest]:
            self._size -= len(self._buckets.pop(key))

    def admit(self, request_id: bytes, issued_at_ms: int) -> None:
        """Remember ``request_id`` or raise :class:`ReplayRefusedError` (outside the window, seen
        before) / :class:`ReplayCacheFullError` (no room to remember it)."""
        now = self._clock()
        issued = issued_at_ms / 1000.0
        if issued_at_ms <= 0 or abs(now - issued) > self.window_s:
            raise ReplayRefusedError("request time outside the replay window")
        self._evict(now)
        # A replayed ciphertext repeats both id and time; any id seen in the window is refused
        # (at most window / bucket_s + 2 set lookups).
        if any(request_id in ids for ids in self._buckets.values()):
            raise ReplayRefusedError("request id already seen inside the replay window")
        if self._size >= self.capacity:
            raise ReplayCacheFullError("replay cache full; refusing rather than forgetting")
        self._buckets.setdefault(int(issued // self._bucket_s), set()).add(request_id)
        self._size += 1
