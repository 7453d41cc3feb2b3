"""A test harness for ``EnclaveServer`` over loopback: one engine on an event loop in a thread,
servers started on it on demand (used by ``test_server.py`` and ``test_abuse.py``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from veil.enclave.keys import build_digest, create_identity, measurement_from_build_digest
from veil.enclave.server import EnclaveServer, ServerOptions
from veil.enclave.tee.simulated import SimulatedTeeProvider, load_or_create_simulation

T = TypeVar("T")


class Harness:
    """An event loop in a thread holding one engine; servers are started on it on demand."""

    def __init__(self, model: Any, state_dir: Path, *, kv_cache_mb: int = 64, max_batch: int = 8) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="veil-test-loop", daemon=True)
        self.thread.start()
        self.state_dir = state_dir
        self.authority = load_or_create_simulation(state_dir)
        self.engine: Any = self.run(self._start_engine(model, kv_cache_mb, max_batch), timeout=180)
        self.digest = build_digest()
        self.identity = self.new_identity()

    async def _start_engine(self, model: Any, kv_cache_mb: int, max_batch: int) -> Any:
        from veil.enclave.engine.async_engine import AsyncEngine
        from veil.enclave.engine.block_manager import blocks_for_budget
        from veil.enclave.runner.cpu import CpuRunner

        # what AsyncEngine.from_model(kv_cache_mb=..., max_batch=...) builds, over the session's model
        blocks = blocks_for_budget(kv_cache_mb * 2**20, model.config.kv_bytes_per_token, 16)
        engine = AsyncEngine(CpuRunner(model, blocks, 16), max_batch=max_batch)
        await engine.start()
        return engine

    def new_identity(self) -> Any:
        digest = self.engine.model_digest
        return create_identity(
            model_digest=digest if isinstance(digest, bytes) else bytes.fromhex(digest),
            engine_version=self.engine.engine_version,
            data_policy_digest=b"\x00" * 32,
            server_build_digest=self.digest,
            simulated=True,
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_server(self, **options: Any) -> EnclaveServer:
        provider = SimulatedTeeProvider(self.authority, measurement_from_build_digest(self.digest))
        server = EnclaveServer(
            self.engine, self.identity, provider, ServerOptions(host="127.0.0.1", port=0, **options)
        )
        self.run(server.start())
        return server

    def stop_server(self, server: EnclaveServer, grace: float = 1.0) -> None:
        self.run(server.drain(grace), timeout=grace + 30)

    def close(self) -> None:
        self.run(self.engine.stop(1.0), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
