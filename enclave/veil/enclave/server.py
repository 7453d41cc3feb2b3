"""``veil serve``: the enclave's gRPC server (``grpc.aio``, loopback by default).

Services: ``veil.v1.AttestationService``, ``veil.v1.InferenceService``,
``veil.v1.MetricsService`` (metadata only) and ``grpc.health.v1.Health``.

Start-up order matters for the data-handling policy: the process is hardened (no core
dumps, non-dumpable), logging goes through the metadata filter, temp and cache files are
confined to ``STATE_DIR/tmp`` *before* torch is imported; then the simulation chain is
loaded or generated, the model loaded, the HPKE key generated (memory only), the
claims built and, for the simulated TEE, its signed release manifest written beside the
simulation root (:mod:`veil.enclave.sim_release`). stdout carries a few lines for people
and parent processes; the last one, once the server accepts calls, is exactly ``listening on HOST:PORT``.

Under abuse: every call passes :class:`~veil.enclave.transport.TransportGuard` (calls per peer
and in total, health excepted; a deadline for the request message; requests parsed with fixed
refusal strings), then per-peer token buckets in the servicers (``GetEvidence``, ``Generate``).
HTTP/2 caps one connection's concurrent streams (``grpc.max_concurrent_streams``; gRPC resets
streams beyond it), keepalive pings find vanished peers, idle connections close after 5 minutes,
and a client pinging more often than every 10 s without data is sent away.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING, new Generate calls get
UNAVAILABLE, in-flight streams get ``--grace`` seconds to finish, then they are
cancelled (their KV blocks freed), the engine stops, the temp directory is removed and
the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from veil.attestation.channel.padding import MAX_REQUEST_BYTES
from veil.enclave.admission import PeerRateLimiter, TokenBucket
from veil.enclave.data_policy import log_event
from veil.enclave.framing import DEFAULT_FRAME_INTERVAL_S
from veil.enclave.keys import EnclaveIdentity
from veil.enclave.metrics import DEFAULT_PERIOD_S, MetricsPublisher, PrometheusEndpoint, start_prometheus
from veil.enclave.replay import ReplayGuard
from veil.enclave.servicers import (
    AttestationServicer,
    InferenceServicer,
    MetricsServicer,
    ServerMetrics,
)
from veil.enclave.tee.provider import AttestationProvider
from veil.enclave.transport import TRANSPORT_MAX_RECEIVE_BYTES, TransportGuard, TransportLimits
from veil.proto.v1 import service_pb2_grpc

if TYPE_CHECKING:
    from veil.enclave.engine.async_engine import AsyncEngine

__all__ = ["SERVICE_NAMES", "EnclaveServer", "ServerOptions", "default_state_dir", "serve"]

log = logging.getLogger("veil.enclave.server")

SERVICE_NAMES = (
    "veil.v1.AttestationService",
    "veil.v1.InferenceService",
    "veil.v1.MetricsService",
)
# A sealed request is at most MAX_REQUEST_BYTES of plaintext plus HPKE overhead and framing;
# a larger one is refused by the transport guard with a fixed string.
MAX_RECEIVE_BYTES = MAX_REQUEST_BYTES + 16 * 1024
GENERATE_METHOD = "/veil.v1.InferenceService/Generate"
MAX_SEND_BYTES = 4 * 1024 * 1024
_SIM_GPUS = 1  # GPUs the simulated TEE reports (and its release manifest names)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Where to listen and what one peer, one connection and everyone together may use."""

    host: str = "127.0.0.1"
    port: int = 0
    grace_s: float = 10.0
    evidence_rate: float = 50.0  # GetEvidence calls per second, sustained, all peers together
    evidence_burst: int = 100
    max_inflight: int = 256  # Generate streams admitted at once; more → RESOURCE_EXHAUSTED
    metrics_period_s: float = DEFAULT_PERIOD_S  # published metrics are a snapshot at most this old
    metrics_host: str = "127.0.0.1"  # Prometheus exposition (only where metrics_port is set)
    metrics_port: int | None = None
    peer_evidence_rate: float = 10.0  # GetEvidence calls per second per peer
    peer_evidence_burst: int = 20
    peer_generate_rate: float = 20.0  # Generate calls per second per peer
    peer_generate_burst: int = 64
    max_peers: int = 4096  # peers whose buckets are remembered (least recently seen evicted)
    max_calls_per_peer: int = 128  # calls one peer holds at once, any method
    max_streams_per_connection: int = 64  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
    request_timeout_s: float = 10.0  # a call's request message must arrive within this

    @property
    def max_calls(self) -> int:
        """Calls in flight, all peers together (health checks excepted)."""
        return self.max_inflight + 64

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments (see the module docstring, "Under abuse")."""
        return [
            ("grpc.max_receive_message_length", TRANSPORT_MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.max_metadata_size", 16 * 1024),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            # Ping the peer after 60 s without traffic and drop it 20 s after an unanswered ping:
            # a vanished client (half-open TCP) does not hold its calls for ever.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # A client may ping at most every 10 s without data; two strikes and GOAWAY.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            # A connection with no call for 5 minutes is closed.
            ("grpc.max_connection_idle_ms", 300_000),
        ]

    frame_interval_s: float = DEFAULT_FRAME_INTERVAL_S  # streamed answers: one frame per interval
    log_exact_counts: bool = False  # the data policy's switch: exact token counts in the log line


class EnclaveServer:
    """The gRPC server around one engine, one identity and one attestation provider."""

    def __init__(
        self,
        engine: AsyncEngine,
        identity: EnclaveIdentity,
        provider: AttestationProvider,
        options: ServerOptions = ServerOptions(),
        *,
        replay: ReplayGuard | None = None,
    ) -> None:
        self.engine = engine
        self.identity = identity
        self.provider = provider
        self.options = options
        self.metrics = ServerMetrics(simulated=provider.simulated)
        self.publisher = MetricsPublisher(
            self.metrics, lambda: engine.stats().total_kv_blocks, options.metrics_period_s
        )
        self.prometheus: PrometheusEndpoint | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.guard = TransportGuard(
            TransportLimits(
                max_calls_per_peer=options.max_calls_per_peer,
                max_calls=options.max_calls,
                request_timeout_s=options.request_timeout_s,
                max_request_bytes={GENERATE_METHOD: MAX_RECEIVE_BYTES},
            )
        )
        self.replay = replay if replay is not None else ReplayGuard()
        self._inference = InferenceServicer(
            identity,
            engine,
            self.metrics,
            max_inflight=options.max_inflight,
            limiter=PeerRateLimiter(
                options.peer_generate_rate, options.peer_generate_burst, max_peers=options.max_peers
            ),
            replay=self.replay,
            frame_interval_s=options.frame_interval_s,
            log_exact_counts=options.log_exact_counts,
        )
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; returns the port (useful with port 0)."""
        o = self.options
        # No maximum_concurrent_rpcs: the guard caps calls per peer and in total, health excepted.
        server = grpc.aio.server(options=o.grpc_options(), interceptors=[self.guard])
        evidence_limiter = PeerRateLimiter(
            o.peer_evidence_rate,
            o.peer_evidence_burst,
            max_peers=o.max_peers,
            shared=TokenBucket(o.evidence_rate, o.evidence_burst),
        )
        service_pb2_grpc.add_AttestationServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AttestationServicer(self.identity, self.provider, evidence_limiter, self.metrics),
            server,
        )
        service_pb2_grpc.add_InferenceServiceServicer_to_server(self._inference, server)  # type: ignore[no-untyped-call]
        metrics = MetricsServicer(self.publisher)
        service_pb2_grpc.add_MetricsServiceServicer_to_server(metrics, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        host = f"[{o.host}]" if ":" in o.host and not o.host.startswith("[") else o.host
        port = server.add_insecure_port(f"{host}:{o.port}")
        if port == 0:
            raise OSError(f"could not bind {o.host}:{o.port}")
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self.port = port
        log_event(log, "server.started", port=port)
        if o.metrics_port is not None:
            self.prometheus = start_prometheus(self.publisher, o.metrics_host, o.metrics_port)
            log_event(log, "metrics.started", port=self.prometheus.port)
        return port

    @property
    def draining(self) -> bool:
        return self._inference.draining

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop admitting, give in-flight streams ``grace_s`` to finish, cancel the rest, stop."""
        grace = self.options.grace_s if grace_s is None else grace_s
        self._inference.draining = True
        self.metrics.draining = True
        log_event(log, "server.draining", running=self.metrics.requests_active)
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self.prometheus is not None:
            self.prometheus.close()
        log_event(log, "server.stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def default_state_dir() -> Path:
    """``$VEIL_STATE_DIR``, else ``$XDG_STATE_HOME/veil``, else ``~/.local/state/veil``."""
    if os.environ.get("VEIL_STATE_DIR"):
        return Path(os.environ["VEIL_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "veil"


def _say(line: str) -> None:
    print(line, flush=True)


async def serve(args: Any) -> int:
    """Run ``veil serve`` until SIGTERM/SIGINT; ``args`` are the parsed CLI flags."""
    from veil.enclave.data_policy import (
        configure_logging,
        confine_temp_files,
        harden_process,
        install_exception_hooks,
        load_data_policy,
        remove_temp_files,
    )

    simulated = args.tee == "simulated"
    hardware: Any = None
    if not simulated:  # probe before anything heavy: a machine without a TEE exits in seconds
        from veil.attestation.collateral import CollateralStore
        from veil.enclave.errors import TeeUnavailableError
        from veil.enclave.tee.hardware import kds_chain_fetcher
        from veil.enclave.tee.probe import Seams, select_hardware

        state = Path(args.state_dir) if args.state_dir else default_state_dir()
        # SNP hosts that hand out no certificate table: the VCEK chain from AMD's KDS, cached.
        kds = kds_chain_fetcher(CollateralStore(cache_dir=state / "vendor-cache"))
        try:
            hardware = select_hardware(args.tee, getattr(args, "gpus", "auto"), Seams(fetch_chain=kds))
        except TeeUnavailableError as exc:
            _say(f"veil serve: {exc}")
            return 2
        _say(f"TEE: {hardware[0].name}" + (f"; GPUs: {hardware[1].name}" if hardware[1] else "; no GPUs"))
        _say(f"TEE: probed:\n{hardware[2]}")
    hardening = harden_process()
    policy = load_data_policy(Path(args.data_policy) if args.data_policy else None)
    configure_logging(policy, simulated=simulated)
    install_exception_hooks(log)
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, ctx: log_event(
            log, "loop.exception", logging.ERROR, error_type=type(ctx.get("exception")).__name__
        )
    )
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = confine_temp_files(state_dir)
    try:
        return await _serve(args, policy, state_dir, hardware, hardening.dumpable)
    finally:
        remove_temp_files(tmp)


async def _serve(args: Any, policy: Any, state_dir: Path, hardware: Any, dumpable: bool | None) -> int:
    from veil.enclave.engine.async_engine import AsyncEngine
    from veil.enclave.keys import build_digest, create_identity, measurement_from_build_digest
    from veil.enclave.sim_release import write_simulation_release
    from veil.enclave.tee.simulated import SimulatedTeeProvider, load_or_create_simulation, root_fingerprints

    stop = asyncio.Event()  # SIGTERM / SIGINT from here on drain instead of killing
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    simulated = hardware is None
    provider: AttestationProvider
    if simulated:
        authority = load_or_create_simulation(state_dir)
        fingerprints = root_fingerprints(authority.root_bundle_pem())
        _say("SIMULATED TEE: evidence is signed by a software simulation root, not by AMD or NVIDIA hardware")
        _say(f"SIMULATED TEE: simulation root: {authority.root_path}")
        _say(f"SIMULATED TEE: root sha256: ark={fingerprints[0]} gpu={fingerprints[1]}")
        digest_hex = policy.digest.hex()
        _say(f"SIMULATED TEE: core dumps disabled, dumpable={dumpable}, data policy sha256={digest_hex}")
    else:
        from veil.enclave.tee.hardware import start_hardware

        # Collateral fetched (or read from the state dir) and GPUs self-verified before the model loads.
        provider = await asyncio.to_thread(start_hardware, hardware[0], hardware[1], state_dir)
        _say(f"TEE: {provider.name}: collateral stapled, GPUs (if any) verified and set ready")
        _say(f"TEE: core dumps disabled, dumpable={dumpable}, data policy sha256={policy.digest.hex()}")

    # Everything the enclave caches lives in its state dir: the compiled kernels (a prebuilt one
    # from `make setup` is only read, verified by its sidecar and copied) and the tokenizer.
    from veil.kernels import cpu_ext

    cpu_ext.configure(state_dir / "kernels", prebuilt=(cpu_ext.default_cache_dir(),))
    # prefix caching within a tenant only where the attested data policy allows it
    kwargs: dict[str, Any] = {
        "cache_dir": state_dir / "cache",
        "prefix_caching": getattr(policy, "share_kv_within_tenant", False) is True,
    }
    if args.kv_cache_mb is not None:
        kwargs["kv_cache_mb"] = args.kv_cache_mb
    if args.max_batch is not None:
        kwargs["max_batch"] = args.max_batch
    engine = AsyncEngine.from_model(args.model, device=getattr(args, "device", "cpu"), **kwargs)
    _say(f"device: {engine.device}")
    await engine.start()
    try:
        digest = build_digest()
        model_digest = engine.model_digest
        identity = create_identity(
            model_digest=model_digest if isinstance(model_digest, bytes) else bytes.fromhex(model_digest),
            engine_version=engine.engine_version,
            data_policy_digest=policy.digest,
            server_build_digest=digest,
            simulated=simulated,
        )
        if simulated:
            provider = SimulatedTeeProvider(
                authority, measurement_from_build_digest(digest), gpu_count=_SIM_GPUS
            )
            manifest = write_simulation_release(
                state_dir,
                build_digest=digest,
                model_digest=identity.claims.model_digest,
                data_policy_digest=policy.digest,
                gpu_count=_SIM_GPUS,
                tcb=authority.tcb,
            )
            _say(f"SIMULATED TEE: release manifest (signed by the simulation publisher key): {manifest}")
        options = ServerOptions(
            host=args.host,
            port=args.port,
            grace_s=args.grace,
            evidence_rate=args.evidence_rate,
            evidence_burst=max(1, int(args.evidence_rate * 2)),
            metrics_period_s=args.metrics_period,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            peer_evidence_rate=args.peer_evidence_rate,
            peer_evidence_burst=max(1, int(args.peer_evidence_rate * 2)),
            peer_generate_rate=args.peer_generate_rate,
            peer_generate_burst=args.peer_generate_burst,
            max_calls_per_peer=args.max_calls_per_peer,
            max_streams_per_connection=args.max_streams_per_connection,
            request_timeout_s=args.request_timeout,
            frame_interval_s=args.frame_interval_ms / 1000.0,
            # helper M's DataPolicy switch; a policy without it never allows exact counts
            log_exact_counts=getattr(policy, "log_exact_counts", False) is True,
        )
        server = EnclaveServer(engine, identity, provider, options)
        port = await server.start()
        if server.prometheus is not None:
            _say(f"metrics (Prometheus) on http://{args.metrics_host}:{server.prometheus.port}/metrics")
        label = "SIMULATED TEE" if simulated else "TEE"
        _say(f"{label}: enclave key id {identity.key_id.hex()}, build sha256 {digest.hex()}")
        host = f"[{args.host}]" if ":" in args.host else args.host
        _say(f"listening on {host}:{port}")
        await stop.wait()
        await server.drain(args.grace)
    finally:
        await engine.stop(args.grace)
    sys.stdout.flush()
    return 0
