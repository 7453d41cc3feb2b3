"""A loopback TCP relay for ``veil demo`` and the gRPC tests: records every byte, can rewrite gRPC messages.

It sits between a gRPC client and a server (both cleartext HTTP/2 on loopback) and
plays the untrusted host / load balancer of DESIGN.md: it sees everything that
crosses the wire, and it can tamper with it.

* ``raw["c2s"]`` / ``raw["s2c"]``: every byte each side sent, as received (``sent`` /
  ``received`` / ``all_bytes()`` read them under the lock). With ``decode=False`` that is
  all it does: any TCP stream passes through unparsed (``veil demo`` relays this way, so it
  needs no ``hpack``, a dev dependency imported only when decoding).
* ``headers``: every HTTP/2 header block, HPACK-decoded (so ``:path``, ``grpc-status``
  and ``grpc-message`` can be searched in clear, not just as Huffman-coded bytes).
* ``messages``: every gRPC message (5-byte length-prefixed) per direction and stream,
  with the RPC path it belongs to.
* ``rewriter``: an object whose ``on_message(path, index, data) -> list[bytes]`` sees each
  server-to-client gRPC message and returns what to forward instead (``[data]`` to pass it
  on, ``[]`` to drop it, several to inject), and whose ``on_end(path) -> list[bytes]``
  flushes anything it held back when the response stream ends. HTTP/2 frames are re-framed
  around the rewritten messages; all other frames pass through unchanged.
* ``retarget(address)`` points the relay at another upstream and drops current
  connections (the client's channel reconnects through the relay to the new server).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, CONTINUATION = 0x0, 0x1, 0x9
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20
MAX_FRAME = 16384


class Rewriter(Protocol):
    def on_message(self, path: str, index: int, data: bytes) -> list[bytes]: ...
    def on_end(self, path: str) -> list[bytes]: ...


@dataclass
class GrpcMessage:
    direction: str
    stream_id: int
    path: str
    data: bytes


@dataclass
class _Stream:
    path: str = ""
    buffer: bytearray = field(default_factory=bytearray)
    count: int = 0


class _Direction:
    """Frame parser (and optional re-framer) for one direction of one connection."""

    def __init__(self, relay: Relay, conn: _Connection, name: str) -> None:
        self.relay = relay
        self.conn = conn
        self.name = name
        self.buffer = bytearray()
        self.preface_pending = name == "c2s"
        import hpack  # dev dependency: only a decoding relay needs it

        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 1 << 20
        self.header_block = bytearray()
        self.header_stream = 0
        self.header_flags = 0

    def feed(self, data: bytes) -> bytes:
        """Consume received bytes; return the bytes to forward."""
        self.buffer += data
        out = bytearray()
        if self.preface_pending:
            if len(self.buffer) < len(PREFACE):
                return b""
            out += self.buffer[: len(PREFACE)]
            del self.buffer[: len(PREFACE)]
            self.preface_pending = False
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            frame = bytes(self.buffer[: 9 + length])
            del self.buffer[: 9 + length]
            out += self._frame(frame)
        return bytes(out)

    def _frame(self, frame: bytes) -> bytes:
        ftype, flags = frame[3], frame[4]
        stream_id = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
        payload = frame[9:]
        if ftype in (HEADERS, CONTINUATION):
            prefix = b""
            if ftype == HEADERS:
                body = payload
                if flags & PADDED:
                    pad = body[0]
                    body = body[1 : len(body) - pad]
                if flags & PRIORITY:
                    body = body[5:]
                self.header_block = bytearray(body)
                self.header_stream, self.header_flags = stream_id, flags
                # Trailers end the response: flush what the rewriter held back first.
                if self.name == "s2c" and flags & END_STREAM and self.relay.rewriter is not None:
                    prefix = self._flush_end(stream_id)
            else:
                self.header_block += payload
            if flags & END_HEADERS:
                self._headers_done()
            return prefix + frame
        if ftype == DATA:
            body = payload
            if flags & PADDED:
                pad = body[0]
                body = body[1 : len(body) - pad]
            return self._data(stream_id, flags, body, frame)
        return frame

    def _headers_done(self) -> None:
        headers = [(str(k), str(v)) for k, v in self.decoder.decode(bytes(self.header_block), raw=False)]
        stream = self.conn.stream(self.header_stream)
        for k, v in headers:
            if k == ":path":
                stream.path = v
                self.conn.paths[self.header_stream] = v
        with self.relay.lock:
            self.relay.headers.append((self.name, self.header_stream, headers))

    def _messages(self, stream: _Stream) -> Iterator[bytes]:
        while len(stream.buffer) >= 5:
            length = struct.unpack(">I", stream.buffer[1:5])[0]
            if len(stream.buffer) < 5 + length:
                return
            data = bytes(stream.buffer[5 : 5 + length])
            del stream.buffer[: 5 + length]
            yield data

    def _data(self, stream_id: int, flags: int, body: bytes, frame: bytes) -> bytes:
        stream = self.conn.stream(stream_id) if self.name == "c2s" else self.conn.response(stream_id)
        stream.path = self.conn.paths.get(stream_id, stream.path)
        stream.buffer += body
        forwarded: list[bytes] = []
        for data in self._messages(stream):
            with self.relay.lock:
                self.relay.messages.append(GrpcMessage(self.name, stream_id, stream.path, data))
            if self.name == "s2c" and self.relay.rewriter is not None:
                forwarded += self.relay.rewriter.on_message(stream.path, stream.count, data)
            else:
                forwarded.append(data)
            stream.count += 1
        if self.name == "c2s" or self.relay.rewriter is None:
            return frame
        return self._reframe(stream_id, forwarded, flags & END_STREAM)

    def _flush_end(self, stream_id: int) -> bytes:
        rewriter = self.relay.rewriter
        if rewriter is None:
            return b""
        path = self.conn.paths.get(stream_id, "")
        return self._reframe(stream_id, rewriter.on_end(path), 0)

    @staticmethod
    def _reframe(stream_id: int, messages: list[bytes], end_stream: int) -> bytes:
        body = b"".join(b"\x00" + struct.pack(">I", len(m)) + m for m in messages)
        out = bytearray()
        pieces = [body[i : i + MAX_FRAME] for i in range(0, len(body), MAX_FRAME)] or []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            flags = END_STREAM if (last and end_stream) else 0
            out += len(piece).to_bytes(3, "big") + bytes([DATA, flags]) + stream_id.to_bytes(4, "big") + piece
        if not pieces and end_stream:
            out += (0).to_bytes(3, "big") + bytes([DATA, END_STREAM]) + stream_id.to_bytes(4, "big")
        return bytes(out)


class _Connection:
    def __init__(self, relay: Relay, client: socket.socket, server: socket.socket) -> None:
        self.relay = relay
        self.client = client
        self.server = server
        self.paths: dict[int, str] = {}
        self._requests: dict[int, _Stream] = {}
        self._responses: dict[int, _Stream] = {}
        self.c2s = _Direction(relay, self, "c2s") if relay.decode else None
        self.s2c = _Direction(relay, self, "s2c") if relay.decode else None

    def stream(self, stream_id: int) -> _Stream:
        return self._requests.setdefault(stream_id, _Stream())

    def response(self, stream_id: int) -> _Stream:
        return self._responses.setdefault(stream_id, _Stream())

    def start(self) -> None:
        for src, dst, name, direction in (
            (self.client, self.server, "c2s", self.c2s),
            (self.server, self.client, "s2c", self.s2c),
        ):
            threading.Thread(target=self._pump, args=(src, dst, name, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, name: str, direction: _Direction | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.relay.lock:
                    self.relay.raw[name] += data
                out = direction.feed(data) if direction is not None else data
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        except Exception as exc:  # a parse error in the relay must not pass silently
            self.relay.errors.append(exc)
        finally:
            self.close()

    def close(self) -> None:
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class Relay:
    """Start with ``Relay(("127.0.0.1", port)).start()``; ``address`` is what clients dial.

    ``decode=False`` records and forwards bytes only (any TCP stream; no rewriter).
    """

    def __init__(
        self, upstream: tuple[str, int], rewriter: Rewriter | None = None, *, decode: bool = True
    ) -> None:
        if rewriter is not None and not decode:
            raise ValueError("a rewriter needs a decoding relay (decode=True)")
        self.upstream = upstream
        self.rewriter = rewriter
        self.decode = decode
        self.lock = threading.Lock()
        self.raw: dict[str, bytearray] = {"c2s": bytearray(), "s2c": bytearray()}
        self.headers: list[tuple[str, int, list[tuple[str, str]]]] = []
        self.messages: list[GrpcMessage] = []
        self.errors: list[BaseException] = []
        self._connections: list[_Connection] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._closed = False

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Relay:
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, server)
            with self.lock:
                self._connections.append(conn)
            conn.start()

    def retarget(self, upstream: tuple[str, int]) -> None:
        """Send new connections to ``upstream`` and drop the current ones."""
        self.upstream = upstream
        self.drop_connections()

    def drop_connections(self) -> None:
        with self.lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def clear(self) -> None:
        """Forget what was recorded so far."""
        with self.lock:
            self.raw = {"c2s": bytearray(), "s2c": bytearray()}
            self.headers.clear()
            self.messages.clear()

    @property
    def sent(self) -> bytes:
        """Every byte the client sent (client -> server)."""
        with self.lock:
            return bytes(self.raw["c2s"])

    @property
    def received(self) -> bytes:
        """Every byte the server sent (server -> client)."""
        with self.lock:
            return bytes(self.raw["s2c"])

    def all_bytes(self) -> bytes:
        with self.lock:
            return bytes(self.raw["c2s"]) + bytes(self.raw["s2c"])

    def header_text(self) -> str:
        with self.lock:
            return "\n".join(f"{k}: {v}" for _, _, hs in self.headers for k, v in hs)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.drop_connections()

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
