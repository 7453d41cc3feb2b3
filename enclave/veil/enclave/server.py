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
from veil.enclave.data_policy import log_event
from veil.enclave.framing import DEFAULT_FRAME_INTERVAL_S
from veil.enclave.keys import EnclaveIdentity
from veil.enclave.replay import ReplayGuard
from veil.enclave.servicers import (
    AttestationServicer,
    InferenceServicer,
    MetricsServicer,
    ServerMetrics,
    TokenBucket,
)
from veil.enclave.tee.provider import AttestationProvider
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
# A sealed request is at most MAX_REQUEST_BYTES of plaintext plus HPKE overhead and framing.
MAX_RECEIVE_BYTES = MAX_REQUEST_BYTES + 16 * 1024
MAX_SEND_BYTES = 4 * 1024 * 1024
_SIM_GPUS = 1  # GPUs the simulated TEE reports (and its release manifest names)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    grace_s: float = 10.0
    evidence_rate: float = 50.0  # GetEvidence calls per second, sustained
    evidence_burst: int = 100
    max_inflight: int = 256  # Generate streams admitted at once; more → RESOURCE_EXHAUSTED
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
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.replay = replay if replay is not None else ReplayGuard()
        self._inference = InferenceServicer(
            identity,
            engine,
            self.metrics,
            max_inflight=options.max_inflight,
            replay=self.replay,
            frame_interval_s=options.frame_interval_s,
            log_exact_counts=options.log_exact_counts,
        )
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; returns the port (useful with port 0)."""
        o = self.options
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=o.max_inflight + 64,
        )
        service_pb2_grpc.add_AttestationServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AttestationServicer(
                self.identity, self.provider, TokenBucket(o.evidence_rate, o.evidence_burst), self.metrics
            ),
            server,
        )
        service_pb2_grpc.add_InferenceServiceServicer_to_server(self._inference, server)  # type: ignore[no-untyped-call]
        metrics = MetricsServicer(self.metrics, self.engine)
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

    if args.tee != "simulated":
        _say(f"veil serve: --tee {args.tee} is not available yet (only 'simulated')")
        return 2
    simulated = True
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
        return await _serve(args, policy, state_dir, simulated, hardening.dumpable)
    finally:
        remove_temp_files(tmp)


async def _serve(args: Any, policy: Any, state_dir: Path, simulated: bool, dumpable: bool | None) -> int:
    from veil.enclave.engine.async_engine import AsyncEngine
    from veil.enclave.keys import build_digest, create_identity, measurement_from_build_digest
    from veil.enclave.sim_release import write_simulation_release
    from veil.enclave.tee.simulated import SimulatedTeeProvider, load_or_create_simulation, root_fingerprints

    stop = asyncio.Event()  # SIGTERM / SIGINT from here on drain instead of killing
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    authority = load_or_create_simulation(state_dir)
    fingerprints = root_fingerprints(authority.root_bundle_pem())
    _say("SIMULATED TEE: evidence is signed by a software simulation root, not by AMD or NVIDIA hardware")
    _say(f"SIMULATED TEE: simulation root: {authority.root_path}")
    _say(f"SIMULATED TEE: root sha256: ark={fingerprints[0]} gpu={fingerprints[1]}")
    _say(f"SIMULATED TEE: core dumps disabled, dumpable={dumpable}, data policy sha256={policy.digest.hex()}")

    kwargs: dict[str, Any] = {}
    if args.kv_cache_mb is not None:
        kwargs["kv_cache_mb"] = args.kv_cache_mb
    if args.max_batch is not None:
        kwargs["max_batch"] = args.max_batch
    engine = AsyncEngine.from_model(args.model, **kwargs)
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
        provider = SimulatedTeeProvider(authority, measurement_from_build_digest(digest), gpu_count=_SIM_GPUS)
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
            frame_interval_s=args.frame_interval_ms / 1000.0,
            # helper M's DataPolicy switch; a policy without it never allows exact counts
            log_exact_counts=getattr(policy, "log_exact_counts", False) is True,
        )
        server = EnclaveServer(engine, identity, provider, options)
        port = await server.start()
        _say(f"SIMULATED TEE: enclave key id {identity.key_id.hex()}, build sha256 {digest.hex()}")
        host = f"[{args.host}]" if ":" in args.host else args.host
        _say(f"listening on {host}:{port}")
        await stop.wait()
        await server.drain(args.grace)
    finally:
        await engine.stop(args.grace)
    sys.stdout.flush()
    return 0
