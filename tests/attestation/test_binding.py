"""The trust binding, pinned: any change to claims, report_data, gpu_nonce or key_id breaks these."""

from __future__ import annotations

import hashlib

import pytest

from veil.attestation.binding import Claims, gpu_nonce, key_id, length_prefixed, report_data
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
    data = _claims().canonical_bytes()
    assert data.startswith(
        b'{"data_policy_digest":"823412d1eacb67956220e532959f0104603057c88704863ca38e7cd188fda812",'
        b'"enclave_public_key":"000102'
    )
    assert data.endswith(b'"simulated":true}')
    assert b" " not in data
    assert (
        hashlib.sha256(data).hexdigest() == "54c3443ee47a796468cf07c54a951149c735f4b01334e64bfe951ad3867ceaf7"
    )


def test_key_id_pinned() -> None:
    assert key_id(PUBLIC_KEY).hex() == "c30462f6e7b61c1a2c2565ca6eafa26a"
    assert key_id(PUBLIC_KEY) == hashlib.sha256(PUBLIC_KEY).digest()[:16]


def test_gpu_nonce_pinned() -> None:
    expected = "a65f0ec6396d77bf948d97b97361c711fb319d3975d08b59f899d786fd748cb9"
    assert gpu_nonce(NONCE, PUBLIC_KEY).hex() == expected
    assert hashlib.sha256(b"veil/gpu-nonce/v1" + NONCE + PUBLIC_KEY).hexdigest() == expected


def test_report_data_pinned_without_and_with_gpus() -> None:
    claims = _claims().canonical_bytes()
    assert report_data(NONCE, claims).hex() == (
        "49496cbbeac796b1237779de56152ea78a04474594b1cb1d56e56b6bb2a0a0c7"
        "8520ddcd0b91346126f75c8508c52c6d553903162080d583cf39db07a234b990"
    )
    gpus = [b"gpu-report-0", b"gpu-report-1"]
    got = report_data(NONCE, claims, gpus)
    assert got.hex() == (
        "f654c5eb50fafac9feefc20e58a78c70c0daf874f621734eca4734deb58d0799"
        "12b89e3acbaf9e56189b9456713ce32225d675cfd56d0b2aef6f07c96c663b6e"
    )
    # The formula, spelled out independently of the implementation.
    manual = hashlib.sha512(
        b"veil/report-data/v1"
        + (32).to_bytes(4, "big")
        + NONCE
        + (32).to_bytes(4, "big")
        + hashlib.sha256(claims).digest()
        + b"".join((32).to_bytes(4, "big") + hashlib.sha256(g).digest() for g in gpus)
    ).digest()
    assert got == manual


def test_report_data_depends_on_every_input() -> None:
    claims = _claims().canonical_bytes()
    base = report_data(NONCE, claims, [b"a"])
    assert report_data(bytes(32), claims, [b"a"]) != base
    assert report_data(NONCE, _claims(engine_version="x").canonical_bytes(), [b"a"]) != base
    assert report_data(NONCE, claims, [b"b"]) != base
    assert report_data(NONCE, claims, [b"a", b"a"]) != base
    assert report_data(NONCE, claims) != base


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
