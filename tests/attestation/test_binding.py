"""The trust binding, pinned: any change to claims, report_data, gpu_nonce or key_id breaks these."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from veil.attestation.binding import (
    GPU_KIND_GPU,
    GPU_KIND_NVSWITCH,
    Claims,
    gpu_nonce,
    key_id,
    length_prefixed,
    report_data,
)
from veil.attestation.errors import MalformedInputError

PUBLIC_KEY = bytes(range(256)) * 4 + bytes(range(160)) + bytes([0xAA]) * 32  # 1184 + 32 bytes
NONCE = bytes(range(32))


def _claims(**overrides: object) -> Claims:
    fields: dict[str, object] = dict(
        hpke_suite="MLKEM768_X25519/HKDF_SHA256/CHACHA20_POLY1305",
        enclave_public_key=PUBLIC_KEY,
        model_digest=hashlib.sha256(b"model").digest(),
        engine_version="veil-0.1.0",
        data_policy_digest=hashlib.sha256(b"policy").digest(),
        server_build_digest=hashlib.sha256(b"build").digest(),
        simulated=True,
    )
    fields.update(overrides)
    return Claims(**fields)  # type: ignore[arg-type]


def test_claims_canonical_bytes_pinned() -> None:
    # Evidence format 2 (issue #11: GPU kind and index bound into report_data) changed the digest.
    data = _claims().canonical_bytes()
    assert b'"evidence_format_version":2' in data
    assert data.startswith(
        b'{"data_policy_digest":"823412d1eacb67956220e532959f0104603057c88704863ca38e7cd188fda812",'
        b'"enclave_public_key":"000102'
    )
    assert data.endswith(b'"simulated":true}')
    assert b" " not in data
    assert (
        hashlib.sha256(data).hexdigest() == "961825bcda6f7c475d56326e20ad0062f3876ea58ac9d5f74bfbe19337c70983"
    )


def test_key_id_pinned() -> None:
    assert key_id(PUBLIC_KEY).hex() == "c30462f6e7b61c1a2c2565ca6eafa26a"
    assert key_id(PUBLIC_KEY) == hashlib.sha256(PUBLIC_KEY).digest()[:16]


def test_gpu_nonce_pinned() -> None:
    expected = "a65f0ec6396d77bf948d97b97361c711fb319d3975d08b59f899d786fd748cb9"
    assert gpu_nonce(NONCE, PUBLIC_KEY).hex() == expected
    assert hashlib.sha256(b"veil/gpu-nonce/v1" + NONCE + PUBLIC_KEY).hexdigest() == expected


@dataclass(frozen=True)
class Gpu:
    report: bytes
    kind: int = GPU_KIND_GPU
    index: int = 0


def test_report_data_pinned_without_and_with_gpus() -> None:
    # v2 (issue #11): each GPU item binds its kind and index, not only the report's hash.
    claims = _claims().canonical_bytes()
    assert report_data(NONCE, claims).hex() == (
        "5b67b9c02235bf4d55a77a78106cbea02ff9b67bce522b441bf28820ed3d3c53"
        "428bd85737d0fa9a7c381711d545319c5525251b3d467865fbafe71c257650c8"
    )
    gpus = [Gpu(b"gpu-report-0", GPU_KIND_GPU, 0), Gpu(b"gpu-report-1", GPU_KIND_NVSWITCH, 1)]
    got = report_data(NONCE, claims, gpus)
    assert got.hex() == (
        "0fa48c883dda8109c79c7809dc681d673bac31c1cbde55c0ae6a5260244d72c7"
        "dff9f32140bfc38350036bc724b7c3be34f6b72c3ddc17fed862ee2539821f26"
    )
    # The formula, spelled out independently of the implementation.
    manual = hashlib.sha512(
        b"veil/report-data/v2"
        + (32).to_bytes(4, "big")
        + NONCE
        + (32).to_bytes(4, "big")
        + hashlib.sha256(claims).digest()
        + b"".join(
            (37).to_bytes(4, "big")
            + bytes([g.kind])
            + g.index.to_bytes(4, "big")
            + hashlib.sha256(g.report).digest()
            for g in gpus
        )
    ).digest()
    assert got == manual


def test_report_data_depends_on_every_input() -> None:
    claims = _claims().canonical_bytes()
    base = report_data(NONCE, claims, [Gpu(b"a")])
    assert report_data(bytes(32), claims, [Gpu(b"a")]) != base
    assert report_data(NONCE, _claims(engine_version="x").canonical_bytes(), [Gpu(b"a")]) != base
    assert report_data(NONCE, claims, [Gpu(b"b")]) != base
    assert report_data(NONCE, claims, [Gpu(b"a"), Gpu(b"a")]) != base
    assert report_data(NONCE, claims) != base
    # Relabelling a GPU (as an NVSwitch, or under another index) changes what is signed.
    assert report_data(NONCE, claims, [Gpu(b"a", GPU_KIND_NVSWITCH)]) != base
    assert report_data(NONCE, claims, [Gpu(b"a", index=1)]) != base


def test_report_data_refuses_an_unknown_gpu_kind() -> None:
    with pytest.raises(MalformedInputError, match="kind"):
        report_data(NONCE, b"{}", [Gpu(b"a", kind=0)])


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33)])
def test_nonce_must_be_32_bytes(bad: bytes) -> None:
    with pytest.raises(MalformedInputError, match="nonce"):
        report_data(bad, b"{}")
    with pytest.raises(MalformedInputError, match="nonce"):
        gpu_nonce(bad, PUBLIC_KEY)


def test_length_prefix() -> None:
    assert length_prefixed(b"abc") == b"\x00\x00\x00\x03abc"


def test_claims_round_trip_and_strict_parsing() -> None:
    claims = _claims()
    data = claims.canonical_bytes()
    assert Claims.from_bytes(data) == claims
    with pytest.raises(MalformedInputError, match="canonical"):
        Claims.from_bytes(data.replace(b",", b", ", 1))
    with pytest.raises(MalformedInputError, match="JSON"):
        Claims.from_bytes(b"\xff")
    with pytest.raises(MalformedInputError, match="fields"):
        Claims.from_bytes(b'{"hpke_suite":"x"}')
    with pytest.raises(MalformedInputError, match="object"):
        Claims.from_bytes(b"[]")
    with pytest.raises(MalformedInputError, match="hex"):
        Claims.from_bytes(data.replace(b'"model_digest":"', b'"model_digest":"zz', 1))


def test_claims_reject_bad_fields() -> None:
    with pytest.raises(MalformedInputError, match="model_digest"):
        _claims(model_digest=b"short")
    with pytest.raises(MalformedInputError, match="enclave_public_key"):
        _claims(enclave_public_key=b"")
