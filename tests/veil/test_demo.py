"""``veil demo``: the in-process channel mode, the plaintext search, and its recording relay."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

from veil.demo.cli import _plaintext_in
from veil.demo.relay import Relay


def test_in_process_demo_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "veil", "demo", "--in-process"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "plaintext in them: none" in result.stdout and "demo ok" in result.stdout


def test_plaintext_search_finds_pieces() -> None:
    wire = b"\x00\x01header" + b"the host cannot read this sentence" + b"\xff"
    assert _plaintext_in(wire, ["Surely the host cannot read this sentence at all"])
    assert _plaintext_in("secret answer text".encode("utf-16-le"), ["secret answer text"])
    assert not _plaintext_in(b"\x00" * 100, ["nothing of this is on the wire"])


def test_wire_tap_records_both_directions() -> None:
    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=echo, daemon=True).start()
    tap = Relay(server.getsockname()[:2], decode=False).start()
    host, port = tap.address.split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"hello")
        assert client.recv(100) == b"HELLO"
    tap.close()
    server.close()
    assert bytes(tap.sent) == b"hello" and bytes(tap.received) == b"HELLO"
    assert tap.all_bytes() == b"helloHELLO"
