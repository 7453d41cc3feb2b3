"""Enclave identity: in-memory HPKE key, claims, build digest."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest

from veil.attestation.binding import Claims, length_prefixed
from veil.attestation.channel.hpke import HpkeSuite, open_request, seal_request
from veil.enclave.errors import EnclaveError
from veil.enclave.keys import (
    BUILD_DIGEST_DOMAIN,
    build_digest,
    build_manifest,
    create_identity,
    measurement_from_build_digest,
)
from veil.proto.v1 import generate_pb2

ROOT = Path(__file__).resolve().parents[2]


def _identity(suite: HpkeSuite = HpkeSuite.MLKEM768_X25519):  # type: ignore[no-untyped-def]
    return create_identity(
        model_digest=b"\x01" * 32,
        engine_version="veil-engine/test",
        data_policy_digest=b"\x02" * 32,
        server_build_digest=build_digest(),
        simulated=True,
        suite=suite,
    )


@pytest.mark.parametrize("suite", list(HpkeSuite))
def test_identity_claims_name_the_key(suite: HpkeSuite) -> None:
    ident = _identity(suite)
    claims = Claims.from_bytes(ident.claims_bytes)
    assert claims == ident.claims
    assert claims.enclave_public_key == ident.public_key.to_bytes()
    assert claims.hpke_suite == suite.value
    assert claims.simulated is True
    assert claims.model_digest == b"\x01" * 32
    assert claims.data_policy_digest == b"\x02" * 32
    req = generate_pb2.GenerateRequest(request_id=b"r" * 16, prompt="hi", response_key=b"k" * 32)
    assert open_request(seal_request(req, ident.public_key), ident.private_key).prompt == "hi"


def test_every_identity_has_a_fresh_key() -> None:
    a, b = _identity(), _identity()
    assert a.key_id != b.key_id
    assert a.claims_bytes != b.claims_bytes


def test_private_key_cannot_be_serialised() -> None:
    ident = _identity()
    with pytest.raises(TypeError):
        pickle.dumps(ident.private_key)
    assert ident.key_id.hex() in repr(ident)
    assert "private" not in repr(ident).lower()


def test_build_digest_matches_its_definition() -> None:
    manifest = build_manifest()
    names = [name for name, _ in manifest]
    assert names == sorted(names)
    assert "veil/enclave/keys.py" in names
    assert "veil/enclave/data_policy.toml" in names
    assert "veil/proto/v1/service.proto" in names
    assert "veil/cli.py" in names and "veil/demo/cli.py" in names
    assert "veil/proto/v1/service_pb2.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    # each entry is the SHA-256 of the file it names
    keys_py = dict(manifest)["veil/enclave/keys.py"]
    keys_file = ROOT / "enclave" / "veil" / "enclave" / "keys.py"
    assert keys_py == hashlib.sha256(keys_file.read_bytes()).digest()
    h = hashlib.sha256(BUILD_DIGEST_DOMAIN)
    for name, digest in manifest:
        h.update(length_prefixed(name.encode()) + digest)
    assert build_digest() == h.digest()
    assert len(build_digest()) == 32


def test_build_digest_changes_with_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "veil_fake_build_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "data.toml").write_text("a = 1\n")
    (pkg / "notes.txt").write_text("not part of the build\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "junk.py").write_text("ignored\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("veil_fake_build_pkg",)
    before = build_digest(names)
    assert [n for n, _ in build_manifest(names)] == [
        "veil_fake_build_pkg/__init__.py",
        "veil_fake_build_pkg/sub/data.toml",
    ]
    (pkg / "notes.txt").write_text("changed, still not part of the build\n")
    assert build_digest(names) == before
    (pkg / "sub" / "data.toml").write_text("a = 2\n")
    assert build_digest(names) != before


def test_measurement_is_the_padded_build_digest() -> None:
    d = build_digest()
    m = measurement_from_build_digest(d)
    assert len(m) == 48 and m[:32] == d and m[32:] == bytes(16)
    with pytest.raises(EnclaveError):
        measurement_from_build_digest(b"short")


def test_missing_package_is_a_typed_error() -> None:
    with pytest.raises(EnclaveError):
        build_digest(("veil.no_such_package",))


def test_build_digest_covers_native_sources_and_binaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "veil_fake_native_pkg"
    (pkg / "cpu").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cpu" / "k.cpp").write_text("int f() { return 1; }\n")
    (pkg / "cpu" / "k.h").write_text("int f();\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("veil_fake_native_pkg",)
    before = build_digest(names)
    (pkg / "cpu" / "k.h").write_text("int f(); // changed\n")
    after_header = build_digest(names)
    assert after_header != before  # a header is part of what runs
    # a compiled module dropped beside the sources is imported before the .py: it changes the digest
    (pkg / "servicers.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    assert build_digest(names) != after_header
    assert [n for n, _ in build_manifest(names)] == [
        "veil_fake_native_pkg/__init__.py",
        "veil_fake_native_pkg/cpu/k.cpp",
        "veil_fake_native_pkg/cpu/k.h",
        "veil_fake_native_pkg/servicers.cpython-311-x86_64-linux-gnu.so",
    ]
    assert BUILD_DIGEST_DOMAIN == b"veil/build/v2"
    names_now = {n for n, _ in build_manifest()}
    assert {
        "veil/kernels/cpu/qmm.cpp",
        "veil/kernels/cpu/fused.cpp",
        "veil/kernels/cpu/common.h",
    } <= names_now
