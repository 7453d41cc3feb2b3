"""The official ``openai`` client against the real ``veil proxy`` in front of a real ``veil serve``.

Both run as subprocesses on loopback (``veil serve --tee simulated`` with the embedded model);
the proxy is started exactly as the README says. What the ``openai`` client gets must equal what
the Veil SDK gets for the same seeded request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from veil.client import Client, Policy
from veil.client.proxy.local import LocalProxy
from veil.demo.relay import Relay
from veil.enclave.local_server import LocalServer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Name three colours."}]
SEEDED = {"max_tokens": 12, "temperature": 0.8, "seed": 7}
GENERATE = "/veil.v1.InferenceService/Generate"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    base = tmp_path_factory.mktemp("proxy-e2e")
    with LocalServer(base / "state", log_dir=base / "logs") as srv:
        yield srv


@pytest.fixture(scope="module")
def proxy(server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProxy]:
    log_dir = tmp_path_factory.mktemp("proxy-logs")
    with LocalProxy([server.address], log_dir=log_dir, args=["--trust-simulated", str(server.root_pem)]) as p:
        yield p


@pytest.fixture(scope="module")
def sdk(server: LocalServer) -> Iterator[Client]:
    with Client(server.address, policy=Policy.simulated(server.root_pem)) as client:
        yield client


def _oai(proxy: LocalProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.base_url}/v1", api_key="unused", max_retries=0)


def test_models_list_names_the_attested_model(proxy: LocalProxy, sdk: Client) -> None:
    models = _oai(proxy).models.list()
    (model,) = models.data
    sdk.attest()
    assert sdk.claims is not None
    assert model.id == f"sha256:{sdk.claims.model_digest.hex()}"
    assert model.owned_by == "veil"


def test_sync_chat_matches_the_sdk(proxy: LocalProxy, sdk: Client) -> None:
    oai = _oai(proxy)
    model = oai.models.list().data[0].id
    reply = oai.chat.completions.create(model=model, messages=QUESTION, **SEEDED)  # type: ignore[arg-type]
    expected = sdk.chat.completions.create(messages=QUESTION, **SEEDED)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == expected.choices[0].finish_reason
    assert reply.usage is not None and expected.usage is not None
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.model == model

    stream = oai.chat.completions.create(
        model=model, messages=QUESTION, stream=True, stream_options={"include_usage": True}, **SEEDED,  # type: ignore[arg-type]
    )  # fmt: skip
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == reply.choices[0].message.content
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_async_chat_matches_the_sdk(proxy: LocalProxy, sdk: Client) -> None:
    expected = sdk.chat.completions.create(messages=QUESTION, **SEEDED).choices[0].message.content  # type: ignore[arg-type]

    async def main() -> tuple[str | None, str, object]:
        oai = openai.AsyncOpenAI(base_url=f"{proxy.base_url}/v1", api_key="unused", max_retries=0)
        async with oai:
            model = (await oai.models.list()).data[0].id
            whole = await oai.chat.completions.create(model=model, messages=QUESTION, **SEEDED)  # type: ignore[arg-type]
            stream = await oai.chat.completions.create(model=model, messages=QUESTION, stream=True, **SEEDED)  # type: ignore[arg-type]
            parts = [c.choices[0].delta.content or "" async for c in stream]
            return whole.choices[0].message.content, "".join(parts), whole.usage

    whole, streamed, usage = asyncio.run(main())
    assert whole == expected and streamed == expected
    assert usage is not None


def test_text_completion_matches_the_sdk(proxy: LocalProxy, sdk: Client) -> None:
    oai = _oai(proxy)
    model = oai.models.list().data[0].id
    reply = oai.completions.create(model=model, prompt="The capital of France is", **SEEDED)  # type: ignore[arg-type]
    expected = sdk.completions.create(prompt="The capital of France is", **SEEDED)  # type: ignore[arg-type]
    assert reply.choices[0].text == expected.choices[0].text  # type: ignore[union-attr]
    assert reply.usage is not None and reply.usage.completion_tokens > 0


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_structured_output_through_the_openai_client(proxy: LocalProxy) -> None:
    oai = _oai(proxy)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    question = [{"role": "user", "content": "Describe a person as JSON."}]
    model = oai.models.list().data[0].id
    reply = oai.chat.completions.create(  # type: ignore[call-overload]
        model=model, messages=question, response_format=fmt, max_tokens=48, seed=1
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    stream = oai.chat.completions.create(  # type: ignore[call-overload]
        messages=question, model=model, response_format=fmt, max_tokens=96, temperature=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "stop"  # else the JSON may be cut short (documented)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), PERSON)
    bad = {"type": "json_object", "unexpected": 1}  # the SDK checks the shape: a 400 naming it
    with pytest.raises(openai.BadRequestError, match="response_format"):
        oai.chat.completions.create(model=model, messages=question, response_format=bad)  # type: ignore[call-overload]


def test_raw_sse_framing_and_errors(proxy: LocalProxy) -> None:
    body = {"messages": QUESTION, "stream": True, "max_tokens": 6}
    with httpx.stream("POST", f"{proxy.base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"
    r = httpx.post(f"{proxy.base_url}/v1/chat/completions", json={"messages": QUESTION, "tools": [{"x": 1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    bad = {"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}
    r = httpx.post(f"{proxy.base_url}/v1/chat/completions", json=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    health = httpx.get(f"{proxy.base_url}/health").json()
    assert health["status"] == "ok"
    (replica,) = httpx.get(f"{proxy.base_url}/veil/attestation").json()["data"]
    assert replica["state"] == "ready" and replica["verdict"]["ok"] is True


class DropFinal:
    """Hold back each Generate message until the next; drop the last (FINAL) one."""

    def __init__(self) -> None:
        self.held: bytes | None = None

    def on_message(self, path: str, index: int, data: bytes) -> list[bytes]:
        if path != GENERATE:
            return [data]
        out = [] if self.held is None else [self.held]
        self.held = data
        return out

    def on_end(self, path: str) -> list[bytes]:
        self.held = None
        return []


def test_stream_cut_short_by_the_channel_is_an_sse_error(server: LocalServer, tmp_path: Path) -> None:
    with Relay((server.host, server.port)) as relay:
        relay.rewriter = DropFinal()
        args = ["--trust-simulated", str(server.root_pem)]
        with LocalProxy([relay.address], log_dir=tmp_path, args=args) as proxy:
            body = {"messages": QUESTION, "stream": True, "max_tokens": 4}
            raw = httpx.post(f"{proxy.base_url}/v1/chat/completions", json=body, timeout=120).text
            assert "data: [DONE]" not in raw
            last = raw.rstrip("\n").split("\n\n")[-1]
            assert last.startswith("event: error\ndata: ")
            assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "channel_error"
            # the official client raises it, rather than returning a short answer
            oai = _oai(proxy)
            model = oai.models.list().data[0].id
            with pytest.raises(openai.APIError, match="FINAL"):
                list(oai.chat.completions.create(model=model, messages=QUESTION, stream=True, max_tokens=4))  # type: ignore[arg-type]


def test_proxy_logs_no_prompt_or_completion_text(proxy: LocalProxy) -> None:
    canary = "CANARY-7f3e9b21-ocelot"
    oai = _oai(proxy)
    model = oai.models.list().data[0].id
    messages = [{"role": "user", "content": f"Repeat exactly: {canary}"}]
    reply = oai.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    text = reply.choices[0].message.content or ""
    list(
        oai.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True)
    )  # type: ignore[arg-type]
    httpx.post(f"{proxy.base_url}/v1/chat/completions", json={"messages": messages, "n": 2})  # an error, too
    logged = proxy.output()
    assert "POST /v1/chat/completions 200" in logged  # it does log requests
    assert canary not in logged and "ocelot" not in logged
    assert len(text) > 8 and text not in logged  # nor the answer
