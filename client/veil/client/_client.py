"""``Client`` and ``AsyncClient``: attested, end-to-end encrypted chat with a Veil enclave.

Both share :class:`_BaseClient` (configuration, the pinned attestation, the
sans-I/O :class:`~veil.client._core.ClientCore`); they differ only in how they do
I/O. On first use a client fetches evidence for a fresh 32-byte nonce, verifies
it against its :class:`~veil.attestation.policy.Policy` and pins the enclave key;
every request is then HPKE-sealed to that key and its answer decrypted chunk by
chunk. A server that restarted (new key) answers ``FAILED_PRECONDITION``: the
client re-attests once, transparently, and resends the request sealed afresh.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload

from veil.attestation.binding import Claims
from veil.attestation.errors import PolicyError
from veil.attestation.policy import Policy
from veil.attestation.verdict import Verdict
from veil.client._core import (
    STALE_KEY_CODE,
    Attestation,
    ClientCore,
    CompletionAccumulator,
    GenerateParams,
    ResponseReader,
    check_messages,
    check_params,
)
from veil.client._transport import (
    AsyncGrpcTransport,
    AsyncResponseStream,
    AsyncTransport,
    GrpcTransport,
    ResponseStream,
    Transport,
)
from veil.client._types import ChatCompletion, ChatCompletionChunk, CompletionUsage
from veil.client.errors import ChannelError, ConfigurationError, ServerError
from veil.proto.v1 import generate_pb2

__all__ = ["AsyncClient", "AsyncStream", "Client", "Stream"]

DEFAULT_TIMEOUT = 120.0
Messages = Iterable[Mapping[str, Any] | Any]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _BaseClient:
    """What the sync and async clients share: configuration and the pinned attestation."""

    def __init__(
        self,
        policy: Policy | None,
        *,
        timeout: float | None,
        clock: Callable[[], datetime] | None,
        random_bytes: Callable[[int], bytes] | None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ConfigurationError("timeout must be positive (or None for no deadline)")
        if policy is None:
            try:
                policy = Policy()
            except PolicyError as exc:
                raise ConfigurationError(f"default policy unusable: {exc}") from exc
        self._core = ClientCore(
            policy,
            clock=clock or _utc_now,
            random_bytes=random_bytes or secrets.token_bytes,
        )
        self.timeout = timeout
        self._attestation: Attestation | None = None

    @property
    def policy(self) -> Policy:
        """The policy evidence is verified against."""
        return self._core.policy

    @property
    def attestation(self) -> Verdict | None:
        """The verdict of the current attestation (every check), or None before the first use."""
        return self._attestation.verdict if self._attestation else None

    @property
    def claims(self) -> Claims | None:
        """What the attested enclave stated about itself (model, policy and build digests)."""
        return self._attestation.claims if self._attestation else None

    @property
    def evidence(self) -> bytes | None:
        """The raw ``Evidence`` bytes of the current attestation, as received."""
        return self._attestation.evidence if self._attestation else None

    def _install(self, attestation: Attestation) -> Attestation:
        self._attestation = attestation
        return attestation

    @staticmethod
    def _write_evidence(path: str | Path, attestation: Attestation) -> Path:
        target = Path(path)
        target.write_bytes(attestation.evidence)
        return target

    @staticmethod
    def _prepare(
        messages: Messages,
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
    ) -> tuple[list[generate_pb2.ChatMessage], GenerateParams]:
        return check_messages(messages), check_params(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop
        )


# --------------------------------------------------------------------------- sync


class Stream:
    """A streamed completion: iterate it for :class:`ChatCompletionChunk` s.

    The request was accepted and its stream header authenticated before this
    object was returned. Iteration raises :class:`ChannelError` if the stream
    ends without its FINAL chunk. ``close()`` (or leaving a ``with`` block)
    cancels the request on the server.
    """

    def __init__(self, call: ResponseStream, payloads: Iterator[bytes], reader: ResponseReader) -> None:
        self._call = call
        self._payloads = payloads
        self._reader = reader
        self._done = False

    @property
    def finish_reason(self) -> str | None:
        """Why generation stopped, once the FINAL chunk arrived."""
        return self._reader.finish_reason

    @property
    def usage(self) -> CompletionUsage | None:
        """Token counts, once the FINAL chunk arrived."""
        return self._reader.usage

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        if self._done:
            return
        try:
            for payload in self._payloads:
                chunk = self._reader.feed(payload)
                if chunk is not None:
                    yield chunk
            self._reader.close()
        except BaseException:
            self._call.cancel()
            raise
        finally:
            self._done = True

    def close(self) -> None:
        """Stop reading and cancel the request on the server."""
        self._done = True
        if not self._reader.finished:
            self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Completions:
    """``client.chat.completions``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @overload
    def create(
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
        stream: Literal[False] = ...,
    ) -> ChatCompletion: ...

    @overload
    def create(
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
        stream: Literal[True],
    ) -> Stream: ...

    def create(
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
        stream: bool = False,
    ) -> ChatCompletion | Stream:
        """Send a chat completion request to the attested enclave.

        ``messages`` is OpenAI-shaped (``[{"role": "user", "content": "..."}]``);
        ``model`` is optional and, when given, must equal the attested model id
        (``"sha256:<weights digest>"``). With ``stream=True`` returns a
        :class:`Stream` of chunks, otherwise a whole :class:`ChatCompletion`.
        Raises :class:`AttestationError`, :class:`ChannelError`,
        :class:`ServerError` / :class:`RequestRejectedError` or
        :class:`ConfigurationError`.
        """
        chat, params = self._client._prepare(
            messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=stop,
        )  # fmt: skip
        result = self._client._start(chat, params, model)
        if stream:
            return result
        accumulator = CompletionAccumulator()
        with result:
            for chunk in result:
                accumulator.add(chunk)
        return accumulator.result(result._reader)


class Chat:
    """``client.chat``."""

    def __init__(self, client: Client) -> None:
        self.completions = Completions(client)


class Client(_BaseClient):
    """Synchronous Veil client.

    ``target`` is ``host:port`` (or ``grpcs://host:port``). ``policy`` decides
    which evidence is trusted (default: hardware TEEs under the vendor roots
    shipped in the package; never the simulator). ``transport``, ``clock`` and
    ``random_bytes`` are injectable for tests. Thread-safe: one client may serve
    many threads.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        policy: Policy | None = None,
        transport: Transport | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        super().__init__(policy, timeout=timeout, clock=clock, random_bytes=random_bytes)
        if transport is None:
            if target is None:
                raise ConfigurationError("Client needs a target (host:port) or a transport")
            transport = GrpcTransport(target)
        self._transport = transport
        self._lock = threading.Lock()
        self.chat = Chat(self)

    def attest(self) -> Verdict:
        """Fetch fresh evidence now, verify it and pin the enclave key; returns the verdict."""
        with self._lock:
            return self._attest_locked().verdict

    def save_evidence(self, path: str | Path) -> Path:
        """Write the raw evidence of the current attestation (attesting first if needed) to ``path``."""
        return self._write_evidence(path, self._ensure())

    def close(self) -> None:
        """Close the transport."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _attest_locked(self) -> Attestation:
        nonce = self._core.new_nonce()
        evidence = self._transport.get_evidence(nonce, self.timeout)
        return self._install(self._core.accept(evidence, nonce))

    def _ensure(self) -> Attestation:
        current = self._attestation
        if current is not None:
            return current
        with self._lock:
            return self._attestation or self._attest_locked()

    def _reattest(self, stale: Attestation) -> Attestation:
        with self._lock:
            if self._attestation is not None and self._attestation is not stale:
                return self._attestation  # another thread already re-attested
            return self._attest_locked()

    def _start(
        self, chat: list[generate_pb2.ChatMessage], params: GenerateParams, model: str | None
    ) -> Stream:
        attestation = self._ensure()
        for attempt in range(2):
            self._core.check_model(model, attestation)
            sealed, reader = self._core.seal(attestation, chat, params)
            call = self._transport.generate(sealed, self.timeout)
            try:
                payloads = iter(call)
                header = next(payloads)
            except StopIteration:
                raise ChannelError("response stream ended before its header") from None
            except ServerError as exc:
                if exc.code == STALE_KEY_CODE and attempt == 0:
                    attestation = self._reattest(attestation)
                    continue
                raise
            try:
                reader.feed(header)
            except BaseException:
                call.cancel()
                raise
            return Stream(call, payloads, reader)
        raise ServerError(STALE_KEY_CODE, "enclave key still stale after re-attesting")  # pragma: no cover


# -------------------------------------------------------------------------- async


class AsyncStream:
    """A streamed completion: ``async for`` it for :class:`ChatCompletionChunk` s."""

    def __init__(
        self, call: AsyncResponseStream, payloads: AsyncIterator[bytes], reader: ResponseReader
    ) -> None:
        self._call = call
        self._payloads = payloads
        self._reader = reader
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
                chunk = self._reader.feed(payload)
                if chunk is not None:
                    yield chunk
            self._reader.close()
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
        stream: bool = False,
    ) -> ChatCompletion | AsyncStream:
        """Send a chat completion request; the async twin of :meth:`Completions.create`."""
        chat, params = self._client._prepare(
            messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=stop,
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
    ) -> None:
        super().__init__(policy, timeout=timeout, clock=clock, random_bytes=random_bytes)
        if transport is None:
            if target is None:
                raise ConfigurationError("AsyncClient needs a target (host:port) or a transport")
            transport = AsyncGrpcTransport(target)
        self._transport = transport
        self._lock: asyncio.Lock | None = None
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
        """Close the transport."""
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _attest_locked(self) -> Attestation:
        nonce = self._core.new_nonce()
        evidence = await self._transport.get_evidence(nonce, self.timeout)
        return self._install(self._core.accept(evidence, nonce))

    async def _ensure(self) -> Attestation:
        current = self._attestation
        if current is not None:
            return current
        async with self._get_lock():
            return self._attestation or await self._attest_locked()

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
                raise ChannelError("response stream ended before its header") from None
            except ServerError as exc:
                if exc.code == STALE_KEY_CODE and attempt == 0:
                    attestation = await self._reattest(attestation)
                    continue
                raise
            try:
                reader.feed(header)
            except BaseException:
                call.cancel()
                raise
            return AsyncStream(call, payloads, reader)
        raise ServerError(STALE_KEY_CODE, "enclave key still stale after re-attesting")  # pragma: no cover
