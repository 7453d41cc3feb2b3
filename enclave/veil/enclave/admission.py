"""Who gets served when the server is under load: token buckets per peer and call counts.

Pure bookkeeping (no I/O, no grpc): the servicers and :mod:`veil.enclave.transport` consult it.

* :class:`TokenBucket`: ``rate`` admissions per second up to ``burst``.
* :class:`PeerRateLimiter`: one bucket per peer in a bounded table (least recently seen peer
  evicted first), optionally behind one bucket for everyone (what the provider can sustain).
  A refusal says how long to wait (the ``retry-after-ms`` hint the server sends).
* :class:`CallGate`: calls in flight per peer and in total, refused over either cap.

A *peer* is the remote address of the connection, without the port (:func:`peer_key`): a
client that opens more connections gets no more share. IPv6 addresses count per /64, the
smallest block a host is usually given. Behind a proxy or load balancer every client is that
proxy's address: there the limits apply to the proxy as a whole.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import unquote

__all__ = ["CallGate", "PeerRateLimiter", "TokenBucket", "peer_key", "retry_after_ms"]

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``clock`` is injected for tests."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")  # configuration bug, not input
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._last) * self._rate)
        self._last = now

    def try_acquire(self) -> bool:
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def retry_after_s(self) -> float:
        """Seconds until one token is available (0 when one is)."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self._rate)


def peer_key(peer: str) -> str:
    """The admission key of a gRPC peer string (``context.peer()``): its address without port.

    ``ipv4:10.0.0.1:5000`` → ``10.0.0.1``; ``ipv6:[2001:db8::1]:5000`` (or its
    percent-encoded form) → ``2001:db8::/64``; an IPv4-mapped IPv6 address counts as the IPv4
    address. Anything else (``unix:``, unparsable) is its own key, as given.
    """
    text = unquote(peer)
    scheme, _, rest = text.partition(":")
    if scheme == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif scheme == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        host = host.strip("[]").split("%", 1)[0]  # drop a zone id
    else:
        return text
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class PeerRateLimiter:
    """A :class:`TokenBucket` per peer (at most ``max_peers``), behind an optional shared one.

    :meth:`acquire` returns 0.0 when the call is admitted, else the seconds to wait. A peer's
    refusal never takes a token from the shared bucket, so one peer looping cannot starve the
    others; the shared bucket caps what all peers together get.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_peers: int = 4096,
        shared: TokenBucket | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")  # configuration bug, not input
        TokenBucket(rate, burst, clock)  # validates rate and burst now, not at the first call
        self._rate = rate
        self._burst = burst
        self._max_peers = max_peers
        self._shared = shared
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, peer: str) -> float:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._new_bucket()
            self._buckets[peer] = bucket
        else:
            self._buckets.move_to_end(peer)
        if not bucket.try_acquire():
            return max(bucket.retry_after_s(), 1e-3)
        if self._shared is not None and not self._shared.try_acquire():
            return max(self._shared.retry_after_s(), 1e-3)
        return 0.0

    def _new_bucket(self) -> TokenBucket:
        # Evict the least recently seen peer; an evicted peer comes back with a full bucket,
        # so only a client with more than ``max_peers`` addresses gains anything by it.
        while len(self._buckets) >= self._max_peers:
            self._buckets.popitem(last=False)
        return TokenBucket(self._rate, self._burst, self._clock)


class CallGate:
    """Calls in flight, per peer and in total; :meth:`enter` refuses over either cap."""

    PEER = "peer"
    TOTAL = "total"

    def __init__(self, max_per_peer: int, max_total: int) -> None:
        if max_per_peer < 1 or max_total < 1:
            raise ValueError("call limits must be >= 1")  # configuration bug, not input
        self.max_per_peer = max_per_peer
        self.max_total = max_total
        self.total = 0
        self._per_peer: dict[str, int] = {}

    def enter(self, peer: str, *, counted: bool = True) -> str | None:
        """Admit one call from ``peer`` (``None``) or say which cap refused it.

        ``counted=False`` (health checks) is held only to the per-peer cap.
        """
        n = self._per_peer.get(peer, 0)
        if n >= self.max_per_peer:
            return self.PEER
        if counted and self.total >= self.max_total:
            return self.TOTAL
        self._per_peer[peer] = n + 1
        if counted:
            self.total += 1
        return None

    def leave(self, peer: str, *, counted: bool = True) -> None:
        n = self._per_peer.get(peer, 0) - 1
        if n > 0:
            self._per_peer[peer] = n
        else:
            self._per_peer.pop(peer, None)
        if counted:
            self.total = max(0, self.total - 1)

    def in_flight(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)


def retry_after_ms(seconds: float) -> int:
    """A retry hint in whole milliseconds, at least 1."""
    return max(1, math.ceil(seconds * 1000))
