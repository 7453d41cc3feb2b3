"""What a connection can cost the server before any Veil code runs: the transport guard.

:class:`TransportGuard` is a ``grpc.aio`` server interceptor around every method. For each
call, before the servicer sees it:

1. **Calls per peer and in total** (:class:`~veil.enclave.admission.CallGate`): a peer (the
   remote address, :func:`~veil.enclave.admission.peer_key`) holds at most
   ``max_calls_per_peer`` calls at once; all peers together at most ``max_calls``, health
   checks excepted, so ``grpc.health.v1.Health/Check`` answers however loaded the server is.
   Both refusals are RESOURCE_EXHAUSTED with a ``retry-after-ms`` hint. The gRPC server's own
   ``maximum_concurrent_rpcs`` is not used: it refuses every method, health included, with
   gRPC's own text, and counts calls that never sent their request.
2. **A deadline for the request message.** Every unary-request method is served as a
   streaming-request one, so the handler runs as soon as the call's headers arrive, and reads
   the one request message within ``request_timeout_s``; a call that never sends it (a
   half-open stream) or sends it too slowly ends with DEADLINE_EXCEEDED and frees its slot.
3. **Requests parsed here, never by gRPC.** The deserializer never raises into gRPC (which
   would answer UNKNOWN with the exception's text): a request over its method's size limit is
   RESOURCE_EXHAUSTED, one that does not parse INVALID_ARGUMENT, each with a fixed string. The
   gRPC transport limit (``grpc.max_receive_message_length``, set by the server to
   :data:`TRANSPORT_MAX_RECEIVE_BYTES`) sits above every method's limit, so only a request over
   it is refused with gRPC's own text.
4. **Unknown methods** get UNIMPLEMENTED with a fixed string.

Per connection, HTTP/2 itself limits concurrent streams (``grpc.max_concurrent_streams``, set in
:mod:`veil.enclave.server`).
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from veil.enclave.admission import CallGate, peer_key, retry_after_ms

__all__ = [
    "MALFORMED_REQUEST_MESSAGE",
    "PEER_BUSY_MESSAGE",
    "REQUEST_TIMEOUT_MESSAGE",
    "REQUEST_TOO_LARGE_MESSAGE",
    "RETRY_AFTER_KEY",
    "SERVER_BUSY_MESSAGE",
    "TRANSPORT_MAX_RECEIVE_BYTES",
    "UNKNOWN_METHOD_MESSAGE",
    "TransportGuard",
    "TransportLimits",
    "refuse",
]

RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a RESOURCE_EXHAUSTED worth retrying
MALFORMED_REQUEST_MESSAGE = "malformed request"
REQUEST_TOO_LARGE_MESSAGE = "request too large"
REQUEST_TIMEOUT_MESSAGE = "request not received in time"
PEER_BUSY_MESSAGE = "too many calls from this peer; retry later"
SERVER_BUSY_MESSAGE = "server at capacity; retry later"
UNKNOWN_METHOD_MESSAGE = "unknown method"
# gRPC's own limit; every method's limit (TransportLimits) is below it.
TRANSPORT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024
BUSY_RETRY_S = 1.0
# what ServicerContext.read returns once the client half-closed (grpc-stubs do not declare it)
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Limits the guard applies; ``max_request_bytes`` maps full method names to sizes."""

    max_calls_per_peer: int = 128
    max_calls: int = 320
    request_timeout_s: float = 10.0
    default_max_request_bytes: int = 4096
    max_request_bytes: Mapping[str, int] = field(default_factory=dict)
    uncounted: frozenset[str] = HEALTH_METHODS  # held to the per-peer cap only


async def refuse(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    *,
    retry_after_s: float | None = None,
) -> NoReturn:
    """End the call with ``code`` and a fixed ``message`` (+ a ``retry-after-ms`` hint)."""
    trailing: tuple[tuple[str, str], ...] = ()
    if retry_after_s is not None:
        trailing = ((RETRY_AFTER_KEY, str(retry_after_ms(retry_after_s))),)
    await context.abort(code, message, trailing_metadata=trailing)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class _Refused:
    """What the deserializer returns instead of raising into gRPC."""

    code: grpc.StatusCode
    message: str


_TOO_LARGE = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, REQUEST_TOO_LARGE_MESSAGE)
_MALFORMED = _Refused(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_REQUEST_MESSAGE)


def _safe_deserializer(parse: Callable[[bytes], Any] | None, max_bytes: int) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        if len(raw) > max_bytes:
            return _TOO_LARGE
        if parse is None:
            return raw
        try:
            return parse(raw)
        except Exception:  # DecodeError or anything a parser raises: never gRPC's text
            return _MALFORMED

    return deserialize


async def _unknown_method(
    _requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    await refuse(context, grpc.StatusCode.UNIMPLEMENTED, UNKNOWN_METHOD_MESSAGE)


_UNKNOWN = grpc.stream_stream_rpc_method_handler(_unknown_method)


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


class TransportGuard(_Interceptor):
    """The interceptor described in the module docstring; ``refusals`` counts by reason."""

    def __init__(self, limits: TransportLimits) -> None:
        self.limits = limits
        self.gate = CallGate(limits.max_calls_per_peer, limits.max_calls)
        self.refusals: Counter[str] = Counter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            self.refusals["unknown_method"] += 1
            return _UNKNOWN
        if handler.request_streaming:  # Veil serves none; nothing to read up front
            return handler
        method = handler_call_details.method
        return self._wrap(handler, method)

    def _wrap(self, handler: _Handler, method: str) -> _Handler:
        limits = self.limits
        deserialize = _safe_deserializer(
            handler.request_deserializer,
            limits.max_request_bytes.get(method, limits.default_max_request_bytes),
        )
        counted = method not in limits.uncounted
        serialize = handler.response_serializer
        # grpc-stubs type the behaviours as synchronous; under grpc.aio they are coroutines
        if not handler.response_streaming:
            unary: Any = handler.unary_unary

            async def unary_behavior(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                peer = await self._enter(context, counted)
                try:
                    return await unary(await self._read(context), context)
                finally:
                    self.gate.leave(peer, counted=counted)

            return grpc.stream_unary_rpc_method_handler(unary_behavior, deserialize, serialize)

        streaming: Any = handler.unary_stream
        if inspect.isasyncgenfunction(streaming):

            async def stream_behavior(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                peer = await self._enter(context, counted)
                try:
                    async for response in streaming(await self._read(context), context):
                        yield response
                finally:
                    self.gate.leave(peer, counted=counted)

            return grpc.stream_stream_rpc_method_handler(stream_behavior, deserialize, serialize)

        async def writer_behavior(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            # a handler that answers with context.write (health Watch)
            peer = await self._enter(context, counted)
            try:
                await streaming(await self._read(context), context)
            finally:
                self.gate.leave(peer, counted=counted)

        return grpc.stream_stream_rpc_method_handler(writer_behavior, deserialize, serialize)

    async def _enter(self, context: grpc.aio.ServicerContext[Any, Any], counted: bool) -> str:
        peer = peer_key(context.peer())
        refused = self.gate.enter(peer, counted=counted)
        if refused is not None:
            self.refusals[f"calls_{refused}"] += 1
            message = PEER_BUSY_MESSAGE if refused == CallGate.PEER else SERVER_BUSY_MESSAGE
            await refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s=BUSY_RETRY_S)
        return peer

    async def _read(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = await asyncio.wait_for(context.read(), self.limits.request_timeout_s)
        except TimeoutError:
            self.refusals["request_timeout"] += 1
            await refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED, REQUEST_TIMEOUT_MESSAGE)
        if request is _EOF:  # half-closed without a request
            request = _MALFORMED
        if isinstance(request, _Refused):
            self.refusals["too_large" if request is _TOO_LARGE else "malformed"] += 1
            await refuse(context, request.code, request.message)
        return request
