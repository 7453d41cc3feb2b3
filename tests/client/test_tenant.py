"""The tenant secret the SDK seals into every request (prefix-cache sharing): one random secret per
client instance by default, a shared one with ``tenant=``; and, end to end against the real
``veil serve``, a conversation's second turn is served from its own instance's cache only."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_enclave import FakeEnclave, FakeTransport

from veil.client import Client, ConfigurationError, Policy
from veil.enclave.local_server import LocalServer

USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory) -> FakeEnclave:
    return FakeEnclave(tmp_path_factory.mktemp("sim"))


def _secrets_sent(enclave: FakeEnclave, client: Client, n: int) -> list[bytes]:
    start = len(enclave.requests)
    for _ in range(n):
        client.chat.completions.create(messages=USER)
    return [r.tenant_secret for r in enclave.requests[start:]]


def test_one_random_tenant_per_instance_unless_told(enclave: FakeEnclave) -> None:
    policy = Policy.simulated(enclave.root_pem)
    a = _secrets_sent(enclave, Client(transport=FakeTransport(enclave), policy=policy), 2)
    b = _secrets_sent(enclave, Client(transport=FakeTransport(enclave), policy=policy), 1)
    assert len(a[0]) == 32 and a[0] == a[1]  # every request of one instance: one tenant
    assert b[0] != a[0]  # another instance: another tenant
    shared = secrets.token_hex(16)
    c = _secrets_sent(enclave, Client(transport=FakeTransport(enclave), policy=policy, tenant=shared), 1)
    d = _secrets_sent(enclave, Client(transport=FakeTransport(enclave), policy=policy, tenant=shared), 1)
    assert c == d and len(c[0]) == 32 and c[0] != shared.encode()  # sent as a fixed-size derivation


@pytest.mark.parametrize("bad", ["short", b"", b"x" * 15, 42])
def test_a_guessable_tenant_is_refused(enclave: FakeEnclave, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="tenant"):
        Client(transport=FakeTransport(enclave), policy=Policy.simulated(enclave.root_pem), tenant=bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    base = tmp_path_factory.mktemp("tenant")
    with LocalServer(base / "state", log_dir=base / "logs") as srv:
        yield srv


def _turn(client: Client, messages: list[dict[str, str]]) -> tuple[str, int]:
    reply = client.chat.completions.create(messages=messages, max_tokens=8, temperature=0.0)
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.cached_tokens


@pytest.mark.slow
def test_second_turn_hits_only_its_own_tenant_cache(server: LocalServer, tmp_path: Path) -> None:
    """The default data policy allows sharing within a tenant: no configuration needed."""
    policy = Policy.simulated(server.root_pem)
    system = {
        "role": "system",
        "content": "You are a concise assistant for a library. Answer in one sentence and cite the shelf "
        "number when you know it; say so plainly when you do not know.",
    }
    turn1 = [system, {"role": "user", "content": "Where are the atlases?"}]
    with Client(server.address, policy=policy) as mine, Client(server.address, policy=policy) as other:
        answer, cached1 = _turn(mine, turn1)
        turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And maps?"}]
        _, cached2 = _turn(mine, turn2)
        _, cached_other = _turn(other, turn2)
    assert cached1 == 0
    assert cached2 >= 32  # the system prompt and the first question came from the cache
    assert cached_other == 0  # another instance never reads this one's cache
    shared = secrets.token_hex(16)
    with (
        Client(server.address, policy=policy, tenant=shared) as x,
        Client(server.address, policy=policy, tenant=shared) as y,
    ):
        _turn(x, turn2)
        _, cached_y = _turn(y, turn2)
    assert cached_y >= 32  # tenant= shares across instances


@pytest.mark.slow
def test_a_policy_without_sharing_caches_nothing(tmp_path: Path) -> None:
    """``share_kv_within_tenant = false`` in the attested policy: even one instance's turns share nothing."""
    from importlib import resources

    text = resources.files("veil.enclave").joinpath("data_policy.toml").read_text()
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(text.replace("share_kv_within_tenant = true", "share_kv_within_tenant = false"))
    turn = [{"role": "user", "content": "Please list the colours of the rainbow, one per line, in order."}]
    with (
        LocalServer(tmp_path / "state", extra_args=["--data-policy", str(policy_file)]) as srv,
        Client(srv.address, policy=Policy.simulated(srv.root_pem)) as client,
    ):
        _turn(client, turn)
        _, cached = _turn(client, turn)
    assert cached == 0
