"""``Client``: attested, end-to-end encrypted chat with a Veil enclave.

``Client`` (here) and ``AsyncClient`` (``_async_client``) share
:class:`~veil.client._base._BaseClient` (configuration, the pinned attestation, the
sans-I/O :class:`~veil.client._core.ClientCore`); they differ only in how they do
I/O. On first use a client fetches evidence for a fresh 32-byte nonce, verifies
it against its :class:`~veil.attestation.policy.Policy` and pins the enclave key;
every request is then HPKE-sealed to that key and its answer decrypted chunk by
chunk. A server that restarted (new key) answers ``FAILED_PRECONDITION``: the
client re-attests once, transparently, and resends the request sealed afresh. An
evidence request refused with ``RESOURCE_EXHAUSTED`` is retried once, after the
server's ``retry-after-ms`` hint (at most two seconds). Every other gRPC status is
a :class:`~veil.client.errors.ServerError` carrying its status name; a closed
client raises :class:`~veil.client.errors.ClientClosedError`.

Pinning cannot wander: the first attestation pins the enclave's identity (launch
measurement, server build, model and data-policy digests, platform), and any
re-attestation — after "stale key", or on the first request after the pinned key
is ``key_ttl`` old (default one hour) — must show that same identity, or the
request fails with :class:`~veil.client.errors.AttestationError` naming each change.

Several targets make a pool of replicas (:mod:`veil.client._pool`): each is attested on first
use under the same policy and must show the same identity; a request goes to the replica with
the fewest in flight, and moves to another only when its replica failed before accepting it. A
stream that broke off after it started raises
:class:`~veil.client.errors.StreamInterruptedError` and is never sent again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
from veil.client._transport import GrpcTransport, ResponseStream, Transport
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

__all__ = ["Client", "Stream", "TextStream"]


class Stream:
    """A streamed completion: iterate it for :class:`ChatCompletionChunk` s.

    The request was accepted and its stream header authenticated before this
    object was returned. Iteration raises :class:`ChannelError` if the stream
    ends without its FINAL chunk, and :class:`ClientClosedError` once its client
    was closed. A gRPC status after the stream started raises
    :class:`StreamInterruptedError` (it is never retried elsewhere). ``close()`` (or leaving a
    ``with`` block) cancels the request on the server.
    """

    def __init__(
        self,
        call: ResponseStream,
        payloads: Iterator[bytes],
        reader: ResponseReader,
        client: Client,
        replica: Replica[Transport],
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
            self._client._finished(self._replica)

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
                self._client._check_open()
                chunk = self._reader.feed(payload)
                if chunk is not None:
                    yield chunk
            self._reader.close()
        except Exception as exc:
            self._call.cancel()
            if self._client.closed and not isinstance(exc, ClientClosedError):
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

    def close(self) -> None:
        """Stop reading and cancel the request on the server."""
        self._done = True
        if not self._reader.finished:
            self._call.cancel()
        self._release()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TextStream:
    """A streamed plain-text completion: iterate it for :class:`Completion` pieces.

    The same stream as :class:`Stream` (same errors), seen as text completions.
    """

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    @property
    def finish_reason(self) -> str | None:
        """Why generation stopped, once the FINAL chunk arrived."""
        return self._stream.finish_reason

    @property
    def usage(self) -> CompletionUsage | None:
        """Token counts, once the FINAL chunk arrived."""
        return self._stream.usage

    def __iter__(self) -> Iterator[Completion]:
        for chunk in self._stream:
            yield Completion.from_chunk(chunk)

    def close(self) -> None:
        """Stop reading and cancel the request on the server."""
        self._stream.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TextCompletions:
    """``client.completions``: a plain-text prompt, no chat template."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
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
    ) -> Completion | TextStream:
        """Complete ``prompt`` (one string) as the model continues it, without the chat template.

        Same parameters, errors and routing as :meth:`Completions.create`; returns a whole
        :class:`Completion`, or with ``stream=True`` a :class:`TextStream`.
        """
        text, params = self._client._prepare_prompt(
            prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=stop, stream=stream,
        )  # fmt: skip
        result = self._client._start(text, params, model)
        if stream:
            return TextStream(result)
        return Completion.from_chat(_collect(result))


def _collect(stream: Stream) -> ChatCompletion:
    accumulator = CompletionAccumulator()
    with stream:
        for chunk in stream:
            accumulator.add(chunk)
    return accumulator.result(stream._reader)


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
        response_format: ResponseFormat | None = ...,
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
        response_format: ResponseFormat | None = ...,
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
        response_format: ResponseFormat | None = None,
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
            stop=stop, stream=stream, response_format=response_format,
        )  # fmt: skip
        result = self._client._start(chat, params, model)
        if stream:
            return result
        return _collect(result)


class Chat:
    """``client.chat``."""

    def __init__(self, client: Client) -> None:
        self.completions = Completions(client)


class Client(_BaseClient):
    """Synchronous Veil client.

    ``target`` is ``host:port`` (or ``grpcs://host:port``), or a list of them: a pool of
    replicas of one release. ``policy`` decides which evidence is trusted (default: hardware
    TEEs under the vendor roots shipped in the package; never the simulator). Each replica is
    attested on first use; the first good one pins the identity every other replica and every
    re-attestation must show. The key is used for ``key_ttl`` (a ``timedelta`` or seconds;
    default one hour). ``transport`` (one or a list), ``clock`` and ``random_bytes`` are
    injectable for tests.
    ``tenant``: the enclave's prompt (KV prefix) cache is shared only among requests
    sealed with the same tenant secret. By default each client instance has a random
    one of its own, so a conversation's next turn reuses the cached earlier turns and
    no other instance can; pass the same ``tenant`` secret (at least 16 bytes, e.g.
    ``secrets.token_hex(16)``) to several instances (or replicas) to let them share.
    Thread-safe: one client may serve many threads.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        policy: Policy | None = None,
        transport: Transport | Sequence[Transport] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        key_ttl: timedelta | float | int = DEFAULT_KEY_TTL,
        tenant: str | bytes | None = None,
    ) -> None:
        super().__init__(
            policy, timeout=timeout, clock=clock, random_bytes=random_bytes, key_ttl=key_ttl, tenant=tenant
        )
        self._pool: ReplicaPool[Transport] = ReplicaPool(replica_targets(target, transport, GrpcTransport))
        self._lock = threading.Lock()  # the pool's state and the pinned identity
        self._attest_locks = [threading.Lock() for _ in self._pool.replicas]  # one attestation per replica
        self._sleep: Callable[[float], None] = time.sleep
        self.chat = Chat(self)
        self.completions = TextCompletions(self)

    def attest(self) -> Verdict:
        """Fetch fresh evidence now, verify it and pin the enclave key; returns the verdict.

        With several targets every replica is attested; one whose evidence fails is refused
        (see :attr:`replicas`) and the verdict of the first good one is returned. Raises when none is good.
        """
        self._check_open()
        failures: list[VeilClientError] = []
        first: Attestation | None = None
        for replica in self._pool.replicas:
            try:
                with self._attest_locks[replica.index]:
                    attestation = self._attest_locked(replica)
            except VeilClientError as exc:
                with self._lock:
                    if not self._failed(replica, exc, attesting=True, release=False):
                        raise
                failures.append(exc)
                continue
            first = first or attestation
        if first is None:
            raise self._pool_error(failures)
        return first.verdict

    def ensure_attested(self) -> tuple[ReplicaStatus, ...]:
        """Attest every replica that has no fresh key and is not backed off; returns :attr:`replicas`.

        Failures are recorded per replica, never raised (``GET /veil/attestation`` of ``veil proxy``).
        """
        for replica in self._pool.replicas:
            if self._fresh(replica) is not None or self._pool.status(replica).retry_in_s > 0:
                continue
            try:
                self._ensure(replica)
            except VeilClientError as exc:
                with self._lock:
                    if not self._failed(replica, exc, attesting=True, release=False):
                        raise
        return self.replicas

    def save_evidence(self, path: str | Path) -> Path:
        """Write the raw evidence of the current attestation (attesting first if needed) to ``path``."""
        attestation = self._attestation
        if attestation is None or self._core.expired(attestation):
            self.attest()
        return self._write_evidence(path, self._current())

    def close(self) -> None:
        """Close every transport; open streams and later calls raise :class:`ClientClosedError`."""
        self._closed = True
        for replica in self._pool.replicas:
            replica.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _attest_locked(self, replica: Replica[Transport]) -> Attestation:
        self._check_open()
        transport = replica.transport
        nonce = self._core.new_nonce()
        try:
            evidence = transport.get_evidence(nonce, self.timeout)
        except ServerError as exc:
            delay = evidence_backoff(exc)
            if delay is None:
                raise
            self._sleep(delay)
            self._check_open()
            nonce = self._core.new_nonce()
            evidence = transport.get_evidence(nonce, self.timeout)
        with self._lock:
            return self._install(replica, self._core.accept(evidence, nonce))

    def _ensure(self, replica: Replica[Transport]) -> Attestation:
        self._check_open()
        current = self._fresh(replica)
        if current is not None:
            return current
        with self._attest_locks[replica.index]:
            return self._fresh(replica) or self._attest_locked(replica)

    def _reattest(self, replica: Replica[Transport], stale: Attestation) -> Attestation:
        with self._attest_locks[replica.index]:
            if replica.attestation is not None and replica.attestation is not stale:
                return replica.attestation  # another thread already re-attested
            return self._attest_locked(replica)

    def _finished(self, replica: Replica[Transport]) -> None:
        with self._lock:
            self._pool.release(replica)

    def _interrupted(self, replica: Replica[Transport], exc: ServerError) -> StreamInterruptedError:
        with self._lock:
            if exc.code == "UNAVAILABLE":
                self._pool.failed(replica, exc)
        return StreamInterruptedError(exc.code, exc.message, target=replica.target)

    def _start(
        self, chat: list[generate_pb2.ChatMessage] | str, params: GenerateParams, model: str | None
    ) -> Stream:
        tried: set[int] = set()
        failures: list[VeilClientError] = []
        while True:
            self._check_open()
            with self._lock:
                replica = self._pool.pick(tried)
            if replica is None:
                raise self._pool_error(failures)
            tried.add(replica.index)
            attesting = True
            try:
                attestation = self._ensure(replica)
                attesting = False
                return self._start_on(replica, attestation, chat, params, model)
            except VeilClientError as exc:
                with self._lock:
                    if not self._failed(replica, exc, attesting=attesting):
                        raise
                failures.append(exc)
            except BaseException:
                self._finished(replica)
                raise

    def _start_on(
        self,
        replica: Replica[Transport],
        attestation: Attestation,
        chat: list[generate_pb2.ChatMessage] | str,
        params: GenerateParams,
        model: str | None,
    ) -> Stream:
        for attempt in range(2):
            self._core.check_model(model, attestation)
            sealed, reader = self._core.seal(attestation, chat, params)
            call = replica.transport.generate(sealed, self.timeout)
            try:
                payloads = iter(call)
                header = next(payloads)
            except StopIteration:
                self._check_open()
                raise ChannelError("response stream ended before its header") from None
            except ServerError as exc:
                self._check_open()
                if exc.code == STALE_KEY_CODE and attempt == 0:
                    attestation = self._reattest(replica, attestation)
                    continue
                raise
            try:
                reader.feed(header)
            except BaseException:
                call.cancel()
                raise
            with self._lock:
                self._pool.succeeded(replica)
            return Stream(call, payloads, reader, self, replica)
        raise ServerError(STALE_KEY_CODE, "enclave key still stale after re-attesting")  # pragma: no cover
