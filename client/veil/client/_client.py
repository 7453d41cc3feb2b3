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
from veil.client._transport import GrpcTransport, ResponseStream, Transport
from veil.client._types import ChatCompletion, ChatCompletionChunk, CompletionUsage
from veil.client.errors import ChannelError, ClientClosedError, ConfigurationError, ServerError
from veil.proto.v1 import generate_pb2

__all__ = ["Client", "Stream"]


class Stream:
    """A streamed completion: iterate it for :class:`ChatCompletionChunk` s.

    The request was accepted and its stream header authenticated before this
    object was returned. Iteration raises :class:`ChannelError` if the stream
    ends without its FINAL chunk, and :class:`ClientClosedError` once its client
    was closed. ``close()`` (or leaving a ``with`` block) cancels the request on the server.
    """

    def __init__(
        self, call: ResponseStream, payloads: Iterator[bytes], reader: ResponseReader, client: Client
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
            raise
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
    shipped in the package; never the simulator). The enclave key is pinned with
    the identity it was verified for and used for ``key_ttl`` (a ``timedelta`` or
    seconds; default one hour); re-attestations must show the same identity.
    ``transport``, ``clock`` and ``random_bytes`` are injectable for tests.
    Thread-safe: one client may serve many threads.
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
        key_ttl: timedelta | float | int = DEFAULT_KEY_TTL,
    ) -> None:
        super().__init__(policy, timeout=timeout, clock=clock, random_bytes=random_bytes, key_ttl=key_ttl)
        if transport is None:
            if target is None:
                raise ConfigurationError("Client needs a target (host:port) or a transport")
            transport = GrpcTransport(target)
        self._transport = transport
        self._lock = threading.Lock()
        self._sleep: Callable[[float], None] = time.sleep
        self.chat = Chat(self)

    def attest(self) -> Verdict:
        """Fetch fresh evidence now, verify it and pin the enclave key; returns the verdict."""
        with self._lock:
            return self._attest_locked().verdict

    def save_evidence(self, path: str | Path) -> Path:
        """Write the raw evidence of the current attestation (attesting first if needed) to ``path``."""
        return self._write_evidence(path, self._ensure())

    def close(self) -> None:
        """Close the transport; open streams and later calls raise :class:`ClientClosedError`."""
        self._closed = True
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _attest_locked(self) -> Attestation:
        self._check_open()
        nonce = self._core.new_nonce()
        try:
            evidence = self._transport.get_evidence(nonce, self.timeout)
        except ServerError as exc:
            delay = evidence_backoff(exc)
            if delay is None:
                raise
            self._sleep(delay)
            self._check_open()
            nonce = self._core.new_nonce()
            evidence = self._transport.get_evidence(nonce, self.timeout)
        return self._install(self._core.accept(evidence, nonce))

    def _ensure(self) -> Attestation:
        self._check_open()
        current = self._fresh()
        if current is not None:
            return current
        with self._lock:
            return self._fresh() or self._attest_locked()

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
                self._check_open()
                raise ChannelError("response stream ended before its header") from None
            except ServerError as exc:
                self._check_open()
                if exc.code == STALE_KEY_CODE and attempt == 0:
                    attestation = self._reattest(attestation)
                    continue
                raise
            try:
                reader.feed(header)
            except BaseException:
                call.cancel()
                raise
            return Stream(call, payloads, reader, self)
        raise ServerError(STALE_KEY_CODE, "enclave key still stale after re-attesting")  # pragma: no cover
