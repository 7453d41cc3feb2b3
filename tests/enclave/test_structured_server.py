"""Structured output through the real gRPC server: the schema is sealed, errors come back encrypted."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import grpc
import jsonschema
import pytest
from server_harness import Harness

from veil.attestation.channel.hpke import seal_request
from veil.attestation.channel.stream import StreamDecryptor
from veil.proto.v1 import generate_pb2, service_pb2_grpc

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["colour", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def harness(loaded_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(loaded_model, tmp_path_factory.mktemp("state"))
    yield h
    h.close()


@pytest.fixture(scope="module")
def stub(harness: Harness) -> Iterator[service_pb2_grpc.InferenceServiceStub]:
    server = harness.start_server()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield service_pb2_grpc.InferenceServiceStub(channel)
    harness.stop_server(server)


def _generate(
    harness: Harness, stub: service_pb2_grpc.InferenceServiceStub, fmt: generate_pb2.ResponseFormat
) -> tuple[list[bytes], list[generate_pb2.ResponseChunk]]:
    req = generate_pb2.GenerateRequest(
        request_id=secrets.token_bytes(16),
        response_key=secrets.token_bytes(32),
        chat=generate_pb2.ChatMessages(
            messages=[generate_pb2.ChatMessage(role="user", content="Pick a colour.")]
        ),
        params=generate_pb2.SamplingParams(max_tokens=32, temperature=0.0),
        issued_at_ms=int(time.time() * 1000),
        response_format=fmt,
    )
    call = stub.Generate(seal_request(req, harness.identity.public_key), timeout=120)
    raw = [m.payload for m in call]
    assert call.code() == grpc.StatusCode.OK
    dec = StreamDecryptor(req.response_key, req.request_id, raw[0])
    chunks = [dec.decrypt(p)[0] for p in raw[1:]]
    dec.close()
    return raw, chunks


def test_sealed_schema_answer_validates(
    harness: Harness, stub: service_pb2_grpc.InferenceServiceStub
) -> None:
    canary = f"CANARY{secrets.token_hex(6)}"
    fmt = generate_pb2.ResponseFormat(json_schema=json.dumps({**SCHEMA, "title": canary}), name="pick")
    raw, chunks = _generate(harness, stub, fmt)
    assert all(canary.encode() not in p for p in raw)
    assert chunks[-1].finish_reason == generate_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads("".join(c.text_delta for c in chunks)), SCHEMA)


@pytest.mark.parametrize(
    ("fmt", "problem"),
    [
        (generate_pb2.ResponseFormat(json_schema='{"type": "object", "not": {}}'), "Unimplemented keys"),
        (generate_pb2.ResponseFormat(json_schema="{oops"), "not valid JSON"),
        (generate_pb2.ResponseFormat(lark_grammar="start: nothing_here"), "unknown name"),
        (generate_pb2.ResponseFormat(name="only a name"), "names no format"),
    ],
)
def test_invalid_formats_are_encrypted_invalid_request(
    harness: Harness,
    stub: service_pb2_grpc.InferenceServiceStub,
    fmt: generate_pb2.ResponseFormat,
    problem: str,
) -> None:
    raw, chunks = _generate(harness, stub, fmt)
    (chunk,) = chunks
    assert chunk.error.code == generate_pb2.ChunkError.CODE_INVALID_REQUEST
    assert problem in chunk.error.message
    assert chunk.finish_reason == generate_pb2.FINISH_REASON_ERROR
    assert all(problem.encode() not in p for p in raw)
