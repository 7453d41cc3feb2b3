"""What a running enclave publishes about itself: only what the host could already count.

The operator *is* the untrusted host of the threat model, so an operator credential would protect
nothing: every metric the enclave publishes, on the unauthenticated ``MetricsService`` or on the
Prometheus endpoint, is one the host may read. The rule is therefore about content, not access:

* published: calls and their outcomes (Generate started / completed / rejected / cancelled /
  active, evidence served / rate-limited) — each is an RPC and a status the host sees on the wire
  anyway — plus the simulated / draining flags, uptime and the KV-cache *capacity* (configuration);
* never published: token counts, live KV-cache occupancy, engine queue lengths — read before and
  after one request on an idle server, each gives that request's length (issue #12). The engine
  keeps such numbers in memory for itself; they do not leave the process.

Both views read one :class:`MetricsSnapshot`, taken at most once per ``period_s`` (default 10 s,
``veil serve --metrics-period``), so even the published counters move only on a coarse clock.
:func:`start_prometheus` serves the same snapshot in Prometheus' text format
(``prometheus-client``, the reference implementation of the format, on its own registry: no
process or platform collectors) on ``veil serve --metrics-port``, loopback unless
``--metrics-host`` says otherwise.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from veil.enclave.servicers import ServerMetrics

__all__ = [
    "DEFAULT_PERIOD_S",
    "MetricsPublisher",
    "MetricsSnapshot",
    "PrometheusEndpoint",
    "start_prometheus",
]

DEFAULT_PERIOD_S = 10.0


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The published aggregates (see the module docstring for why exactly these)."""

    simulated: bool
    draining: bool
    uptime_s: float
    requests_started: int
    requests_completed: int
    requests_rejected: int
    requests_cancelled: int
    requests_active: int
    evidence_served: int
    evidence_rate_limited: int
    total_kv_blocks: int
    period_s: float


class MetricsPublisher:
    """Takes a :class:`MetricsSnapshot` of ``metrics`` at most once per ``period_s`` (clock injected)."""

    def __init__(
        self,
        metrics: ServerMetrics,
        total_kv_blocks: Callable[[], int],
        period_s: float = DEFAULT_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not period_s > 0:
            raise ValueError("period_s must be > 0")  # configuration bug, not input
        self._metrics = metrics
        self._capacity = total_kv_blocks
        self.period_s = period_s
        self._clock = clock
        self._lock = threading.Lock()  # the Prometheus thread reads too
        self._snapshot: MetricsSnapshot | None = None
        self._taken = -math.inf

    def current(self) -> MetricsSnapshot:
        """The latest snapshot, taken afresh if the last one is a period old."""
        with self._lock:
            now = self._clock()
            if self._snapshot is None or now - self._taken >= self.period_s:
                self._snapshot = self._take(now)
                self._taken = now
            return self._snapshot

    def _take(self, now: float) -> MetricsSnapshot:
        m = self._metrics
        uptime = max(0.0, now - m.started_at)
        return MetricsSnapshot(
            simulated=m.simulated,
            draining=m.draining,
            uptime_s=math.floor(uptime / self.period_s) * self.period_s,
            requests_started=m.requests_started,
            requests_completed=m.requests_completed,
            requests_rejected=m.requests_rejected,
            requests_cancelled=m.requests_cancelled,
            requests_active=m.requests_active,
            evidence_served=m.evidence_served,
            evidence_rate_limited=m.evidence_rate_limited,
            total_kv_blocks=int(self._capacity()),
            period_s=self.period_s,
        )


class _Collector(Collector):
    """A ``prometheus_client`` collector over the publisher's snapshot."""

    def __init__(self, publisher: MetricsPublisher) -> None:
        self._publisher = publisher

    def collect(self) -> Iterator[Metric]:
        s = self._publisher.current()
        requests = CounterMetricFamily(
            "veil_requests", "Generate calls by outcome (each is visible on the wire)", labels=["outcome"]
        )
        for outcome, value in (
            ("started", s.requests_started),
            ("completed", s.requests_completed),
            ("rejected", s.requests_rejected),
            ("cancelled", s.requests_cancelled),
        ):
            requests.add_metric([outcome], value)
        yield requests
        evidence = CounterMetricFamily("veil_evidence", "GetEvidence calls by outcome", labels=["outcome"])
        evidence.add_metric(["served"], s.evidence_served)
        evidence.add_metric(["rate_limited"], s.evidence_rate_limited)
        yield evidence
        gauges: tuple[tuple[str, str, float], ...] = (
            ("veil_requests_active", "Generate streams open at the snapshot", s.requests_active),
            ("veil_kv_cache_blocks", "KV-cache capacity in blocks (configuration)", s.total_kv_blocks),
            ("veil_uptime_seconds", "uptime at the snapshot, in whole periods", s.uptime_s),
            ("veil_draining", "1 once SIGTERM was received", int(s.draining)),
            ("veil_simulated_tee", "1 on the simulated TEE", int(s.simulated)),
            ("veil_metrics_period_seconds", "snapshots are taken at most this often", s.period_s),
        )
        for name, doc, gauge in gauges:
            yield GaugeMetricFamily(name, doc, value=gauge)


@dataclass(slots=True)
class PrometheusEndpoint:
    """A running exposition server; :meth:`close` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_prometheus(publisher: MetricsPublisher, host: str, port: int) -> PrometheusEndpoint:
    """Serve ``/metrics`` for the publisher's snapshot on ``host:port`` (port 0: pick one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(publisher))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return PrometheusEndpoint(host, int(server.server_address[1]), server, thread)
