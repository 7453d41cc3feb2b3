"""The SDK against an in-process enclave (real keys, simulated TEE, real channel crypto; canned model)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fake_enclave import DATA_POLICY, MODEL, FakeAsyncTransport, FakeEnclave, FakeTransport

from veil.attestation.bundle import verify_evidence
from veil.attestation.options import VerifyOptions
from veil.client import (
    AsyncClient,
    AttestationError,
    ChannelError,
    Client,
    ConfigurationError,
    Policy,
    RequestRejectedError,
    ServerError,
)
from veil.proto.v1 import generate_pb2

USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture
def enclave(state_dir: Path) -> FakeEnclave:
    return FakeEnclave(state_dir)


@pytest.fixture
def policy(enclave: FakeEnclave) -> Policy:
    return Policy.simulated(enclave.root_pem)


def test_chat_non_streaming(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    assert client.attestation is None
    reply = client.chat.completions.create(messages=USER, max_tokens=16, temperature=0.0, seed=3, stop=["\n"])
    assert reply.choices[0].message.content == "Hello, world."
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (7, 4, 11)
    assert reply.model == f"sha256:{MODEL.hex()}"
    assert client.attestation is not None and client.attestation.ok
    assert client.attestation.get("policy.simulated") is not None
    # what the enclave received: the messages and parameters, sealed
    (request,) = enclave.requests
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "Say hello")]
    assert request.params.max_tokens == 16
    assert request.params.temperature == 0.0 and request.params.seed == 3
    assert list(request.params.stop) == ["\n"]
    assert reply.to_dict()["choices"][0]["message"]["content"] == "Hello, world."


def test_chat_streaming_and_one_attestation(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    with client.chat.completions.create(messages=USER, stream=True) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello, world."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert stream.finish_reason == "stop"
    client.chat.completions.create(messages=USER, max_tokens=2)
    assert len(enclave.evidence_calls) == 1  # attested once, key pinned


def test_finish_reason_length(enclave: FakeEnclave, policy: Policy) -> None:
    reply = Client(transport=FakeTransport(enclave), policy=policy).chat.completions.create(
        messages=USER, max_tokens=2
    )
    assert reply.choices[0].message.content == "Hello, "
    assert reply.choices[0].finish_reason == "length"


def test_injected_randomness_and_clock(enclave: FakeEnclave, policy: Policy) -> None:
    counter = itertools.count()

    def random_bytes(n: int) -> bytes:
        return bytes([next(counter) % 256]) * n

    client = Client(transport=FakeTransport(enclave), policy=policy, random_bytes=random_bytes)
    client.attest()
    assert enclave.evidence_calls == [bytes([0]) * 32]
    client.chat.completions.create(messages=USER)
    assert enclave.requests[0].request_id == bytes([1]) * 16
    assert enclave.requests[0].response_key == bytes([2]) * 32

    future = Client(
        transport=FakeTransport(enclave), policy=policy, clock=lambda: datetime(2100, 1, 1, tzinfo=UTC)
    )
    with pytest.raises(AttestationError) as info:
        future.attest()
    assert "snp.chain.validity" in info.value.failed_checks


def test_stale_key_reattests_once(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    client.attest()
    first_key = client.claims.enclave_public_key if client.claims else None
    enclave.restart()  # server restarted: new key
    reply = client.chat.completions.create(messages=USER)
    assert reply.choices[0].message.content == "Hello, world."
    assert len(enclave.evidence_calls) == 2
    assert client.claims is not None and client.claims.enclave_public_key != first_key


def test_stale_key_streaming_reattests(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    client.attest()
    enclave.restart()
    stream = client.chat.completions.create(messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello, world."


def test_default_policy_rejects_simulated_evidence(enclave: FakeEnclave) -> None:
    client = Client(transport=FakeTransport(enclave))
    with pytest.raises(AttestationError) as info:
        client.chat.completions.create(messages=USER)
    failed = set(info.value.failed_checks)
    assert {"policy.platform", "policy.simulated", "snp.chain.ark"} <= failed
    assert info.value.verdict is not None and not info.value.verdict.ok
    assert not enclave.requests  # nothing was sent


def test_policy_pins_model_and_data_policy(enclave: FakeEnclave) -> None:
    wrong = Policy.simulated(enclave.root_pem, model_digests=[bytes(32)])
    with pytest.raises(AttestationError) as info:
        Client(transport=FakeTransport(enclave), policy=wrong).attest()
    assert info.value.failed_checks == ("policy.model_digest",)
    right = Policy.simulated(
        enclave.root_pem, model_digests=[MODEL], data_policy_digest=DATA_POLICY, gpu_count=1
    )
    verdict = Client(transport=FakeTransport(enclave), policy=right).attest()
    for name in ("policy.model_digest", "policy.data_policy_digest", "policy.gpu_count"):
        check = verdict.get(name)
        assert check is not None and check.status.value == "pass", name


def test_tampered_chunk_is_channel_error(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    enclave.tamper_chunk = 2
    with pytest.raises(ChannelError, match="authentication"):
        client.chat.completions.create(messages=USER)
    enclave.tamper_chunk = 0  # the stream header: the first chunk then fails to authenticate
    with pytest.raises(ChannelError):
        list(client.chat.completions.create(messages=USER, stream=True))


def test_missing_final_is_channel_error_never_a_short_answer(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    enclave.drop_final = True
    with pytest.raises(ChannelError, match="FINAL"):
        client.chat.completions.create(messages=USER)
    stream = client.chat.completions.create(messages=USER, stream=True)
    seen = []
    with pytest.raises(ChannelError):
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["Hello", ", ", "world", "."]  # the text arrived, but the answer is not accepted


def test_encrypted_rejection(enclave: FakeEnclave, policy: Policy) -> None:
    enclave.reject = (generate_pb2.ChunkError.CODE_PROMPT_TOO_LONG, "prompt has 9000 tokens, limit 2048")
    with pytest.raises(RequestRejectedError) as info:
        Client(transport=FakeTransport(enclave), policy=policy).chat.completions.create(messages=USER)
    assert info.value.code == "PROMPT_TOO_LONG"
    assert "limit 2048" in str(info.value)
    assert isinstance(info.value, ServerError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"messages": []}, "empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "content"),
        ({"messages": "hello"}, "list"),
        ({"messages": USER, "temperature": -1}, "temperature"),
        ({"messages": USER, "temperature": float("nan")}, "temperature"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "seed": -1}, "seed"),
        ({"messages": USER, "stop": [""]}, "stop"),
        ({"messages": USER, "model": "gpt-4"}, "not the attested model"),
    ],
)
def test_bad_arguments_send_nothing(
    enclave: FakeEnclave, policy: Policy, kwargs: dict[str, object], match: str
) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    with pytest.raises(ConfigurationError, match=match):
        client.chat.completions.create(**kwargs)  # type: ignore[arg-type]
    assert not enclave.requests


def test_model_argument_accepts_the_attested_model(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    reply = client.chat.completions.create(messages=USER, model=f"sha256:{MODEL.hex()}")
    assert reply.model == f"sha256:{MODEL.hex()}"


def test_save_evidence_verifies_offline(enclave: FakeEnclave, policy: Policy, tmp_path: Path) -> None:
    with Client(transport=FakeTransport(enclave), policy=policy) as client:
        path = client.save_evidence(tmp_path / "evidence.bin")
        nonce = enclave.evidence_calls[0]
    assert enclave.closed
    data = path.read_bytes()
    assert data == client.evidence
    result = verify_evidence(data, VerifyOptions(now=datetime.now(UTC)), policy=policy, nonce=nonce)
    assert result.ok
    offline = verify_evidence(data, VerifyOptions(now=datetime.now(UTC)), policy=policy, nonce=None)
    assert offline.ok and offline.verdict.get("binding.nonce").status.value == "skip"  # type: ignore[union-attr]


def test_simulated_policy_warns(enclave: FakeEnclave, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="veil.attestation.policy"):
        Policy.simulated(enclave.root_pem)
    assert any("SIMULATED TEE" in r.getMessage() for r in caplog.records)


def test_client_needs_target_or_transport() -> None:
    with pytest.raises(ConfigurationError):
        Client()
    with pytest.raises(ConfigurationError, match="scheme"):
        Client("http://localhost:1")
    with pytest.raises(ConfigurationError, match="host:port"):
        Client("localhost")
    with pytest.raises(ConfigurationError, match="policy"):
        Client("localhost:1", policy="strict")  # type: ignore[arg-type]


def test_async_client(enclave: FakeEnclave, policy: Policy) -> None:
    async def main() -> None:
        async with AsyncClient(transport=FakeAsyncTransport(enclave), policy=policy) as client:
            reply = await client.chat.completions.create(messages=USER)
            assert reply.choices[0].message.content == "Hello, world."
            enclave.restart()
            stream = await client.chat.completions.create(messages=USER, stream=True)
            parts = [c.choices[0].delta.content async for c in stream]
            assert "".join(p or "" for p in parts) == "Hello, world."
            assert len(enclave.evidence_calls) == 2
            enclave.drop_final = True
            with pytest.raises(ChannelError):
                await client.chat.completions.create(messages=USER)

    asyncio.run(main())
    assert enclave.closed
