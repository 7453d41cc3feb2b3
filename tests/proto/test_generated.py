"""The committed generated code equals a fresh run of proto/generate.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "__init__.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("veil_proto_generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = {p.name: p.read_bytes() for p in module.generate(tmp_path / "v1")}
    generated = ROOT / "proto" / "veil" / "proto" / "v1"
    committed = {p.name: p.read_bytes() for p in generated.iterdir() if p.name.endswith(GENERATED)}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make proto`"


def test_services_and_messages_exist() -> None:
    from veil.proto.v1 import evidence_pb2, generate_pb2, service_pb2, service_pb2_grpc

    assert hasattr(service_pb2_grpc, "AttestationServiceStub")
    assert hasattr(service_pb2_grpc, "InferenceServiceStub")
    assert service_pb2.DESCRIPTOR.package == "veil.v1"
    fields = set(evidence_pb2.Evidence.DESCRIPTOR.fields_by_name)
    assert {"platform", "cpu_report", "cpu_cert_chain", "gpus", "enclave_key", "claims"} <= fields
    gen = set(generate_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {"prompt", "chat", "params", "response_key", "request_id", "padding"} <= gen
    chunk = set(generate_pb2.ResponseChunk.DESCRIPTOR.fields_by_name)
    assert {"text_delta", "finish_reason", "usage", "error", "padding"} <= chunk
