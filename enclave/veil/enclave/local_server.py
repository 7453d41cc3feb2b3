"""Run ``veil serve`` in a subprocess on loopback, for ``veil demo``, tests and benchmarks.

The server is started with ``--port 0`` and announces its port on stdout
(``listening on HOST:PORT``), so there is no race for a "free" port. Its stdout
and stderr go to files (``log_dir/server.out`` / ``server.err``) that callers can
search afterwards; readiness is the standard ``grpc.health.v1`` check.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc

__all__ = ["LocalServer", "ServerStartError"]

_LISTENING = re.compile(r"listening on \[?([0-9a-fA-F.:]+?)\]?:(\d+)\s*$", re.MULTILINE)


class ServerStartError(RuntimeError):
    """``veil serve`` exited or did not become healthy in time."""


class LocalServer:
    """One ``veil serve --tee simulated`` subprocess with its own state directory.

    ``extra_args`` are appended to the command line; ``env`` adds environment
    variables (e.g. ``TMPDIR``). Use as a context manager, or call :meth:`start`
    and :meth:`stop`.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        log_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.log_dir = Path(log_dir) if log_dir else self.state_dir.parent / (self.state_dir.name + "-logs")
        self.host = host
        self.requested_port = port
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``host:port`` to dial."""
        return f"{self.host}:{self.port}"

    @property
    def root_pem(self) -> Path:
        """The simulation root the server wrote (``STATE_DIR/simulation-root.pem``)."""
        return self.state_dir / "simulation-root.pem"

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / "server.out"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / "server.err"

    def output(self) -> str:
        """Everything the server printed so far (stdout then stderr)."""
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def start(self, timeout: float = 180.0) -> LocalServer:
        """Start the server and wait until it is listening and healthy.

        After :meth:`stop` it can be started again (same state dir, so the same
        simulation root; a new enclave key and, with port 0, a new port).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        offset = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        cmd = [
            sys.executable, "-m", "veil", "serve", "--tee", "simulated", "--state-dir", str(self.state_dir),
            "--host", self.host, "--port", str(self.requested_port), *self.extra_args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while not self.port:
            self._check_alive()
            with open(self.stdout_path, "rb") as out:
                out.seek(offset)
                match = _LISTENING.search(out.read().decode(errors="replace"))
            if match:
                self.port = int(match.group(2))
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"veil serve did not announce its port in {timeout:.0f} s")
            time.sleep(0.05)
        self.wait_healthy(max(1.0, deadline - time.monotonic()))
        return self

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.output()[-2000:]
            raise ServerStartError(f"veil serve exited with status {self.process.returncode}:\n{tail}")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Poll ``grpc.health.v1.Health/Check`` until SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(f"veil serve on {self.address} not healthy in {timeout:.0f} s")
                time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit status."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
