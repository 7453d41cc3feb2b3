"""The replica pool: pure routing and back-off, then the SDK over three in-process enclaves.

The end-to-end pool test against three real ``veil serve`` processes is ``test_pool_e2e.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fake_enclave import MODEL, FakeAsyncTransport, FakeEnclave, FakeTransport

from veil.client import (
    AsyncClient,
    AttestationError,
    Client,
    ConfigurationError,
    Policy,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
)
from veil.client._pool import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    REFUSED_BACKOFF,
    Failover,
    ReplicaPool,
    failover,
)
from veil.proto.v1 import service_pb2

USER = [{"role": "user", "content": "Say hello"}]
OTHER_MODEL = hashlib.sha256(b"another model").digest()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- the pure pool


def test_fewest_in_flight_wins_and_ties_take_turns() -> None:
    pool = ReplicaPool([("a", 0), ("b", 1), ("c", 2)], clock=Clock())
    first = [pool.pick() for _ in range(3)]
    assert [r.target for r in first if r] == ["a", "b", "c"]  # each one request
    pool.release(first[1])  # type: ignore[arg-type]
    again = pool.pick()
    assert again is not None and again.target == "b"  # the only one with fewer in flight
    for r in pool.replicas:
        while r.in_flight:
            pool.release(r)
    turns = []
    for _ in range(6):
        r = pool.pick()
        assert r is not None
        turns.append(r.target)
        pool.release(r)
    assert sorted(turns) == ["a", "a", "b", "b", "c", "c"]  # idle replicas are used in turn


def test_a_request_never_tries_a_replica_twice() -> None:
    pool = ReplicaPool([("a", 0), ("b", 1)], clock=Clock())
    one = pool.pick()
    assert one is not None
    two = pool.pick({one.index})
    assert two is not None and two is not one
    assert pool.pick({0, 1}) is None


def test_backoff_doubles_honours_the_hint_and_resets_on_success() -> None:
    clock = Clock()
    pool = ReplicaPool([("a", 0), ("b", 1)], clock=clock)
    a = pool.replicas[0]
    err = ServerError("UNAVAILABLE", "connection refused")
    assert pool.failed(a, err) == BACKOFF_MIN
    assert pool.failed(a, err) == 2 * BACKOFF_MIN
    for _ in range(20):
        delay = pool.failed(a, err)
    assert delay == BACKOFF_MAX
    assert pool.status(a).state == "backoff" and "connection refused" in (pool.status(a).error or "")
    picked = [pool.pick() for _ in range(3)]
    assert all(r is not None and r.target == "b" for r in picked)  # a sits out
    pool.succeeded(a)
    assert pool.status(a).state == "unattested" and pool.status(a).error is None
    assert pool.failed(a, err, retry_after=7.5) == 7.5  # the server's hint when it is longer


def test_when_every_replica_is_down_the_soonest_back_is_tried() -> None:
    clock = Clock()
    pool = ReplicaPool([("a", 0), ("b", 1)], clock=clock)
    a, b = pool.replicas
    pool.failed(a, ServerError("UNAVAILABLE", "x"), retry_after=20)
    pool.failed(b, ServerError("UNAVAILABLE", "x"), retry_after=5)
    chosen = pool.pick()
    assert chosen is b


def test_refused_replica_sits_out_and_says_why() -> None:
    clock = Clock()
    pool = ReplicaPool([("a", 0), ("b", 1)], clock=clock)
    a = pool.replicas[0]
    pool.refuse(a, AttestationError("re-attested enclave is not the pinned one", ["pin.model_digest"]))
    status = pool.status(a)
    assert status.state == "refused" and status.failed_checks == ("pin.model_digest",)
    assert status.retry_in_s == REFUSED_BACKOFF
    assert status.to_dict()["failed_checks"] == ["pin.model_digest"]
    assert pool.pick() is pool.replicas[1]


@pytest.mark.parametrize(
    ("exc", "attesting", "expected"),
    [
        (AttestationError("bad", ["snp.signature"]), True, Failover.REFUSE),
        (AttestationError("changed", ["pin.model_digest"]), False, Failover.REFUSE),
        (ServerError("UNAVAILABLE", "x"), False, Failover.BACKOFF),
        (ServerError("RESOURCE_EXHAUSTED", "x"), False, Failover.BACKOFF),
        (ServerError("FAILED_PRECONDITION", "stale"), False, Failover.BACKOFF),
        (ServerError("DEADLINE_EXCEEDED", "x"), True, Failover.BACKOFF),  # nothing was sent yet
        (ServerError("DEADLINE_EXCEEDED", "x"), False, Failover.RAISE),  # it may have run
        (ServerError("INVALID_ARGUMENT", "replay"), False, Failover.RAISE),
        (RequestRejectedError("INVALID_REQUEST", "x"), False, Failover.RAISE),
        (StreamInterruptedError("UNAVAILABLE", "x", target="a"), False, Failover.RAISE),
        (ConfigurationError("bad model"), False, Failover.RAISE),
    ],
)
def test_failover_classification(exc: Exception, attesting: bool, expected: Failover) -> None:
    assert failover(exc, attesting=attesting) is expected


# ---- the SDK over three in-process enclaves


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture
def enclaves(state_dir: Path) -> list[FakeEnclave]:
    return [FakeEnclave(state_dir) for _ in range(3)]


@pytest.fixture
def policy(enclaves: list[FakeEnclave]) -> Policy:
    """Accepts both models: the pool's pinning, not the policy, must refuse the odd replica."""
    return Policy.simulated(enclaves[0].root_pem, model_digests=[MODEL, OTHER_MODEL])


class BreakAfterHeader:
    """A transport whose Generate streams send the header and one chunk, then fail UNAVAILABLE."""

    def __init__(self, inner: FakeTransport) -> None:
        self.inner = inner

    def get_evidence(self, nonce: bytes, timeout: float | None) -> bytes:
        return self.inner.get_evidence(nonce, timeout)

    def generate(self, request: service_pb2.EncryptedRequest, timeout: float | None) -> _Broken:
        return _Broken(self.inner.enclave.payloads(request)[:2])

    def close(self) -> None:
        self.inner.close()


class _Broken:
    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads

    def __iter__(self) -> Iterator[bytes]:
        yield from self.payloads
        raise ServerError("UNAVAILABLE", "Socket closed")

    async def _aiter(self) -> AsyncIterator[bytes]:
        for p in self.payloads:
            yield p
        raise ServerError("UNAVAILABLE", "Socket closed")

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._aiter()

    def cancel(self) -> None:
        pass


def test_open_streams_spread_over_the_replicas(enclaves: list[FakeEnclave], policy: Policy) -> None:
    targets = ["r0:1", "r1:1", "r2:1"]
    with Client(targets, transport=[FakeTransport(e) for e in enclaves], policy=policy) as client:
        streams = [client.chat.completions.create(messages=USER, stream=True) for _ in range(3)]
        assert [len(e.requests) for e in enclaves] == [1, 1, 1]
        assert [s.in_flight for s in client.replicas] == [1, 1, 1]
        assert [s.target for s in client.replicas] == targets
        for stream in streams:
            assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello, world."
        assert [s.in_flight for s in client.replicas] == [0, 0, 0]
        assert {s.state for s in client.replicas} == {"ready"}
        assert client.identity is not None and client.identity.fields()["model_digest"] == MODEL.hex()


def test_unreachable_replica_is_backed_off_and_the_request_goes_elsewhere(
    enclaves: list[FakeEnclave], policy: Policy
) -> None:
    enclaves[0].evidence_errors = [ServerError("UNAVAILABLE", "connection refused")]
    with Client(transport=[FakeTransport(e) for e in enclaves], policy=policy) as client:
        reply = client.chat.completions.create(messages=USER)
        assert reply.choices[0].message.content == "Hello, world."
        first = client.replicas[0]
        assert first.state == "backoff" and "connection refused" in (first.error or "")
        for _ in range(4):
            client.chat.completions.create(messages=USER)
    assert len(enclaves[0].requests) == 0  # it sat out its back-off
    assert len(enclaves[1].requests) + len(enclaves[2].requests) == 5


def test_generate_refused_before_the_header_is_sent_elsewhere(
    enclaves: list[FakeEnclave], policy: Policy
) -> None:
    with Client(transport=[FakeTransport(e) for e in enclaves[:2]], policy=policy) as client:
        client.attest()  # both replicas attested and pinned
        enclaves[0].restart()  # a new key it will not be able to show... once stale, it is re-attested
        enclaves[0].evidence_errors = [ServerError("UNAVAILABLE", "gone")]  # ...and that fails
        reply = client.chat.completions.create(messages=USER)
        assert reply.choices[0].message.content == "Hello, world."
        assert client.replicas[0].state == "backoff"
    assert len(enclaves[1].requests) == 1


def test_replica_with_another_model_is_refused(enclaves: list[FakeEnclave], policy: Policy) -> None:
    enclaves[2].restart(model_digest=OTHER_MODEL)
    with Client(transport=[FakeTransport(e) for e in enclaves], policy=policy) as client:
        verdict = client.attest()
        assert verdict.ok
        odd = client.replicas[2]
        assert odd.state == "refused" and odd.failed_checks == ("pin.model_digest",)
        assert odd.verdict is not None and odd.verdict.ok  # the policy accepted it; pinning did not
        for _ in range(6):
            client.chat.completions.create(messages=USER)
    assert len(enclaves[2].requests) == 0
    assert len(enclaves[0].requests) + len(enclaves[1].requests) == 6


def test_all_replicas_refused_raises_the_attestation_error(state_dir: Path) -> None:
    enclaves = [FakeEnclave(state_dir) for _ in range(2)]
    strict = Policy.simulated(enclaves[0].root_pem)  # names MODEL only
    for e in enclaves:
        e.restart(model_digest=OTHER_MODEL)
    with (
        Client(transport=[FakeTransport(e) for e in enclaves], policy=strict) as client,
        pytest.raises(AttestationError) as info,
    ):
        client.chat.completions.create(messages=USER)
    assert info.value.failed_checks  # names the policy check that failed
    assert all(s.state == "refused" for s in client.replicas)


def test_a_started_stream_is_never_retried_elsewhere(enclaves: list[FakeEnclave], policy: Policy) -> None:
    transports = [BreakAfterHeader(FakeTransport(enclaves[0])), FakeTransport(enclaves[1])]
    with Client(["a:1", "b:1"], transport=transports, policy=policy) as client:  # type: ignore[arg-type]
        stream = client.chat.completions.create(messages=USER, stream=True)
        with pytest.raises(StreamInterruptedError) as info:
            list(stream)
        assert info.value.code == "UNAVAILABLE" and info.value.target == "a:1"
        assert isinstance(info.value, ServerError)
        assert len(enclaves[1].requests) == 0  # not sent again
        assert client.replicas[0].state == "backoff" and client.replicas[0].in_flight == 0
        # new requests keep succeeding on the other replica
        assert client.chat.completions.create(messages=USER).choices[0].message.content == "Hello, world."


def test_async_pool_spreads_refuses_and_fails_over(enclaves: list[FakeEnclave], policy: Policy) -> None:
    enclaves[1].restart(model_digest=OTHER_MODEL)
    enclaves[2].evidence_errors = [ServerError("UNAVAILABLE", "connection refused")]

    async def main() -> None:
        transports = [FakeAsyncTransport(e) for e in enclaves]
        async with AsyncClient(["a:1", "b:1", "c:1"], transport=transports, policy=policy) as client:
            replies = await asyncio.gather(*(client.chat.completions.create(messages=USER) for _ in range(4)))
            assert {r.choices[0].message.content for r in replies} == {"Hello, world."}
            states = [s.state for s in client.replicas]
            assert states[1] == "refused" and states[2] == "backoff"
            statuses = await client.ensure_attested()  # backed-off and refused ones are not retried yet
            assert [s.state for s in statuses] == states
            stream = await client.completions.create(prompt="Once", stream=True)
            assert "".join([c.choices[0].text async for c in stream]) == "Hello, world."

    asyncio.run(main())
    assert len(enclaves[0].requests) == 5
    assert enclaves[0].requests[-1].WhichOneof("input") == "prompt"
    assert enclaves[0].requests[-1].prompt == "Once"


def test_text_completion_sends_a_plain_prompt(enclaves: list[FakeEnclave], policy: Policy) -> None:
    with Client(transport=FakeTransport(enclaves[0]), policy=policy) as client:
        reply = client.completions.create(prompt=["The sky is"], max_tokens=2, seed=1)
        assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
        assert reply.choices[0].text == "Hello, " and reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 2
        with pytest.raises(ConfigurationError, match="prompt"):
            client.completions.create(prompt=["a", "b"])
    (request,) = enclaves[0].requests
    assert request.prompt == "The sky is" and request.params.seed == 1


def test_targets_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="twice"):
        Client(["127.0.0.1:1", "127.0.0.1:1"])
    with pytest.raises(ConfigurationError, match="host:port"):
        Client(["127.0.0.1:1", ""])
    with pytest.raises(ConfigurationError, match="target"):
        Client([])
