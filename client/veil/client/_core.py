"""The sans-I/O heart shared by :class:`Client` and :class:`AsyncClient`.

Everything here is pure: checking arguments, turning evidence into a pinned
:class:`Attestation`, sealing a request to the attested key, and decrypting the
response payloads into OpenAI-shaped chunks. The two clients only add the I/O
(sync or async) around it, so they cannot drift apart.

Key pinning lives here too, once: the first accepted attestation pins an
:class:`~veil.client._identity.EnclaveIdentity`; every later one (after "stale key",
after the pinned key expired, or an explicit ``attest()``) must show the same
identity or is refused with an :class:`AttestationError` naming each changed field.
A pinned key expires ``key_ttl`` after it was verified.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from veil.attestation import errors as att_errors
from veil.attestation.binding import NONCE_SIZE, Claims
from veil.attestation.bundle import verify_evidence
from veil.attestation.channel.hpke import REQUEST_ID_SIZE, RESPONSE_KEY_SIZE, PublicKey, seal_request
from veil.attestation.channel.stream import StreamDecryptor
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import Policy
from veil.attestation.verdict import Verdict
from veil.client._identity import EnclaveIdentity, identity_of
from veil.client._response_format import check_response_format
from veil.client._types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    CompletionUsage,
)
from veil.client.errors import (
    AttestationError,
    ChannelError,
    ConfigurationError,
    RequestRejectedError,
)
from veil.proto.chat import ChatMessageError, check_chat
from veil.proto.v1 import generate_pb2, service_pb2

__all__ = [
    "DEFAULT_KEY_TTL",
    "Attestation",
    "ClientCore",
    "GenerateParams",
    "ResponseReader",
    "check_key_ttl",
    "tenant_secret",
]

DEFAULT_MAX_TOKENS = 256
DEFAULT_KEY_TTL = timedelta(hours=1)
TENANT_SECRET_SIZE = 32
TENANT_MIN_BYTES = 16
STALE_KEY_CODE = "FAILED_PRECONDITION"
_FINISH = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


@dataclass(frozen=True, slots=True)
class Attestation:
    """A verified enclave: its verdict, claims, identity and the key requests are sealed to.

    The key is used until ``expires_at``; then the client attests afresh.
    """

    verdict: Verdict
    claims: Claims
    public_key: PublicKey
    evidence: bytes
    nonce: bytes
    verified_at: datetime
    identity: EnclaveIdentity
    expires_at: datetime

    @property
    def model(self) -> str:
        """The attested model, named by the SHA-256 of its weights file."""
        return f"sha256:{self.claims.model_digest.hex()}"


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """Checked sampling parameters of one request."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False  # sealed into the request: how the enclave frames the answer
    response_format: generate_pb2.ResponseFormat | None = None  # sealed too (structured output)

    def to_proto(self) -> generate_pb2.SamplingParams:
        params = generate_pb2.SamplingParams(max_tokens=self.max_tokens, stop=list(self.stop))
        if self.temperature is not None:
            params.temperature = self.temperature
        if self.top_p is not None:
            params.top_p = self.top_p
        if self.top_k is not None:
            params.top_k = self.top_k
        if self.seed is not None:
            params.seed = self.seed
        return params


def check_params(
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    stream: bool = False,
    response_format: object = None,
) -> GenerateParams:
    """Validate OpenAI-style arguments; raises :class:`ConfigurationError` before anything is sent."""
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens < 2**32:
        raise ConfigurationError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ConfigurationError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise ConfigurationError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k < 2**32
    ):
        raise ConfigurationError(f"top_k must be a non-negative integer, got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ConfigurationError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    else:
        stops = tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ConfigurationError("stop must be a non-empty string or a list of them")
    return GenerateParams(
        max_tokens=max_tokens,
        temperature=None if temperature is None else float(temperature),
        top_p=None if top_p is None else float(top_p),
        top_k=top_k,
        seed=seed,
        stop=stops,
        stream=bool(stream),
        response_format=check_response_format(response_format),
    )


def tenant_secret(tenant: str | bytes | None, random_bytes: Callable[[int], bytes]) -> bytes:
    """The 32 bytes sealed in every request as ``tenant_secret`` (prefix-cache sharing).

    ``None``: fresh random bytes, so this client instance is a tenant of its own (its
    conversations reuse their own cached prefixes; no other instance can). A ``tenant`` secret
    (at least 16 bytes; ``secrets.token_hex(16)`` makes one) lets every instance given the same
    secret share a cache: whoever knows it can also time that cache, so treat it as a key.
    """
    if tenant is None:
        secret = random_bytes(TENANT_SECRET_SIZE)
        if not isinstance(secret, bytes) or len(secret) != TENANT_SECRET_SIZE:
            raise ConfigurationError(f"random_bytes must return {TENANT_SECRET_SIZE} bytes")
        return secret
    if isinstance(tenant, str):
        raw = tenant.encode("utf-8", "surrogatepass")
    elif isinstance(tenant, bytes):
        raw = tenant
    else:
        raise ConfigurationError("tenant must be a str or bytes secret, or None")
    if len(raw) < TENANT_MIN_BYTES:
        raise ConfigurationError(
            f"tenant must be a secret of at least {TENANT_MIN_BYTES} bytes (anyone who knows it shares "
            "this tenant's prompt cache); make one with secrets.token_hex(16)"
        )
    return hashlib.blake2b(raw, person=b"veil/tenant/v1", digest_size=TENANT_SECRET_SIZE).digest()


def check_key_ttl(key_ttl: timedelta | float | int) -> timedelta:
    """``key_ttl`` as a positive :class:`~datetime.timedelta` (numbers are seconds)."""
    if isinstance(key_ttl, timedelta):
        ttl = key_ttl
    elif isinstance(key_ttl, int | float) and not isinstance(key_ttl, bool) and math.isfinite(key_ttl):
        ttl = timedelta(seconds=key_ttl)
    else:
        raise ConfigurationError(f"key_ttl must be a timedelta or a number of seconds, got {key_ttl!r}")
    if ttl <= timedelta(0):
        raise ConfigurationError(f"key_ttl must be positive, got {key_ttl!r}")
    return ttl


def check_messages(messages: Iterable[Mapping[str, Any] | Any]) -> list[generate_pb2.ChatMessage]:
    """OpenAI-style ``[{"role": ..., "content": ...}]`` (or objects with those attributes) to protobuf.

    The roles and contents are checked by :func:`veil.proto.chat.check_chat`, the rule the enclave applies.
    """
    if isinstance(messages, str | bytes | Mapping):
        raise ConfigurationError("messages must be a list of {'role', 'content'} items")
    pairs = (
        (m.get("role"), m.get("content"))
        if isinstance(m, Mapping)
        else (getattr(m, "role", None), getattr(m, "content", None))
        for m in messages
    )
    try:
        chat = check_chat(pairs)
    except ChatMessageError as exc:
        raise ConfigurationError(str(exc)) from exc
    return [generate_pb2.ChatMessage(role=role, content=content) for role, content in chat]


class ResponseReader:
    """Decrypts the payloads of one ``Generate`` stream into chunks, enforcing FINAL.

    Feed every payload in order; the first is the stream header. A streamed answer comes
    as equal-size frames on the enclave's cadence, many of them empty (they yield nothing);
    a non-streamed one as a single FINAL frame holding the whole text. ``close()`` must
    be called when the transport ends: a stream without its FINAL chunk raises
    :class:`ChannelError`, never a short answer.
    """

    def __init__(
        self, *, response_key: bytes, request_id: bytes, completion_id: str, created: int, model: str
    ) -> None:
        self._key = response_key
        self._request_id = request_id
        self._decryptor: StreamDecryptor | None = None
        self._sent_role = False
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.finish_reason: str | None = None
        self.usage: CompletionUsage | None = None

    @property
    def finished(self) -> bool:
        """True once the FINAL chunk authenticated."""
        return self._decryptor is not None and self._decryptor.finished

    def feed(self, payload: bytes) -> ChatCompletionChunk | None:
        """Take the next payload; returns the decrypted chunk, or None for the header or an empty frame."""
        try:
            if self._decryptor is None:
                self._decryptor = StreamDecryptor(self._key, self._request_id, payload)
                return None
            chunk, final = self._decryptor.decrypt(payload)
        except att_errors.VeilAttestationError as exc:
            raise ChannelError(f"response stream rejected: {exc}") from exc
        if chunk.HasField("error"):
            code = generate_pb2.ChunkError.Code.Name(chunk.error.code).removeprefix("CODE_")
            raise RequestRejectedError(code, chunk.error.message or "request rejected by the enclave")
        finish: str | None = None
        if final:
            if chunk.finish_reason == generate_pb2.FINISH_REASON_ERROR:
                raise RequestRejectedError("INTERNAL", "the enclave ended the request with an error")
            finish = _FINISH.get(chunk.finish_reason, "stop")
            self.finish_reason = finish
            if chunk.HasField("usage"):
                self.usage = CompletionUsage(
                    chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.cached_tokens
                )
        if not chunk.text_delta and not final:
            return None
        role = None if self._sent_role else "assistant"
        self._sent_role = True
        return ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=(ChunkChoice(0, ChoiceDelta(content=chunk.text_delta, role=role), finish),),
            usage=self.usage if final else None,
        )

    def close(self) -> None:
        """The transport ended: raises :class:`ChannelError` unless FINAL was seen."""
        if self._decryptor is None:
            raise ChannelError("response stream ended before its header")
        try:
            self._decryptor.close()
        except att_errors.VeilAttestationError as exc:
            raise ChannelError(str(exc)) from exc


@dataclass(slots=True)
class CompletionAccumulator:
    """Joins streamed chunks into one :class:`ChatCompletion`."""

    parts: list[str] = field(default_factory=list)

    def add(self, chunk: ChatCompletionChunk) -> None:
        content = chunk.choices[0].delta.content
        if content:
            self.parts.append(content)

    def result(self, reader: ResponseReader) -> ChatCompletion:
        message = ChatCompletionMessage(content="".join(self.parts))
        return ChatCompletion(
            id=reader.completion_id,
            created=reader.created,
            model=reader.model,
            choices=(Choice(0, message, reader.finish_reason),),
            usage=reader.usage,
        )


class ClientCore:
    """Policy, clock and randomness, and the pure steps of attest / seal / read."""

    def __init__(
        self,
        policy: Policy,
        *,
        clock: Callable[[], datetime],
        random_bytes: Callable[[int], bytes],
        key_ttl: timedelta | float | int = DEFAULT_KEY_TTL,
        tenant_secret: bytes | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise ConfigurationError("policy must be a veil.client.Policy")
        if tenant_secret is not None and len(tenant_secret) != TENANT_SECRET_SIZE:
            raise ConfigurationError(f"tenant_secret must be {TENANT_SECRET_SIZE} bytes")
        self.tenant_secret = tenant_secret or b""  # b"": share no cached prefix with anyone
        self.policy = policy
        self.clock = clock
        self.random_bytes = random_bytes
        self.key_ttl = check_key_ttl(key_ttl)
        self.pinned: EnclaveIdentity | None = None

    def _random(self, n: int) -> bytes:
        data = self.random_bytes(n)
        if not isinstance(data, bytes) or len(data) != n:
            raise ConfigurationError(f"random_bytes({n}) must return {n} bytes")
        return data

    def new_nonce(self) -> bytes:
        """A fresh 32-byte attestation nonce."""
        return self._random(NONCE_SIZE)

    def expired(self, attestation: Attestation) -> bool:
        """True once ``attestation``'s key is past its ``key_ttl``: attest afresh before using it."""
        return self.clock() >= attestation.expires_at

    def accept(self, evidence: bytes, nonce: bytes) -> Attestation:
        """Verify ``evidence`` for ``nonce`` under the policy and the pinned identity.

        The first good evidence pins its :class:`EnclaveIdentity`; later evidence with
        another identity is refused even when the policy would accept it. Raises
        :class:`AttestationError`; call it under the client's lock.
        """
        now = self.clock()
        result = verify_evidence(evidence, VerifyOptions(now=now), policy=self.policy, nonce=nonce)
        if not result.ok or result.claims is None or result.public_key is None:
            failed = [c.name for c in result.verdict.failed] or ["verdict"]
            details = "; ".join(f"{c.name}: {c.detail}" for c in result.verdict.failed)
            raise AttestationError(
                f"enclave evidence rejected{': ' + details if details else ''}",
                failed_checks=failed,
                verdict=result.verdict,
            )
        try:
            identity = identity_of(result.evidence, result.claims) if result.evidence else None
        except att_errors.VeilAttestationError as exc:
            raise AttestationError(str(exc), failed_checks=["pin.identity"], verdict=result.verdict) from exc
        if identity is None:  # pragma: no cover - a good verdict always has parsed evidence
            raise AttestationError(
                "no evidence to pin", failed_checks=["pin.identity"], verdict=result.verdict
            )
        if self.pinned is not None:
            changes = self.pinned.changes(identity)
            if changes:
                raise AttestationError(
                    "re-attested enclave is not the pinned one (a new key is accepted only for the "
                    "same identity; make a new client to trust another): " + "; ".join(changes),
                    failed_checks=[f"pin.{c.split(':', 1)[0]}" for c in changes],
                    verdict=result.verdict,
                )
        else:
            self.pinned = identity
        return Attestation(
            verdict=result.verdict,
            claims=result.claims,
            public_key=result.public_key,
            evidence=evidence,
            nonce=nonce,
            verified_at=now,
            identity=identity,
            expires_at=now + self.key_ttl,
        )

    def check_model(self, model: str | None, attestation: Attestation) -> None:
        """``model=`` is optional; when given it must name the attested model."""
        if model is not None and model != attestation.model:
            raise ConfigurationError(
                f"model {model!r} is not the attested model; this enclave serves {attestation.model}"
            )

    def seal(
        self,
        attestation: Attestation,
        messages: Sequence[generate_pb2.ChatMessage] | str,
        params: GenerateParams,
    ) -> tuple[service_pb2.EncryptedRequest, ResponseReader]:
        """Seal one chat request (or, given a ``str``, a plain-text prompt) to the attested key.

        Returns the sealed request and the reader for its answer.

        The sealed request says whether the answer is streamed (equal-size frames on the
        enclave's cadence) or not (one frame), and carries the time it was sealed: the enclave
        refuses it outside its replay window (±5 min of its clock) or if it was seen before.
        Every attempt, retries included, is sealed afresh with a new request id.
        """
        request_id = self._random(REQUEST_ID_SIZE)
        response_key = self._random(RESPONSE_KEY_SIZE)
        issued_at_ms = int(self.clock().timestamp() * 1000)
        request = generate_pb2.GenerateRequest(
            request_id=request_id,
            **_input(messages),
            params=params.to_proto(),
            response_key=response_key,
            stream=params.stream,
            issued_at_ms=max(issued_at_ms, 0),
            tenant_secret=self.tenant_secret,
        )
        if params.response_format is not None:
            request.response_format.CopyFrom(params.response_format)
        try:
            sealed = seal_request(request, attestation.public_key)
        except att_errors.MessageTooLargeError as exc:
            raise ConfigurationError(f"request too large: {exc}") from exc
        reader = ResponseReader(
            response_key=response_key,
            request_id=request_id,
            completion_id=f"chatcmpl-{request_id.hex()}",
            created=int(self.clock().timestamp()),
            model=attestation.model,
        )
        return sealed, reader


def _input(messages: Sequence[generate_pb2.ChatMessage] | str) -> dict[str, Any]:
    """The ``input`` oneof of a ``GenerateRequest``: chat messages or a plain prompt."""
    if isinstance(messages, str):
        return {"prompt": messages}
    return {"chat": generate_pb2.ChatMessages(messages=list(messages))}
