"""``AsyncClient``: the asyncio (``grpc.aio``) twin of :class:`~veil.client.Client`.

Same configuration, same sans-I/O core (so the same key-pinning rule), same reliability:
gRPC statuses keep their names (``grpc.aio`` errors included), a restarted server
(``FAILED_PRECONDITION``) is re-attested once, transparently, an evidence request refused
with ``RESOURCE_EXHAUSTED`` is retried once, and closing the client ends its open streams
with :class:`~veil.client.errors.ClientClosedError`, never a bare ``CancelledError``.
Only the I/O is async.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Literal, overload

from veil.attestation.policy import Policy
from veil.attestation.verdict import Verdict
from veil.client._base import CLOSED_MESSAGE, DEFAULT_TIMEOUT, Messages, _BaseClient, evidence_backoff
from veil.client._core import (
    DEFAULT_KEY_TTL,
    STALE_KEY_CODE,
    Attestation,
    CompletionAccumulator,
    GenerateParams,
    ResponseReader,
)
from veil.client._response_format import ResponseFormat
from veil.client._transport import AsyncGrpcTransport, AsyncResponseStream, AsyncTransport
from veil.client._types import ChatCompletion, ChatCompletionChunk, CompletionUsage
from veil.client.errors import ChannelError, ClientClosedError, ConfigurationError, ServerError
from veil.proto.v1 import generate_pb2

__all__ = ["AsyncClient", "AsyncStream"]


class AsyncStream:
    """A streamed completion: ``async for`` it for :class:`ChatCompletionChunk` s.

    Raises :class:`ChannelError` if the stream ends without its FINAL chunk, and
    :class:`ClientClosedError` once its client was closed.
    """

    def __init__(
        self,
        call: AsyncResponseStream,
        payloads: AsyncIterator[bytes],
        reader: ResponseReader,
        client: AsyncClient,
    ) -> None:
        self._call = call
        self._payloads = payloads
        self._reader = reader
        self._client = client
        self._done = False

    @property
    def finish_reason(self) -> str | None:
        """Why generation stopped, once the FINAL chunk arrived."""
        return self._reader.finish_reason

    @property
    def usage(self) -> CompletionUsage | None:
        """Token counts, once the FINAL chunk arrived."""
        return self._reader.usage

    async def _iterate(self) -> AsyncIterator[ChatCompletionChunk]:
        if self._done:
            return
        try:
            async for payload in self._payloads:
                self._client._check_open()
                chunk = self._reader.feed(payload)
                if chunk is not None:
                    yield chunk
            self._reader.close()
        except (Exception, asyncio.CancelledError) as exc:
            self._call.cancel()
            if _closed_under(self._client) and not isinstance(exc, ClientClosedError):
                raise ClientClosedError(CLOSED_MESSAGE) from exc
            raise
        except BaseException:
            self._call.cancel()
            raise
        finally:
            self._done = True

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._iterate()

    async def close(self) -> None:
        """Stop reading and cancel the request on the server."""
        self._done = True
        if not self._reader.finished:
            self._call.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _closed_under(client: AsyncClient) -> bool:
    """True when an error came from closing ``client``, not from cancelling the running task."""
    task = asyncio.current_task()
    return client.closed and (task is None or task.cancelling() == 0)


class AsyncCompletions:
    """``async_client.chat.completions``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @overload
    async def create(
        self,
        *,
        messages: Messages,
        model: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        top_k: int | None = ...,
        seed: int | None = ...,
        stop: str | Sequence[str] | None = ...,
        response_format: ResponseFormat | None = ...,
        stream: Literal[False] = ...,
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self,
        *,
        messages: Messages,
        model: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        top_k: int | None = ...,
        seed: int | None = ...,
        stop: str | Sequence[str] | None = ...,
        response_format: ResponseFormat | None = ...,
        stream: Literal[True],
    ) -> AsyncStream: ...

    async def create(
        self,
        *,
        messages: Messages,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        response_format: ResponseFormat | None = None,
        stream: bool = False,
    ) -> ChatCompletion | AsyncStream:
        """Send a chat completion request; the async twin of :meth:`Completions.create`."""
        chat, params = self._client._prepare(
            messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=stop, stream=stream, response_format=response_format,
        )  # fmt: skip
        result = await self._client._start(chat, params, model)
        if stream:
            return result
        accumulator = CompletionAccumulator()
        async with result:
            async for chunk in result:
                accumulator.add(chunk)
        return accumulator.result(result._reader)


class AsyncChat:
    """``async_client.chat``."""

    def __init__(self, client: AsyncClient) -> None:
        self.completions = AsyncCompletions(client)


class AsyncClient(_BaseClient):
    """Asynchronous Veil client (asyncio, ``grpc.aio``); same arguments as :class:`Client`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        policy: Policy | None = None,
        transport: AsyncTransport | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        key_ttl: timedelta | float | int = DEFAULT_KEY_TTL,
    ) -> None:
        super().__init__(policy, timeout=timeout, clock=clock, random_bytes=random_bytes, key_ttl=key_ttl)
        if transport is None:
            if target is None:
                raise ConfigurationError("AsyncClient needs a target (host:port) or a transport")
            transport = AsyncGrpcTransport(target)
        self._transport = transport
        self._lock: asyncio.Lock | None = None
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.chat = AsyncChat(self)

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def attest(self) -> Verdict:
        """Fetch fresh evidence now, verify it and pin the enclave key; returns the verdict."""
        async with self._get_lock():
            return (await self._attest_locked()).verdict

    async def save_evidence(self, path: str | Path) -> Path:
        """Write the raw evidence of the current attestation (attesting first if needed) to ``path``."""
        return self._write_evidence(path, await self._ensure())

    async def close(self) -> None:
        """Close the transport; open streams and later calls raise :class:`ClientClosedError`."""
        self._closed = True
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _attest_locked(self) -> Attestation:
        self._check_open()
        nonce = self._core.new_nonce()
        try:
            evidence = await self._transport.get_evidence(nonce, self.timeout)
        except ServerError as exc:
            delay = evidence_backoff(exc)
            if delay is None:
                raise
            await self._sleep(delay)
            self._check_open()
            nonce = self._core.new_nonce()
            evidence = await self._transport.get_evidence(nonce, self.timeout)
        return self._install(self._core.accept(evidence, nonce))

    async def _ensure(self) -> Attestation:
        self._check_open()
        current = self._fresh()
        if current is not None:
            return current
        async with self._get_lock():
            return self._fresh() or await self._attest_locked()

    async def _reattest(self, stale: Attestation) -> Attestation:
        async with self._get_lock():
            if self._attestation is not None and self._attestation is not stale:
                return self._attestation
            return await self._attest_locked()

    async def _start(
        self, chat: list[generate_pb2.ChatMessage], params: GenerateParams, model: str | None
    ) -> AsyncStream:
        attestation = await self._ensure()
        for attempt in range(2):
            self._core.check_model(model, attestation)
            sealed, reader = self._core.seal(attestation, chat, params)
            call = self._transport.generate(sealed, self.timeout)
            try:
                payloads = aiter(call)
                header = await anext(payloads)
            except StopAsyncIteration:
                self._check_open()
                raise ChannelError("response stream ended before its header") from None
            except ServerError as exc:
                self._check_open()
                if exc.code == STALE_KEY_CODE and attempt == 0:
                    attestation = await self._reattest(attestation)
                    continue
                raise
            try:
                reader.feed(header)
            except BaseException:
                call.cancel()
                raise
            return AsyncStream(call, payloads, reader, self)
        raise ServerError(STALE_KEY_CODE, "enclave key still stale after re-attesting")  # pragma: no cover
