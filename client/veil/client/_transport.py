"""All network I/O of the SDK, behind one small interface (the httpx "transport" seam).

A transport moves opaque bytes: it sends a nonce and returns the raw ``Evidence``
bytes exactly as they arrived (so they can be saved for audit), and it sends a
sealed request and yields the raw ``EncryptedChunk.payload`` of each response
message. It never sees plaintext. gRPC statuses become :class:`ServerError` with
the status name as ``code`` (for the sync and the ``grpc.aio`` calls alike) and the
server's ``retry-after-ms`` trailing metadata as ``retry_after``; a call cut short
because the transport was closed raises :class:`ClientClosedError`. Everything above
the transport is sans-I/O.

Tests and embedders pass their own transport (any object with these methods) to
``Client(transport=...)``; :class:`GrpcTransport` and :class:`AsyncGrpcTransport`
are the real ones.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol, cast

import grpc
import grpc.aio

from veil.client.errors import ChannelError, ClientClosedError, ConfigurationError, ServerError
from veil.proto.v1 import service_pb2

__all__ = [
    "AsyncGrpcTransport",
    "AsyncResponseStream",
    "AsyncTransport",
    "GrpcTransport",
    "ResponseStream",
    "Transport",
    "channel_target",
    "server_error",
]

GET_EVIDENCE = "/veil.v1.AttestationService/GetEvidence"
GENERATE = "/veil.v1.InferenceService/Generate"
RETRY_AFTER_KEY = "retry-after-ms"
CLOSED_MESSAGE = "the client was closed"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class ResponseStream(Protocol):
    """The raw payloads of one ``Generate`` call; ``cancel()`` abandons it."""

    def __iter__(self) -> Iterator[bytes]: ...
    def cancel(self) -> None:
        """Abandon the call (the server cancels the request and frees its resources)."""
        ...


class Transport(Protocol):
    """Synchronous transport: what :class:`veil.client.Client` needs from the network."""

    def get_evidence(self, nonce: bytes, timeout: float | None) -> bytes:
        """Send ``GetEvidence(nonce)``; return the serialized ``Evidence`` as received."""
        ...

    def generate(self, request: service_pb2.EncryptedRequest, timeout: float | None) -> ResponseStream:
        """Start ``Generate(request)``; the stream yields each ``EncryptedChunk.payload``."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class AsyncResponseStream(Protocol):
    """Asynchronous twin of :class:`ResponseStream`."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...
    def cancel(self) -> None:
        """Abandon the call (the server cancels the request and frees its resources)."""
        ...


class AsyncTransport(Protocol):
    """Asynchronous transport: what :class:`veil.client.AsyncClient` needs from the network."""

    async def get_evidence(self, nonce: bytes, timeout: float | None) -> bytes:
        """Send ``GetEvidence(nonce)``; return the serialized ``Evidence`` as received."""
        ...

    def generate(self, request: service_pb2.EncryptedRequest, timeout: float | None) -> AsyncResponseStream:
        """Start ``Generate(request)``; the stream yields each ``EncryptedChunk.payload``."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def channel_target(target: str) -> tuple[str, bool]:
    """Split ``grpc://host:port`` / ``grpcs://host:port`` / ``host:port`` into (address, use_tls).

    Plain ``host:port`` means an insecure gRPC channel: the payload is end-to-end
    encrypted to the attested enclave key either way, TLS only hides metadata.
    """
    if target.startswith("grpcs://"):
        address, tls = target[len("grpcs://") :], True
    elif target.startswith("grpc://"):
        address, tls = target[len("grpc://") :], False
    elif "://" in target:
        raise ConfigurationError(f"unsupported target scheme in {target!r} (use host:port or grpcs://)")
    else:
        address, tls = target, False
    if not address or ":" not in address:
        raise ConfigurationError(f"target must be host:port, got {target!r}")
    return address, tls


def _identity(data: bytes) -> bytes:
    return data


def _retry_after(metadata: Any) -> float | None:
    """The ``retry-after-ms`` trailing metadata in seconds, or None when absent or malformed."""
    for key, value in metadata or ():
        if key != RETRY_AFTER_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        try:
            millis = float(text.strip())
        except ValueError:
            return None
        return millis / 1000 if math.isfinite(millis) and millis >= 0 else None
    return None


def server_error(exc: grpc.RpcError) -> ServerError:
    """A gRPC failure as :class:`ServerError`: the status name, details and retry hint preserved.

    A sync call's error is a ``grpc.Call``; a ``grpc.aio`` one is an ``AioRpcError``, which
    is not (testing only ``grpc.Call`` turned every async failure into ``UNKNOWN``).
    """
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        code, details, trailers = exc.code(), exc.details(), exc.trailing_metadata()
    else:
        code, details, trailers = None, None, None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return ServerError(name, details or "no details", retry_after=_retry_after(trailers))


def _payload(data: bytes) -> bytes:
    chunk = service_pb2.EncryptedChunk()
    try:
        chunk.ParseFromString(data)
    except Exception:
        raise ChannelError("response message is not an EncryptedChunk") from None
    return chunk.payload


class _GrpcResponseStream:
    def __init__(self, call: grpc.Call, messages: Iterator[bytes], transport: GrpcTransport) -> None:
        self._call = call
        self._messages = messages
        self._transport = transport

    def __iter__(self) -> Iterator[bytes]:
        try:
            for data in self._messages:
                yield _payload(data)
        except grpc.RpcError as exc:
            if self._transport.closed:
                raise ClientClosedError(CLOSED_MESSAGE) from None
            raise server_error(exc) from None

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]


class GrpcTransport:
    """The real synchronous transport: one gRPC channel to ``target``.

    ``channel`` may be given instead (for tests or custom credentials); it is then
    not closed by :meth:`close` unless ``own_channel`` is true.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        own_channel: bool | None = None,
    ) -> None:
        if channel is None:
            if target is None:
                raise ConfigurationError("a target or a channel is required")
            address, tls = channel_target(target)
            if tls or credentials is not None:
                creds = credentials or grpc.ssl_channel_credentials()
                channel = grpc.secure_channel(address, creds, options=_OPTIONS)
            else:
                channel = grpc.insecure_channel(address, options=_OPTIONS)
            own_channel = True if own_channel is None else own_channel
        self._channel = channel
        self._own = bool(own_channel)
        self.closed = False
        self._get_evidence = channel.unary_unary(
            GET_EVIDENCE,
            request_serializer=service_pb2.GetEvidenceRequest.SerializeToString,
            response_deserializer=_identity,
        )
        self._generate = channel.unary_stream(
            GENERATE,
            request_serializer=service_pb2.EncryptedRequest.SerializeToString,
            response_deserializer=_identity,
        )

    def get_evidence(self, nonce: bytes, timeout: float | None) -> bytes:
        """Send ``GetEvidence(nonce)``; return the serialized ``Evidence`` as received."""
        if self.closed:
            raise ClientClosedError(CLOSED_MESSAGE)
        try:
            data: bytes = self._get_evidence(service_pb2.GetEvidenceRequest(nonce=nonce), timeout=timeout)
        except grpc.RpcError as exc:
            if self.closed:
                raise ClientClosedError(CLOSED_MESSAGE) from None
            raise server_error(exc) from None
        return data

    def generate(self, request: service_pb2.EncryptedRequest, timeout: float | None) -> ResponseStream:
        """Start ``Generate(request)``; iterate the result for each chunk payload."""
        if self.closed:
            raise ClientClosedError(CLOSED_MESSAGE)
        call = self._generate(request, timeout=timeout)
        return _GrpcResponseStream(call, cast("Iterator[bytes]", call), self)

    def close(self) -> None:
        """Close the channel if this transport opened it; later calls raise :class:`ClientClosedError`."""
        self.closed = True
        if self._own:
            self._channel.close()


def _closed_under(transport: AsyncGrpcTransport) -> bool:
    """True when a ``CancelledError`` came from closing ``transport``, not from cancelling our task."""
    task = asyncio.current_task()
    return transport.closed and (task is None or task.cancelling() == 0)


class _AsyncGrpcResponseStream:
    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
        transport: AsyncGrpcTransport,
    ) -> None:
        self._call = call
        self._transport = transport

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._call:
                yield _payload(data)
        except grpc.RpcError as exc:
            if self._transport.closed:
                raise ClientClosedError(CLOSED_MESSAGE) from None
            raise server_error(exc) from None
        except asyncio.CancelledError:
            # Closing the channel cancels its calls: that is the client's close, not ours to pass on
            # as a bare CancelledError. A cancelled task keeps its CancelledError.
            if _closed_under(self._transport):
                raise ClientClosedError(CLOSED_MESSAGE) from None
            raise

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    def cancel(self) -> None:
        self._call.cancel()


class AsyncGrpcTransport:
    """The real asynchronous transport: one ``grpc.aio`` channel to ``target``."""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        own_channel: bool | None = None,
    ) -> None:
        if channel is None:
            if target is None:
                raise ConfigurationError("a target or a channel is required")
            address, tls = channel_target(target)
            if tls or credentials is not None:
                creds = credentials or grpc.ssl_channel_credentials()
                channel = grpc.aio.secure_channel(address, creds, options=_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
            own_channel = True if own_channel is None else own_channel
        self._channel = channel
        self._own = bool(own_channel)
        self.closed = False
        self._get_evidence = channel.unary_unary(
            GET_EVIDENCE,
            request_serializer=service_pb2.GetEvidenceRequest.SerializeToString,
            response_deserializer=_identity,
        )
        self._generate = channel.unary_stream(
            GENERATE,
            request_serializer=service_pb2.EncryptedRequest.SerializeToString,
            response_deserializer=_identity,
        )

    async def get_evidence(self, nonce: bytes, timeout: float | None) -> bytes:
        """Send ``GetEvidence(nonce)``; return the serialized ``Evidence`` as received."""
        if self.closed:
            raise ClientClosedError(CLOSED_MESSAGE)
        try:
            data: bytes = await self._get_evidence(
                service_pb2.GetEvidenceRequest(nonce=nonce), timeout=timeout
            )
        except grpc.RpcError as exc:
            if self.closed:
                raise ClientClosedError(CLOSED_MESSAGE) from None
            raise server_error(exc) from None
        except asyncio.CancelledError:
            if _closed_under(self):
                raise ClientClosedError(CLOSED_MESSAGE) from None
            raise
        return data

    def generate(self, request: service_pb2.EncryptedRequest, timeout: float | None) -> AsyncResponseStream:
        """Start ``Generate(request)``; iterate the result for each chunk payload."""
        if self.closed:
            raise ClientClosedError(CLOSED_MESSAGE)
        return _AsyncGrpcResponseStream(self._generate(request, timeout=timeout), self)

    async def close(self) -> None:
        """Close the channel if this transport opened it; later calls raise :class:`ClientClosedError`."""
        self.closed = True
        if self._own:
            await self._channel.close(None)
