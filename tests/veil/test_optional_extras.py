"""Commands whose optional extra is missing fail with a one-line message naming the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from veil.cli import main


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where importing ``module`` fails."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120, check=False
    )


def test_measure_without_sev_snp_measure_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sevsnpmeasure", None)
    ovmf = tmp_path / "OVMF.fd"
    ovmf.write_bytes(b"\x00" * 16)
    assert main(["measure", "snp", "--ovmf", str(ovmf), "--vcpus", "1", "--vcpu-type", "EPYC-v4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'veil[measure]'" in err and "\n" not in err


def test_collateral_imports_without_httpx_and_fetching_is_a_typed_error() -> None:
    result = _without(
        "httpx",
        "from veil.attestation.collateral import CollateralStore\n"
        "from veil.attestation.errors import CollateralError\n"
        "try:\n"
        "    CollateralStore().nvidia_rim('NV_GPU_DRIVER_GH100_535.00')\n"
        "except CollateralError as exc:\n"
        "    print('typed:', exc)\n",
    )
    assert result.returncode == 0, result.stderr
    assert "typed:" in result.stdout and "veil[audit]" in result.stdout


def test_demo_relay_works_without_hpack() -> None:
    result = _without(
        "hpack",
        "import socket, threading\n"
        "from veil.demo.relay import Relay\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "def echo():\n"
        "    conn, _ = server.accept()\n"
        "    conn.sendall(conn.recv(10))\n"
        "    conn.close()\n"
        "threading.Thread(target=echo, daemon=True).start()\n"
        "relay = Relay(server.getsockname()[:2], decode=False).start()\n"
        "c = socket.create_connection(('127.0.0.1', relay.port))\n"
        "c.sendall(b'ping')\n"
        "assert c.recv(10) == b'ping'\n"
        "relay.close()\n"
        "print(relay.all_bytes())\n",
    )
    assert result.returncode == 0, result.stderr
    assert "b'pingping'" in result.stdout


def test_a_rewriter_needs_a_decoding_relay() -> None:
    from veil.demo.relay import Relay

    class Passthrough:
        def on_message(self, path: str, index: int, data: bytes) -> list[bytes]:
            return [data]

        def on_end(self, path: str) -> list[bytes]:
            return []

    with pytest.raises(ValueError, match="decod"):
        Relay(("127.0.0.1", 9), Passthrough(), decode=False)
