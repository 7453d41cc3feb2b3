"""``veil proxy`` in process: the parameter table, the error objects, SSE framing, over raw HTTP.

The app runs under Starlette's test client with the SDK's in-process enclave (real keys,
simulated TEE, real channel crypto, canned model); ``test_proxy_e2e.py`` runs the real
``veil proxy`` in front of a real ``veil serve`` with the official ``openai`` client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_enclave import MODEL, FakeAsyncTransport, FakeEnclave
from starlette.testclient import TestClient

from veil import cli
from veil.client import (
    AsyncClient,
    AttestationError,
    ChannelError,
    ConfigurationError,
    Policy,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
)
from veil.client.proxy._app import create_app
from veil.client.proxy._openai import error_response
from veil.client.proxy._params import CHAT_PARAMS, COMPLETION_PARAMS, ProxyRequestError, translate
from veil.client.proxy.cli import is_loopback
from veil.proto.v1 import generate_pb2

USER = [{"role": "user", "content": "Say hello"}]
ATTESTED = f"sha256:{MODEL.hex()}"


# ---- the parameter table (pure)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"n": True}, "n"),  # a bool is not the neutral 1
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"best_of": 3}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"stream_options": {"other": 1}, "stream": True}, "stream_options"),
        ({"stream": "yes"}, "stream"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyRequestError) as info:
        translate({"messages": USER, **extra}, CHAT_PARAMS)
    assert info.value.param == param and info.value.status == 400
    assert param in info.value.message


def test_neutral_values_ask_for_nothing_and_are_accepted() -> None:
    req = translate(
        {
            "model": "m", "messages": USER, "n": 1, "logprobs": False, "presence_penalty": 0,
            "frequency_penalty": 0.0, "tools": [], "response_format": {"type": "text"}, "logit_bias": {},
            "user": "alice", "top_p": None, "max_completion_tokens": 7, "seed": 3, "stop": ["\n"],
            "stream": True, "stream_options": {"include_usage": True},
        },
        CHAT_PARAMS,
    )  # fmt: skip
    assert req.kwargs == {
        "messages": USER, "max_tokens": 7, "seed": 3, "stop": ["\n"], "response_format": {"type": "text"}
    }  # fmt: skip
    assert (req.model, req.stream, req.include_usage) == ("m", True, True)


def test_response_format_goes_to_the_sdk_as_sent() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}}
    req = translate({"messages": USER, "response_format": fmt}, CHAT_PARAMS)
    assert req.kwargs["response_format"] == fmt


def test_messages_text_parts_are_joined_and_developer_is_system() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
        ]
    }
    req = translate(body, CHAT_PARAMS)
    assert req.kwargs["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(ProxyRequestError) as info:
        translate({"messages": [image]}, CHAT_PARAMS)
    assert info.value.param == "messages[0].content"
    with pytest.raises(ProxyRequestError) as info:
        translate({"messages": [{"role": "assistant", "content": None, "tool_calls": []}]}, CHAT_PARAMS)
    assert info.value.param == "messages[0].tool_calls"


def test_required_fields_and_body_shape() -> None:
    with pytest.raises(ProxyRequestError, match="messages"):
        translate({"model": "m"}, CHAT_PARAMS)
    with pytest.raises(ProxyRequestError, match="prompt"):
        translate({"model": "m"}, COMPLETION_PARAMS)
    with pytest.raises(ProxyRequestError, match="JSON object"):
        translate([1, 2], CHAT_PARAMS)
    with pytest.raises(ProxyRequestError) as info:
        translate({"prompt": "x", "echo": True}, COMPLETION_PARAMS)
    assert info.value.param == "echo"


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (ConfigurationError("temperature must be a finite number >= 0, got -1"), 400, "invalid_request_error"),  # noqa: E501
        (AttestationError("evidence rejected", ["snp.signature", "policy.model_digest"]), 502, "attestation_error"),  # noqa: E501
        (ChannelError("stream ended without FINAL"), 502, "channel_error"),
        (StreamInterruptedError("UNAVAILABLE", "Socket closed", target="a:1"), 502, "stream_interrupted"),
        (RequestRejectedError("PROMPT_TOO_LONG", "too long"), 400, "invalid_request_error"),
        (RequestRejectedError("INTERNAL", "boom"), 500, "server_error"),
        (ServerError("RESOURCE_EXHAUSTED", "busy", retry_after=1.2), 429, "rate_limit_error"),
        (ServerError("UNAVAILABLE", "down"), 503, "server_error"),
        (ServerError("DEADLINE_EXCEEDED", "slow"), 504, "server_error"),
        (ServerError("INTERNAL", "x"), 502, "server_error"),
    ],
)  # fmt: skip
def test_sdk_errors_map_to_openai_error_objects(exc: Exception, status: int, kind: str) -> None:
    got_status, body, headers = error_response(exc)  # type: ignore[arg-type]
    assert got_status == status
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind
    if isinstance(exc, AttestationError):
        assert body["error"]["failed_checks"] == ["snp.signature", "policy.model_digest"]
        assert "snp.signature" in body["error"]["message"]
    if status == 429:
        assert headers == {"Retry-After": "2"}
    if isinstance(exc, ConfigurationError):
        assert body["error"]["param"] == "temperature"


def test_loopback_rule() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_non_loopback_host_without_api_key_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VEIL_PROXY_API_KEY", raising=False)
    code = cli.main(["proxy", "127.0.0.1:1", "--port", "0", "--host", "0.0.0.0"])
    assert code == 2
    assert "without an API key" in capsys.readouterr().err


# ---- the app over raw HTTP, with the in-process enclave


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture
def enclave(state_dir: Path) -> FakeEnclave:
    return FakeEnclave(state_dir)


def _http(enclave: FakeEnclave, policy: Policy, api_key: str | None = None) -> TestClient:
    app = create_app(
        lambda: AsyncClient(transport=FakeAsyncTransport(enclave), policy=policy), api_key=api_key
    )
    return TestClient(app)


@pytest.fixture
def http(enclave: FakeEnclave) -> Iterator[TestClient]:
    with _http(enclave, Policy.simulated(enclave.root_pem)) as client:
        yield client


def _events(body: str) -> list[str]:
    assert body.endswith("\n\n"), "every event ends with a blank line"
    return body[:-2].split("\n\n")


def test_chat_completion_json(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json={"model": ATTESTED, "messages": USER, "seed": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == ATTESTED
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, world."},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_sse_framing_with_usage(http: TestClient) -> None:
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    *content, usage = chunks
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == "Hello, world."
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None and c["object"] == "chat.completion.chunk" for c in content)
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert len({c["id"] for c in chunks}) == 1


def test_sse_without_usage_has_no_usage_field(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    chunks = [json.loads(e[len("data: ") :]) for e in _events(r.text)[:-1]]
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_cut_short_ends_with_an_error_event_never_done(enclave: FakeEnclave, http: TestClient) -> None:
    enclave.drop_final = True
    r = http.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    assert r.status_code == 200  # the status was sent with the first byte
    events = _events(r.text)
    assert "data: [DONE]" not in events
    last = events[-1]
    assert last.startswith("event: error\ndata: ")
    error = json.loads(last.split("data: ", 1)[1])["error"]
    assert error["type"] == "channel_error" and "FINAL" in error["message"]


def test_non_streamed_answer_cut_short_is_a_502(enclave: FakeEnclave, http: TestClient) -> None:
    enclave.drop_final = True
    r = http.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 502 and r.json()["error"]["type"] == "channel_error"


def test_attestation_failure_is_a_502_naming_the_checks(enclave: FakeEnclave, tmp_path: Path) -> None:
    other = FakeEnclave(tmp_path / "other")  # another simulation root: this enclave's evidence is foreign
    with _http(enclave, Policy.simulated(other.root_pem)) as http:
        for r in (http.post("/v1/chat/completions", json={"messages": USER}), http.get("/v1/models")):
            assert r.status_code == 502
            error = r.json()["error"]
            assert error["type"] == "attestation_error" and error["failed_checks"]
            assert all(check in error["message"] for check in error["failed_checks"])
        replicas = http.get("/veil/attestation").json()["data"]
        assert replicas[0]["state"] == "refused" and replicas[0]["failed_checks"] == error["failed_checks"]
        assert http.get("/health").status_code == 503
    assert enclave.requests == []  # nothing was sent to an enclave that failed attestation


def test_models_and_wrong_model(http: TestClient) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    (entry,) = models["data"]
    assert entry["id"] == ATTESTED and entry["object"] == "model" and entry["owned_by"] == "veil"
    assert entry["veil"]["model_digest"] == MODEL.hex() and entry["veil"]["platform"] == "SIMULATED_SEV_SNP"
    assert http.get(f"/v1/models/{ATTESTED}").json()["id"] == ATTESTED
    r = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


def test_http_errors_are_openai_error_objects(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", json={"messages": USER, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = http.post("/v1/chat/completions", json={"messages": USER, "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_rejection_inside_the_stream_maps_to_context_length(enclave: FakeEnclave, http: TestClient) -> None:
    enclave.reject = (generate_pb2.ChunkError.CODE_PROMPT_TOO_LONG, "prompt has 9000 tokens, limit 2048")
    r = http.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_text_completions(enclave: FakeEnclave, http: TestClient) -> None:
    r = http.post("/v1/completions", json={"model": ATTESTED, "prompt": "Once upon", "max_tokens": 2})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello, " and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    r = http.post(
        "/v1/completions", json={"prompt": "Once", "stream": True, "stream_options": {"include_usage": True}}
    )
    events = _events(r.text)
    assert events[-1] == "data: [DONE]"
    pieces = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in pieces[:-1]) == "Hello, world."
    assert pieces[-1]["usage"]["completion_tokens"] == 4
    assert [r.prompt for r in enclave.requests] == ["Once upon", "Once"]
    assert enclave.requests[0].params.max_tokens == 2


def test_api_key_guards_everything_but_health(enclave: FakeEnclave) -> None:
    with _http(enclave, Policy.simulated(enclave.root_pem), api_key="s3cret") as http:
        assert http.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/veil/attestation").status_code == 401
        ok = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    assert enclave.requests == []


def test_attestation_route_lists_every_check(http: TestClient) -> None:
    (replica,) = http.get("/veil/attestation").json()["data"]
    assert replica["state"] == "ready" and replica["model"] == ATTESTED
    checks = replica["verdict"]["checks"]
    assert checks and all(c["status"] in ("pass", "skip") for c in checks)
    assert replica["identity"]["model_digest"] == MODEL.hex()


def test_without_the_proxy_extra_the_command_names_it() -> None:
    """`import veil.client` loads no web stack; `veil proxy` without it exits 2 naming the extra."""
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "import veil.client\n"
        "assert not [m for m, v in sys.modules.items() if v and m.split('.')[0] in ('starlette', 'uvicorn')]\n"  # noqa: E501
        "from veil.cli import main\n"
        "sys.exit(main(['proxy', '127.0.0.1:1', '--port', '0']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'veil[proxy]'" in result.stderr and result.stderr.count("\n") == 1
