"""Structured output end to end: the real ``veil serve --tee simulated``, the real SDK and ``veil chat``.

The schema travels sealed (a canary in it never appears on the wire, through the recording relay);
answers validate; an invalid schema comes back as an encrypted, typed INVALID_REQUEST.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from veil.client import Client, Policy, RequestRejectedError
from veil.demo.relay import Relay
from veil.enclave.local_server import LocalServer

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "Describe a person you met today."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    base = tmp_path_factory.mktemp("structured")
    with LocalServer(base / "state", log_dir=base / "logs") as srv:
        yield srv


def test_sdk_json_schema_over_the_wire(server: LocalServer) -> None:
    canary = f"CANARY{secrets.token_hex(6)}"
    schema = {**PERSON, "description": canary}
    with (
        Relay((server.host, server.port)) as relay,
        Client(relay.address, policy=Policy.simulated(server.root_pem)) as client,
    ):
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
        for temperature in (0.0, 0.9):
            reply = client.chat.completions.create(
                messages=USER, response_format=fmt, max_tokens=64, temperature=temperature, seed=5
            )
            assert reply.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
        streamed = client.chat.completions.create(
            messages=USER, response_format=fmt, max_tokens=64, stream=True
        )
        with streamed:
            text = "".join(c.choices[0].delta.content or "" for c in streamed)
        jsonschema.validate(json.loads(text), PERSON)

        bad = {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}}
        with pytest.raises(RequestRejectedError) as info:
            client.chat.completions.create(messages=USER, response_format=bad)
        assert info.value.code == "INVALID_REQUEST" and "uniqueItems" in str(info.value)
    assert not relay.errors, relay.errors
    wire = bytes(relay.raw["c2s"]) + bytes(relay.raw["s2c"])
    assert relay.messages and canary.encode() not in wire  # the schema travelled sealed


def test_cli_json_schema(server: LocalServer, tmp_path: Path) -> None:
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON))
    args = ["chat", server.address, "Describe a person.", "--trust-simulated", str(server.root_pem)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def veil(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "veil", *args, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)

    ok = veil("--json-schema", str(path), "--temperature", "0", "--max-tokens", "64")
    assert ok.returncode == 0, ok.stderr
    jsonschema.validate(json.loads(ok.stdout), PERSON)
    as_json = veil("--json-schema", str(path), "--json", "--max-tokens", "64", "--seed", "3")
    assert as_json.returncode == 0, as_json.stderr
    jsonschema.validate(json.loads(json.loads(as_json.stdout)["choices"][0]["message"]["content"]), PERSON)

    path.write_text("{not json")
    broken = veil("--json-schema", str(path))
    assert broken.returncode == 2 and "not valid JSON" in broken.stderr and "Traceback" not in broken.stderr
    path.write_text(json.dumps({"type": "foo"}))
    refused = veil("--json-schema", str(path))
    assert refused.returncode == 5 and "Invalid type: foo" in refused.stderr
