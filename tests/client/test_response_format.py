"""``create(response_format=...)``: the OpenAI shapes, sealed into the request (field 8), and errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fake_enclave import FakeAsyncTransport, FakeEnclave, FakeTransport

from veil.client import AsyncClient, Client, ConfigurationError, Policy, RequestRejectedError
from veil.client._response_format import check_response_format
from veil.proto.v1 import generate_pb2

USER = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture
def enclave(state_dir: Path) -> FakeEnclave:
    return FakeEnclave(state_dir)


@pytest.fixture
def client(enclave: FakeEnclave) -> Client:
    return Client(transport=FakeTransport(enclave), policy=Policy.simulated(enclave.root_pem))


def test_json_schema_is_sealed_into_the_request(enclave: FakeEnclave, client: Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    client.chat.completions.create(messages=USER, response_format=fmt)
    (request,) = enclave.requests  # what the enclave opened from the sealed request
    assert request.HasField("response_format")
    assert request.response_format.WhichOneof("format") == "json_schema"
    assert json.loads(request.response_format.json_schema) == PERSON
    assert list(json.loads(request.response_format.json_schema)["properties"]) == [
        "name",
        "age",
    ]  # order kept
    assert request.response_format.name == "person"


def test_json_object_text_and_grammar(enclave: FakeEnclave, client: Client) -> None:
    client.chat.completions.create(messages=USER, response_format={"type": "json_object"})
    client.chat.completions.create(messages=USER, response_format={"type": "text"})
    client.chat.completions.create(messages=USER)
    client.chat.completions.create(
        messages=USER, response_format={"type": "grammar", "grammar": 'start: "a"'}
    )
    first, text, none, grammar = enclave.requests
    assert first.response_format.WhichOneof("format") == "json_object"
    assert not text.HasField("response_format") and not none.HasField("response_format")
    assert grammar.response_format.lark_grammar == 'start: "a"'


def test_schema_given_as_json_text(enclave: FakeEnclave, client: Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": json.dumps(PERSON)}}
    client.chat.completions.create(messages=USER, response_format=fmt, stream=True).close()
    assert json.loads(enclave.requests[0].response_format.json_schema) == PERSON


def test_pydantic_model_class_becomes_its_json_schema(enclave: FakeEnclave, client: Client) -> None:
    import pydantic  # in the dev lock (the openai client needs it); the SDK itself does not

    class Person(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        age: int

    client.chat.completions.create(messages=USER, response_format=Person)
    sealed = enclave.requests[0].response_format
    assert sealed.name == "Person"
    assert json.loads(sealed.json_schema) == Person.model_json_schema()


def test_async_client_seals_it_too(enclave: FakeEnclave) -> None:
    async def main() -> None:
        policy = Policy.simulated(enclave.root_pem)
        async with AsyncClient(transport=FakeAsyncTransport(enclave), policy=policy) as client:
            await client.chat.completions.create(messages=USER, response_format={"type": "json_object"})

    asyncio.run(main())
    assert enclave.requests[0].response_format.WhichOneof("format") == "json_object"


@pytest.mark.parametrize(
    ("fmt", "match"),
    [
        ("json", "must be a dict"),
        ({"type": "xml"}, "type must be"),
        ({"type": "json_schema"}, "needs"),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "JSON object"),
        ({"type": "json_schema", "json_schema": {"schema": "{nope"}}, "not valid JSON"),
        ({"type": "json_schema", "json_schema": {"schema": {"x": {1, 2}}}}, "not JSON-serializable"),
        ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "name"),
        ({"type": "grammar", "grammar": ""}, "grammar"),
        ({"type": "json_object", "schema": {}}, "unknown key.*'schema'"),  # not silently ignored
        ({"type": "json_schema", "json_schema": {"schema": {}, "strcit": True}}, "unknown key.*'strcit'"),
        (dict, "must be a dict"),  # a class without model_json_schema
    ],
)
def test_bad_response_formats_send_nothing(
    enclave: FakeEnclave, client: Client, fmt: Any, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        client.chat.completions.create(messages=USER, response_format=fmt)
    assert not enclave.requests


def test_enclave_refusal_is_a_typed_error(enclave: FakeEnclave, client: Client) -> None:
    enclave.reject = (
        generate_pb2.ChunkError.CODE_INVALID_REQUEST,
        'response_format: invalid or unsupported JSON Schema: Unimplemented keys: ["not"]',
    )
    with pytest.raises(RequestRejectedError) as info:
        client.chat.completions.create(messages=USER, response_format={"type": "json_object"})
    assert info.value.code == "INVALID_REQUEST" and "Unimplemented keys" in str(info.value)


def test_check_response_format_is_pure() -> None:
    assert check_response_format(None) is None
    sealed = check_response_format({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}})
    assert sealed is not None and sealed.name == "" and sealed.json_schema == '{"type": "object"}'
