"""HPKE sealing of requests: both suites, and every way it must fail."""

from __future__ import annotations

import pytest

from veil.attestation.channel.hpke import (
    HpkeSuite,
    PrivateKey,
    PublicKey,
    hpke_open,
    hpke_seal,
    open_request,
    request_info,
    seal_request,
)
from veil.attestation.channel.padding import MAX_REQUEST_BYTES
from veil.attestation.errors import (
    DecryptionError,
    MalformedInputError,
    MessageTooLargeError,
    StaleKeyError,
    UnsupportedError,
)
from veil.proto.v1 import generate_pb2, service_pb2

SUITES = list(HpkeSuite)


def _request(prompt: str = "hello enclave") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        request_id=bytes(range(16)),
        response_key=bytes(range(32)),
        prompt=prompt,
        params=generate_pb2.SamplingParams(max_tokens=8, temperature=0.5, stop=["\n"]),
    )


@pytest.fixture(scope="module", params=SUITES, ids=[s.name for s in SUITES])
def key(request: pytest.FixtureRequest) -> PrivateKey:
    suite: HpkeSuite = request.param
    return PrivateKey.generate(suite)


def test_request_round_trip(key: PrivateKey) -> None:
    sealed = seal_request(_request(), key.public_key())
    assert sealed.key_id == key.public_key().key_id
    assert b"hello enclave" not in sealed.ciphertext
    opened = open_request(sealed, key)
    assert opened.prompt == "hello enclave"
    assert opened.params.temperature == 0.5
    assert list(opened.params.stop) == ["\n"]


def test_public_key_sizes_and_proto_round_trip(key: PrivateKey) -> None:
    public = key.public_key()
    assert len(public.x25519) == 32
    if key.suite is HpkeSuite.MLKEM768_X25519:
        assert len(public.mlkem768) == 1184
        assert public.to_bytes() == public.mlkem768 + public.x25519
    else:
        assert public.to_bytes() == public.x25519
    assert PublicKey.from_proto(public.to_proto()) == public


def test_wrong_key_fails(key: PrivateKey) -> None:
    other = PrivateKey.generate(key.suite)
    sealed = seal_request(_request(), key.public_key())
    with pytest.raises(StaleKeyError):
        open_request(sealed, other)
    # Same key id forged onto a ciphertext for another key: HPKE itself refuses.
    forged = service_pb2.EncryptedRequest(key_id=other.public_key().key_id, ciphertext=sealed.ciphertext)
    with pytest.raises(DecryptionError):
        open_request(forged, other)


def test_wrong_info_fails(key: PrivateKey) -> None:
    public = key.public_key()
    ct = hpke_seal(b"secret", public, request_info(public.key_id))
    assert hpke_open(ct, key, request_info(public.key_id)) == b"secret"
    with pytest.raises(DecryptionError):
        hpke_open(ct, key, request_info(bytes(16)))


def test_flipped_byte_fails(key: PrivateKey) -> None:
    sealed = seal_request(_request(), key.public_key())
    for index in (0, 31, len(sealed.ciphertext) // 2, len(sealed.ciphertext) - 1):
        ct = bytearray(sealed.ciphertext)
        ct[index] ^= 0x01
        with pytest.raises(DecryptionError):
            open_request(service_pb2.EncryptedRequest(key_id=sealed.key_id, ciphertext=bytes(ct)), key)


def test_truncated_ciphertext_fails(key: PrivateKey) -> None:
    sealed = seal_request(_request(), key.public_key())
    for cut in (0, 10, len(sealed.ciphertext) - 1):
        short = service_pb2.EncryptedRequest(key_id=sealed.key_id, ciphertext=sealed.ciphertext[:cut])
        with pytest.raises(DecryptionError):
            open_request(short, key)


def test_malformed_public_keys() -> None:
    with pytest.raises(MalformedInputError, match="X25519"):
        PublicKey(HpkeSuite.X25519, x25519=bytes(31))
    with pytest.raises(MalformedInputError, match="ML-KEM"):
        PublicKey(HpkeSuite.MLKEM768_X25519, x25519=bytes(32), mlkem768=bytes(100))
    with pytest.raises(MalformedInputError, match="no ML-KEM"):
        PublicKey(HpkeSuite.X25519, x25519=bytes(32), mlkem768=bytes(1184))


def test_unknown_suite() -> None:
    with pytest.raises(UnsupportedError):
        HpkeSuite.from_name("P256/HKDF_SHA256/AES_128_GCM")
    with pytest.raises(UnsupportedError):
        HpkeSuite.from_proto(99)
    assert HpkeSuite.from_name("X25519") is HpkeSuite.X25519


def test_oversized_request_is_refused() -> None:
    key = PrivateKey.generate(HpkeSuite.X25519)
    with pytest.raises(MessageTooLargeError):
        seal_request(_request("x" * (MAX_REQUEST_BYTES + 1)), key.public_key())
    with pytest.raises(MessageTooLargeError):
        hpke_open(bytes(2 * MAX_REQUEST_BYTES), key, request_info(bytes(16)))


def test_request_field_checks() -> None:
    key = PrivateKey.generate(HpkeSuite.X25519)
    bad = _request()
    bad.response_key = bytes(31)
    with pytest.raises(MalformedInputError, match="response_key"):
        seal_request(bad, key.public_key())
    bad = _request()
    bad.request_id = b""
    with pytest.raises(MalformedInputError, match="request_id"):
        seal_request(bad, key.public_key())
    with pytest.raises(MalformedInputError, match="key id"):
        request_info(b"short")


def test_garbage_plaintext_is_typed() -> None:
    key = PrivateKey.generate(HpkeSuite.X25519)
    public = key.public_key()
    ct = hpke_seal(b"\xff\xff\xff", public, request_info(public.key_id))
    with pytest.raises(MalformedInputError):
        open_request(service_pb2.EncryptedRequest(key_id=public.key_id, ciphertext=ct), key)


def test_private_key_does_not_leak() -> None:
    key = PrivateKey.generate()
    assert "key_id" in repr(key)
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(key)
