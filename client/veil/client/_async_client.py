"""``AsyncClient``: the asyncio (``grpc.aio``) twin of :class:`~veil.client.Client`.

Same configuration, same sans-I/O core (so the same key-pinning rule), same reliability:
gRPC statuses keep their names (``grpc.aio`` errors included), a restarted server
(``FAILED_PRECONDITION``) is re-attested once, transparently, an evidence request refused
with ``RESOURCE_EXHAUSTED`` is retried once, and closing the client ends its open streams
with :class:`~veil.client.errors.ClientClosedError`, never a bare ``CancelledError``.
Several targets make the same replica pool (:mod:`veil.client._pool`). Only the I/O is async;
the pool's state is touched only from the client's event loop, between awaits.
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
from veil.client._base import (
    CLOSED_MESSAGE,
    DEFAULT_TIMEOUT,
    Messages,
    _BaseClient,
    evidence_backoff,
    replica_targets,
)
from veil.client._core import (
    DEFAULT_KEY_TTL,
    STALE_KEY_CODE,
    Attestation,
    CompletionAccumulator,
    GenerateParams,
    ResponseReader,
)
from veil.client._pool import Replica, ReplicaPool, ReplicaStatus
from veil.client._response_format import ResponseFormat
from veil.client._transport import AsyncGrpcTransport, AsyncResponseStream, AsyncTransport
from veil.client._types import ChatCompletion, ChatCompletionChunk, Completion, CompletionUsage
from veil.client.errors import (
    ChannelError,
    ClientClosedError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
    VeilClientError,
)
from veil.proto.v1 import generate_pb2

__all__ = ["AsyncClient", "AsyncStream", "AsyncTextStream"]


class AsyncStream:
    """A streamed completion: ``async for`` it for :class:`ChatCompletionChunk` s.

    Raises :class:`ChannelError` if the stream ends without its FINAL chunk,
    :class:`StreamInterruptedError` on a gRPC status after it started (never retried
    elsewhere), and :class:`ClientClosedError` once its client was closed.
    """

    def __init__(
        self,
        call: AsyncResponseStream,
        payloads: AsyncIterator[bytes],
        reader: ResponseReader,
        client: AsyncClient,
        replica: Replica[AsyncTransport],
    ) -> None:
        self._call = call
        self._payloads = payloads
        self._reader = reader
        self._client = client
        self._replica = replica
        self._done = False
        self._released = False

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._client._pool.release(self._replica)

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
            if isinstance(exc, ServerError) and not isinstance(exc, RequestRejectedError):
                raise self._client._interrupted(self._replica, exc) from exc
            raise
        except BaseException:
            self._call.cancel()
            raise
        finally:
            self._done = True
            self._release()

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._iterate()

    async def close(self) -> None:
        """Stop reading and cancel the request on the server."""
        self._done = True
        if not self._reader.finished:
            self._call.cancel()
        self._release()

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


class AsyncTextStream:
    """A streamed plain-text completion: ``async for`` it for :class:`Completion` pieces."""

    def __init__(self, stream: AsyncStream) -> None:
        self._stream = stream

    @property
    def finish_reason(self) -> str | None:
        """Why generation stopped, once the FINAL chunk arrived."""
        return self._stream.finish_reason

    @property
    def usage(self) -> CompletionUsage | None:
        """Token counts, once the FINAL chunk arrived."""
        return self._stream.usage

    async def _iterate(self) -> AsyncIterator[Completion]:
        async for chunk in self._stream:
            yield Completion.from_chunk(chunk)

    def __aiter__(self) -> AsyncIterator[Completion]:
        return self._iterate()

    async def close(self) -> None:
        """Stop reading and cancel the request on the server."""
        await self._stream.close()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncTextCompletions:
    """``async_client.completions``: a plain-text prompt, no chat template."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        *,
        prompt: str | Sequence[str],
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> Completion | AsyncTextStream:
        """The async twin of :meth:`veil.client.Client.completions.create <TextCompletions.create>`."""
        text, params = self._client._prepare_prompt(
            prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=stop, stream=stream,
        )  # fmt: skip
        result = await self._client._start(text, params, model)
        if stream:
            return AsyncTextStream(result)
        return Completion.from_chat(await _collect(result))


async def _collect(stream: AsyncStream) -> ChatCompletion:
    accumulator = CompletionAccumulator()
    async with stream:
        async for chunk in stream:
            accumulator.add(chunk)
    return accumulator.result(stream._reader)


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
        return await _collect(result)


class AsyncChat:
    """``async_client.chat``."""

    def __init__(self, client: AsyncClient) -> None:
        self.completions = AsyncCompletions(client)


class AsyncClient(_BaseClient):
    """Asynchronous Veil client (asyncio, ``grpc.aio``); same arguments as :class:`Client`.

    ``target`` may be a list of replicas (see :class:`Client`). Use it from one event loop.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        policy: Policy | None = None,
        transport: AsyncTransport | Sequence[AsyncTransport] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        key_ttl: timedelta | float | int = DEFAULT_KEY_TTL,
        tenant: str | bytes | None = None,
    ) -> None:
        super().__init__(
            policy, timeout=timeout, clock=clock, random_bytes=random_bytes, key_ttl=key_ttl, tenant=tenant
        )
        self._pool: ReplicaPool[AsyncTransport] = ReplicaPool(
            replica_targets(target, transport, AsyncGrpcTransport)
        )
        self._locks: dict[int, asyncio.Lock] = {}
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.chat = AsyncChat(self)
        self.completions = AsyncTextCompletions(self)

    def _get_lock(self, replica: Replica[AsyncTransport]) -> asyncio.Lock:
        lock = self._locks.get(replica.index)
        if lock is None:
            lock = self._locks[replica.index] = asyncio.Lock()
        return lock

    async def attest(self) -> Verdict:
        """Fetch fresh evidence now, verify it and pin the enclave key; returns the verdict.

        With several targets every replica is attested (concurrently); see :meth:`Client.attest`.
        """
        self._check_open()
        replicas = self._pool.replicas

        async def one(replica: Replica[AsyncTransport]) -> Attestation:
            async with self._get_lock(replica):
                return await self._attest_locked(replica)

        results = await asyncio.gather(*(one(r) for r in replicas), return_exceptions=True)
        failures: list[VeilClientError] = []
        first: Attestation | None = None
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, Attestation):
                first = first or result
                continue
            if not isinstance(result, VeilClientError):
                raise result
            if not self._failed(replica, result, attesting=True, release=False):
                raise result
            failures.append(result)
        if first is None:
            raise self._pool_error(failures)
        return first.verdict

    async def ensure_attested(self) -> tuple[ReplicaStatus, ...]:
        """Attest every replica that has no fresh key and is not backed off; returns :attr:`replicas`.

        Failures are recorded per replica, never raised (``GET /veil/attestation`` of ``veil proxy``).
        """
        due = [
            r for r in self._pool.replicas if self._fresh(r) is None and self._pool.status(r).retry_in_s <= 0
        ]
        results = await asyncio.gather(*(self._ensure(r) for r in due), return_exceptions=True)
        for replica, result in zip(due, results, strict=True):
            if isinstance(result, VeilClientError):
                if not self._failed(replica, result, attesting=True, release=False):
                    raise result
            elif isinstance(result, BaseException):
                raise result
        return self.replicas

    async def save_evidence(self, path: str | Path) -> Path:
        """Write the raw evidence of the current attestation (attesting first if needed) to ``path``."""
        attestation = self._attestation
        if attestation is None or self._core.expired(attestation):
            await self.attest()
        return self._write_evidence(path, self._current())

    async def close(self) -> None:
        """Close every transport; open streams and later calls raise :class:`ClientClosedError`."""
        self._closed = True
        for replica in self._pool.replicas:
            await replica.transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _attest_locked(self, replica: Replica[AsyncTransport]) -> Attestation:
        self._check_open()
        transport = replica.transport
        nonce = self._core.new_nonce()
        try:
            evidence = await transport.get_evidence(nonce, self.timeout)
        except ServerError as exc:
            delay = evidence_backoff(exc)
            if delay is None:
                raise
            await self._sleep(delay)
            self._check_open()
            nonce = self._core.new_nonce()
            evidence = await transport.get_evidence(nonce, self.timeout)
        return self._install(replica, self._core.accept(evidence, nonce))

    async def _ensure(self, replica: Replica[AsyncTransport]) -> Attestation:
        self._check_open()
        current = self._fresh(replica)
        if current is not None:
            return current
        async with self._get_lock(replica):
            return self._fresh(replica) or await self._attest_locked(replica)

    async def _reattest(self, replica: Replica[AsyncTransport], stale: Attestation) -> Attestation:
        async with self._get_lock(replica):
            if replica.attestation is not None and replica.attestation is not stale:
                return replica.attestation
            return await self._attest_locked(replica)

    def _interrupted(self, replica: Replica[AsyncTransport], exc: ServerError) -> StreamInterruptedError:
        if exc.code == "UNAVAILABLE":
            self._pool.failed(replica, exc)
        return StreamInterruptedError(exc.code, exc.message, target=replica.target)

    async def _start(
        self, chat: list[generate_pb2.ChatMessage] | str, params: GenerateParams, model: str | None
    ) -> AsyncStream:
        tried: set[int] = set()
        failures: list[VeilClientError] = []
        while True:
            self._check_open()
            replica = self._pool.pick(tried)
            if replica is None:
                raise self._pool_error(failures)
            tried.add(replica.index)
            attesting = True
            try:
                attestation = await self._ensure(replica)
                attesting = False
                return await self._start_on(replica, attestation, chat, params, model)
            except VeilClientError as exc:
                if not self._failed(replica, exc, attesting=attesting):
                    raise
                failures.append(exc)
            except BaseException:
                self._pool.release(replica)
                raise

    async def _start_on(
        self,
        replica: Replica[AsyncTransport],
        attestation: Attestation,
        chat: list[generate_pb2.ChatMessage] | str,
        params: GenerateParams,
        model: str | None,
    ) -> AsyncStream:
        for attempt in range(2):
            self._core.check_model(model, attestation)
            sealed, reader = self._core.seal(attestation, chat, params)
            call = replica.transport.generate(sealed, self.timeout)
            try:
                payloads = aiter(call)
                header = await anext(payloads)
            except StopAsyncIteration:
                self._check_open()
                raise ChannelError("response stream ended before its header") from None
            except ServerError as exc:
                self._check_open()
                if exc.code == STALE_KEY_CODE and attempt == 0:
                    attestation = await self._reattest(replica, attestation)
                    continue
                raise
            try:
                reader.feed(header)
            except BaseException:
                call.cancel()
                raise
            self._pool.succeeded(replica)
            return AsyncStream(call, payloads, reader, self, replica)
        raise ServerError(STALE_KEY_CODE, "enclave key still stale after re-attesting")  # pragma: no cover
