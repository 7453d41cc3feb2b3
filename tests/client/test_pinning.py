"""Key pinning that cannot wander: re-attestation must land on the pinned identity; keys expire.

Against the in-process fake enclave (real keys, simulated TEE, real channel crypto).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fake_enclave import BUILD, DATA_POLICY, MODEL, FakeAsyncTransport, FakeEnclave, FakeTransport

from veil.client import AsyncClient, AttestationError, Client, ConfigurationError, EnclaveIdentity, Policy
from veil.enclave.keys import measurement_from_build_digest

USER = [{"role": "user", "content": "Say hello"}]
OTHER_MODEL = hashlib.sha256(b"another model").digest()
OTHER_BUILD = hashlib.sha256(b"another build").digest()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture
def enclave(state_dir: Path) -> FakeEnclave:
    return FakeEnclave(state_dir)


@pytest.fixture
def policy(enclave: FakeEnclave) -> Policy:
    """A policy that accepts both models and both builds: pinning, not the policy, must refuse
    the switch (the simulator's launch measurement is the build digest, zero-padded)."""
    return Policy.simulated(
        enclave.root_pem,
        model_digests=[MODEL, OTHER_MODEL],
        build_digests=[BUILD, OTHER_BUILD],
        measurements=[measurement_from_build_digest(BUILD), measurement_from_build_digest(OTHER_BUILD)],
        data_policy_digest=DATA_POLICY,
    )


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_identity_is_pinned_on_first_attestation(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    assert client.identity is None and client.key_ttl == timedelta(hours=1)
    client.attest()
    identity = client.identity
    assert isinstance(identity, EnclaveIdentity)
    fields = identity.fields()
    assert fields["platform"] == "SIMULATED_SEV_SNP"
    assert fields["model_digest"] == MODEL.hex()
    assert fields["server_build_digest"] == BUILD.hex()
    assert fields["data_policy_digest"] == DATA_POLICY.hex()
    assert fields["measurement"] == BUILD.hex() + "00" * 16  # the simulator's launch measurement
    assert "host_data" in fields


def test_restart_with_another_model_is_refused_on_transparent_reattestation(
    enclave: FakeEnclave, policy: Policy
) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    assert client.chat.completions.create(messages=USER).choices[0].message.content == "Hello, world."
    pinned = client.identity
    enclave.restart(model_digest=OTHER_MODEL)  # new key, and the policy would accept this model
    with pytest.raises(AttestationError) as info:
        client.chat.completions.create(messages=USER)
    assert info.value.failed_checks == ("pin.model_digest",)
    assert f"model_digest: {MODEL.hex()} → {OTHER_MODEL.hex()}" in str(info.value)
    assert info.value.verdict is not None and info.value.verdict.ok  # the policy alone accepted it
    assert len(enclave.evidence_calls) == 2
    assert len(enclave.requests) == 1  # nothing was sealed to the new key
    assert client.identity == pinned
    # still refused on the next request, and an explicit attest() is held to the same rule
    with pytest.raises(AttestationError):
        client.chat.completions.create(messages=USER)
    with pytest.raises(AttestationError):
        client.attest()
    assert len(enclave.requests) == 1
    # the same identity under a new key is accepted again
    enclave.restart()
    assert client.chat.completions.create(messages=USER).choices[0].message.content == "Hello, world."


def test_restart_with_another_build_names_every_changed_field(enclave: FakeEnclave, policy: Policy) -> None:
    client = Client(transport=FakeTransport(enclave), policy=policy)
    client.attest()
    enclave.restart(model_digest=OTHER_MODEL, build_digest=OTHER_BUILD)
    with pytest.raises(AttestationError) as info:
        list(client.chat.completions.create(messages=USER, stream=True))
    assert info.value.failed_checks == ("pin.measurement", "pin.server_build_digest", "pin.model_digest")
    message = str(info.value)
    assert f"server_build_digest: {BUILD.hex()} → {OTHER_BUILD.hex()}" in message
    assert f"measurement: {BUILD.hex()}" in message


def test_async_restart_with_another_model_is_refused(enclave: FakeEnclave, policy: Policy) -> None:
    async def main() -> None:
        async with AsyncClient(transport=FakeAsyncTransport(enclave), policy=policy) as client:
            await client.chat.completions.create(messages=USER)
            enclave.restart(model_digest=OTHER_MODEL)
            with pytest.raises(AttestationError) as info:
                await client.chat.completions.create(messages=USER, stream=True)
            assert info.value.failed_checks == ("pin.model_digest",)

    asyncio.run(main())
    assert len(enclave.requests) == 1


def test_key_expiry_triggers_exactly_one_reattestation(enclave: FakeEnclave, policy: Policy) -> None:
    clock = Clock()
    client = Client(transport=FakeTransport(enclave), policy=policy, clock=clock, key_ttl=600)
    assert client.key_ttl == timedelta(minutes=10)
    client.chat.completions.create(messages=USER)
    clock.now += timedelta(minutes=9, seconds=59)
    client.chat.completions.create(messages=USER)
    assert len(enclave.evidence_calls) == 1  # still fresh
    clock.now += timedelta(seconds=1)  # exactly key_ttl after verification: expired
    client.chat.completions.create(messages=USER)
    client.chat.completions.create(messages=USER, stream=True).close()
    assert len(enclave.evidence_calls) == 2  # one re-attestation, then the new key is pinned
    assert len(enclave.requests) == 4  # every request sealed once: no stale-key round trip
    # an expired key re-attests onto the pinned identity only
    clock.now += timedelta(hours=1)
    enclave.restart(model_digest=OTHER_MODEL)
    with pytest.raises(AttestationError, match="model_digest"):
        client.chat.completions.create(messages=USER)


def test_async_key_expiry(enclave: FakeEnclave, policy: Policy) -> None:
    clock = Clock()

    async def main() -> None:
        async with AsyncClient(
            transport=FakeAsyncTransport(enclave), policy=policy, clock=clock, key_ttl=timedelta(seconds=30)
        ) as client:
            await client.chat.completions.create(messages=USER)
            clock.now += timedelta(seconds=31)
            await client.chat.completions.create(messages=USER)
            await client.chat.completions.create(messages=USER)

    asyncio.run(main())
    assert len(enclave.evidence_calls) == 2


@pytest.mark.parametrize("bad", [0, -1, timedelta(0), float("inf"), "1h", True, None])
def test_bad_key_ttl(enclave: FakeEnclave, policy: Policy, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="key_ttl"):
        Client(transport=FakeTransport(enclave), policy=policy, key_ttl=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="key_ttl"):
        AsyncClient(transport=FakeAsyncTransport(enclave), policy=policy, key_ttl=bad)  # type: ignore[arg-type]
