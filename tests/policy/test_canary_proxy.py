"""Data-handling policy, ``veil proxy``: a canary prompt is never logged or written by the proxy.

The proxy runs as ``veil proxy`` in a subprocess with its own empty ``TMPDIR`` and ``HOME`` in
front of a real ``veil serve --tee simulated``. The official ``openai`` client sends a random
marker in the system and user messages (and asks for it back) through every route that carries
text: chat streamed and not, structured output, a text completion, and requests the proxy refuses
(an unsupported parameter, a bad ``response_format`` schema). Afterwards the marker and the
answers are searched for in the proxy's stdout and stderr and in every file of its ``TMPDIR`` and
``HOME``; the proxy must still have logged each request (method, path, status).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from veil.client.proxy.local import LocalProxy
from veil.enclave.local_server import LocalServer

pytestmark = pytest.mark.slow


@dataclass
class ProxyRun:
    marker: str
    proxy: LocalProxy
    home: Path
    tmpdir: Path
    answers: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyRun]:
    base = tmp_path_factory.mktemp("canary-proxy")
    home, tmpdir = base / "home", base / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    marker = f"CANARY{secrets.token_hex(6)}"
    with (
        LocalServer(base / "state", log_dir=base / "server-logs") as server,
        LocalProxy(
            [server.address],
            log_dir=base / "proxy-logs",
            args=["--trust-simulated", str(server.root_pem)],
            env={"HOME": str(home), "TMPDIR": str(tmpdir)},
        ) as proxy,
    ):
        r = ProxyRun(marker, proxy, home, tmpdir)
        _exercise(r)
        yield r


def _exercise(r: ProxyRun) -> None:
    oai = openai.OpenAI(base_url=f"{r.proxy.base_url}/v1", api_key="unused", max_retries=0)
    model = oai.models.list().data[0].id
    messages = [
        {"role": "system", "content": f"The secret word is {r.marker}."},
        {"role": "user", "content": f"Repeat exactly, twice: {r.marker}"},
    ]
    reply = oai.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    r.answers.append(reply.choices[0].message.content or "")
    stream = oai.chat.completions.create(model=model, messages=messages, max_tokens=24, stream=True)  # type: ignore[arg-type]
    r.answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    structured = oai.chat.completions.create(  # type: ignore[call-overload]
        model=model, messages=messages, max_tokens=32, response_format={"type": "json_object"}
    )
    r.answers.append(structured.choices[0].message.content or "")
    text = oai.completions.create(model=model, prompt=f"{r.marker} is a word that", max_tokens=16)
    r.answers.append(text.choices[0].text)
    url = f"{r.proxy.base_url}/v1/chat/completions"
    refused = httpx.post(url, json={"messages": messages, "n": 2}, timeout=60)
    assert refused.status_code == 400
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": r.marker}}}
    refused = httpx.post(url, json={"messages": messages, "response_format": bad_schema}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"


def _needles(r: ProxyRun) -> list[str]:
    needles = [r.marker]
    for answer in r.answers:
        # every 12-character piece of an answer that is not mostly JSON punctuation
        needles += [
            p
            for p in (answer[i : i + 12] for i in range(0, max(1, len(answer) - 11), 4))
            if len(p.strip()) >= 10
        ]
    return needles


def test_the_proxy_logs_requests_but_no_text(run: ProxyRun) -> None:
    logged = run.proxy.output()
    assert logged.count("POST /v1/chat/completions 200") >= 3 and "POST /v1/completions 200" in logged
    assert "POST /v1/chat/completions 400" in logged
    assert any(run.answers), "the model answered nothing: the search below would prove little"
    for needle in _needles(run):
        assert needle not in logged, "the proxy logged prompt or completion text"


def test_the_proxy_writes_no_text_to_home_or_temp(run: ProxyRun) -> None:
    needles = [n.encode() for n in _needles(run)]
    for root in (run.home, run.tmpdir):
        for path in root.rglob("*"):
            if path.is_file():
                blob = path.read_bytes()
                assert not any(n in blob for n in needles), f"text in {path}"
