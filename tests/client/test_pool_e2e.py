"""The replica pool against real ``veil serve --tee simulated`` processes on loopback.

Three replicas of one release (they share one simulation identity, as replicas of one
confidential-VM image share the vendor's roots and the release manifest), and a fourth that
serves another model (the embedded GGUF with bytes appended: another weights digest). One of
the three is killed with SIGKILL while it streams: that request fails typed and is not sent
again; new requests keep succeeding on the others. The odd replica is refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from veil.client import Client, Policy, StreamInterruptedError
from veil.client.proxy.local import LocalProxy
from veil.enclave.local_server import LocalServer
from veil.enclave.model.loader import default_model_path

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
SHARED = ("simulation", "simulation-root.pem", "simulation-publisher.pub")


def _share_identity(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for name in SHARED:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, target / name)
        else:
            shutil.copy2(src, target / name)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalServer]]:
    base = tmp_path_factory.mktemp("pool")
    first = LocalServer(base / "state0", log_dir=base / "logs0").start()
    odd_model = base / "other-model.gguf"
    shutil.copyfile(default_model_path(), odd_model)
    with open(odd_model, "ab") as f:
        f.write(bytes(32))  # same weights, another file digest: another model as far as pinning goes
    servers = [first]
    for i in (1, 2, 3):
        _share_identity(first.state_dir, base / f"state{i}")
        extra = ["--model", str(odd_model)] if i == 3 else []
        servers.append(LocalServer(base / f"state{i}", log_dir=base / f"logs{i}", extra_args=extra))
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda s: s.start(timeout=300), servers[1:]))
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_pool_survives_a_killed_replica_and_refuses_another_model(
    replicas: list[LocalServer], tmp_path: Path
) -> None:
    good, odd = replicas[:3], replicas[3]
    policy = Policy.simulated(good[0].root_pem)
    targets = [s.address for s in replicas]
    with Client(targets, policy=policy) as client:
        client.attest()
        states = {s.target: s for s in client.replicas}
        assert [states[s.address].state for s in good] == ["ready"] * 3
        refused = states[odd.address]
        assert refused.state == "refused" and refused.failed_checks  # the release names one model only
        assert refused.verdict is not None and not refused.verdict.ok

        stream = client.chat.completions.create(messages=QUESTION, max_tokens=400, stream=True, temperature=0)
        busy = [s.target for s in client.replicas if s.in_flight]
        assert len(busy) == 1
        victim = next(s for s in good if s.address == busy[0])
        chunks = iter(stream)
        next(chunks)  # the stream has started
        assert victim.process is not None
        victim.process.kill()
        with pytest.raises(StreamInterruptedError) as info:
            for _ in chunks:
                pass
        assert info.value.target == victim.address and info.value.code

        served = 0
        for _ in range(4):  # new requests keep succeeding on the two left
            reply = client.chat.completions.create(messages=QUESTION, max_tokens=4, temperature=0)
            served += bool(reply.choices[0].message.content)
        assert served == 4
        after = {s.target: s for s in client.replicas}
        lost = after[victim.address]
        assert lost.state in ("backoff", "recovering") and lost.error and lost.in_flight == 0
        assert sum(s.in_flight for s in client.replicas) == 0


def test_pinning_refuses_another_model_even_when_the_policy_allows_it(replicas: list[LocalServer]) -> None:
    good, odd = replicas[0], replicas[3]
    live = [s for s in replicas[:3] if s.process is not None and s.process.poll() is None]
    lenient = Policy.simulated(good.root_pem)
    odd_digest = Policy.simulated(odd.root_pem).model_digests  # the odd replica's own release
    policy = lenient.replace(model_digests=lenient.model_digests | odd_digest)
    with Client([live[0].address, odd.address], policy=policy) as client:
        client.attest()
        first, second = client.replicas
        assert first.state == "ready"
        assert second.state == "refused" and second.failed_checks == ("pin.model_digest",)


def test_proxy_over_the_pool_reports_every_replica(replicas: list[LocalServer], tmp_path: Path) -> None:
    live = [s for s in replicas[:3] if s.process is not None and s.process.poll() is None]
    targets = [s.address for s in live] + [replicas[3].address]
    args = ["--trust-simulated", str(replicas[0].root_pem)]
    with LocalProxy(targets, log_dir=tmp_path, args=args) as proxy:
        report = httpx.get(f"{proxy.base_url}/veil/attestation", timeout=120).json()["data"]
        assert [r["target"] for r in report] == targets
        assert [r["state"] for r in report] == ["ready"] * len(live) + ["refused"]
        assert report[-1]["failed_checks"] and report[-1]["verdict"]["ok"] is False
        models = httpx.get(f"{proxy.base_url}/v1/models", timeout=120).json()["data"]
        assert len(models) == 1
        body = {"messages": QUESTION, "max_tokens": 4, "temperature": 0}
        for _ in range(3):
            r = httpx.post(f"{proxy.base_url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200
