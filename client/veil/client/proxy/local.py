"""Run ``veil proxy`` in a subprocess on loopback, for tests and ``bench/load.py``.

Started with ``--port 0``; the port is read from its ``listening on http://HOST:PORT`` line.
Its stderr goes to a file that callers can search afterwards (the canary tests do).
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

__all__ = ["LocalProxy", "ProxyStartError"]

_LISTENING = re.compile(r"listening on http://\[?([0-9a-fA-F.:]+?)\]?:(\d+)\s*$", re.MULTILINE)


class ProxyStartError(RuntimeError):
    """``veil proxy`` exited or did not announce its port in time."""


class LocalProxy:
    """One ``veil proxy TARGET... --port 0`` subprocess; a context manager."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        log_dir: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.targets = list(targets)
        self.log_dir = Path(log_dir)
        self.args = list(args)
        self.env = dict(env or {})
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / "proxy.out"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / "proxy.err"

    def output(self) -> str:
        """Everything the proxy printed so far (stdout then stderr)."""
        return "".join(
            p.read_text(errors="replace") for p in (self.stdout_path, self.stderr_path) if p.exists()
        )

    def start(self, timeout: float = 60.0) -> LocalProxy:
        """Start the proxy and wait until it listens."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "veil", "proxy", *self.targets, "--port", "0", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ProxyStartError(
                    f"veil proxy exited with {self.process.returncode}:\n{self.output()[-2000:]}"
                )
            match = _LISTENING.search(self.stdout_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(2))
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ProxyStartError(f"veil proxy did not announce its port in {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit status."""
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

    def __enter__(self) -> LocalProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
