"""HPKE sealing of requests to the attested enclave key (RFC 9180).

Why this lives in ``veil.attestation``: the channel key *is* the attested key
(its bytes are in the claims, its hash is the ``key_id``), both the client and
the enclave need this code, and DESIGN.md lets both import ``veil.attestation``
while the client must never import ``veil.enclave``. The module is pure: no I/O,
no torch, no global state.

Suites (``cryptography.hazmat.primitives.hpke``), KDF HKDF-SHA256 and AEAD
ChaCha20-Poly1305 in both:

* ``MLKEM768_X25519`` (default): post-quantum hybrid KEM; the public key
  travels as its ML-KEM-768 (1184 bytes) and X25519 (32 bytes) components.
* ``X25519``: DHKEM(X25519, HKDF-SHA256).

``info`` = ``"veil/request/v1" ‖ key_id`` so a ciphertext is bound to one key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric import x25519 as _x25519
from google.protobuf.message import DecodeError

from veil.attestation.binding import KEY_ID_SIZE, key_id
from veil.attestation.channel.padding import MAX_REQUEST_BYTES, pad_to_bucket, request_bucket
from veil.attestation.errors import (
    DecryptionError,
    MalformedInputError,
    MessageTooLargeError,
    StaleKeyError,
    UnsupportedError,
)
from veil.proto.v1 import evidence_pb2, generate_pb2, service_pb2

__all__ = [
    "REQUEST_INFO_DOMAIN",
    "RESPONSE_KEY_SIZE",
    "HpkeSuite",
    "PrivateKey",
    "PublicKey",
    "hpke_open",
    "hpke_seal",
    "open_request",
    "request_info",
    "seal_request",
]

REQUEST_INFO_DOMAIN = b"veil/request/v1"
REQUEST_ID_SIZE = 16
RESPONSE_KEY_SIZE = 32
MLKEM768_PUBLIC_SIZE = 1184
X25519_PUBLIC_SIZE = 32
_MAX_CIPHERTEXT = MAX_REQUEST_BYTES + 4096  # plaintext limit + encapsulation + tag


class HpkeSuite(enum.Enum):
    """The HPKE suites an enclave key may use; the value is the name used in claims."""

    MLKEM768_X25519 = "MLKEM768_X25519/HKDF_SHA256/CHACHA20_POLY1305"
    X25519 = "X25519/HKDF_SHA256/CHACHA20_POLY1305"

    @classmethod
    def from_name(cls, name: str) -> HpkeSuite:
        for suite in cls:
            if name in (suite.value, suite.name):
                return suite
        raise UnsupportedError(f"unknown HPKE suite {name!r}")

    @classmethod
    def from_proto(cls, value: int) -> HpkeSuite:
        if value == evidence_pb2.HPKE_SUITE_MLKEM768_X25519_HKDF_SHA256_CHACHA20POLY1305:
            return cls.MLKEM768_X25519
        if value == evidence_pb2.HPKE_SUITE_X25519_HKDF_SHA256_CHACHA20POLY1305:
            return cls.X25519
        raise UnsupportedError(f"unknown HPKE suite id {value}")

    def to_proto(self) -> evidence_pb2.HpkeSuite:
        if self is HpkeSuite.MLKEM768_X25519:
            return evidence_pb2.HPKE_SUITE_MLKEM768_X25519_HKDF_SHA256_CHACHA20POLY1305
        return evidence_pb2.HPKE_SUITE_X25519_HKDF_SHA256_CHACHA20POLY1305

    def _suite(self) -> hpke.Suite:
        kem = hpke.KEM.MLKEM768_X25519 if self is HpkeSuite.MLKEM768_X25519 else hpke.KEM.X25519
        return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An enclave HPKE public key, validated on construction."""

    suite: HpkeSuite
    x25519: bytes
    mlkem768: bytes = b""

    def __post_init__(self) -> None:
        if len(self.x25519) != X25519_PUBLIC_SIZE:
            raise MalformedInputError(f"X25519 public key must be 32 bytes, got {len(self.x25519)}")
        if self.suite is HpkeSuite.MLKEM768_X25519:
            if len(self.mlkem768) != MLKEM768_PUBLIC_SIZE:
                raise MalformedInputError(
                    f"ML-KEM-768 public key must be {MLKEM768_PUBLIC_SIZE} bytes, got {len(self.mlkem768)}"
                )
        elif self.mlkem768:
            raise MalformedInputError("an X25519-suite key carries no ML-KEM component")

    def to_bytes(self) -> bytes:
        """HPKE serialisation: ML-KEM-768 key ‖ X25519 key (hybrid), or the X25519 key."""
        return self.mlkem768 + self.x25519

    @property
    def key_id(self) -> bytes:
        return key_id(self.to_bytes())

    def to_proto(self) -> evidence_pb2.EnclavePublicKey:
        return evidence_pb2.EnclavePublicKey(
            suite=self.suite.to_proto(), mlkem768=self.mlkem768, x25519=self.x25519
        )

    @classmethod
    def from_proto(cls, msg: evidence_pb2.EnclavePublicKey) -> PublicKey:
        return cls(HpkeSuite.from_proto(msg.suite), x25519=msg.x25519, mlkem768=msg.mlkem768)

    def _hpke_key(self) -> hpke.MLKEM768X25519PublicKey | _x25519.X25519PublicKey:
        try:
            x = _x25519.X25519PublicKey.from_public_bytes(self.x25519)
            if self.suite is HpkeSuite.X25519:
                return x
            m = mlkem.MLKEM768PublicKey.from_public_bytes(self.mlkem768)
        except ValueError as exc:
            raise MalformedInputError(f"invalid enclave public key: {exc}") from None
        return hpke.MLKEM768X25519PublicKey(m, x)


class PrivateKey:
    """An enclave HPKE private key. It lives in process memory only: no serialisation."""

    __slots__ = ("_key", "_public", "suite")

    def __init__(
        self,
        suite: HpkeSuite,
        key: hpke.MLKEM768X25519PrivateKey | _x25519.X25519PrivateKey,
        public: PublicKey,
    ) -> None:
        self.suite = suite
        self._key = key
        self._public = public

    @classmethod
    def generate(cls, suite: HpkeSuite = HpkeSuite.MLKEM768_X25519) -> PrivateKey:
        xk = _x25519.X25519PrivateKey.generate()
        x_pub = xk.public_key().public_bytes_raw()
        if suite is HpkeSuite.X25519:
            return cls(suite, xk, PublicKey(suite, x25519=x_pub))
        mk = mlkem.MLKEM768PrivateKey.generate()
        public = PublicKey(suite, x25519=x_pub, mlkem768=mk.public_key().public_bytes_raw())
        return cls(suite, hpke.MLKEM768X25519PrivateKey(mk, xk), public)

    def public_key(self) -> PublicKey:
        return self._public

    def __repr__(self) -> str:
        return f"PrivateKey(suite={self.suite.name}, key_id={self._public.key_id.hex()})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("enclave private keys cannot be pickled")


def request_info(kid: bytes) -> bytes:
    """HPKE ``info`` for a request sealed to the key with id ``kid``."""
    if len(kid) != KEY_ID_SIZE:
        raise MalformedInputError(f"key id must be {KEY_ID_SIZE} bytes, got {len(kid)}")
    return REQUEST_INFO_DOMAIN + kid


def hpke_seal(plaintext: bytes, public_key: PublicKey, info: bytes) -> bytes:
    """Single-shot HPKE seal: returns ``enc ‖ ciphertext``."""
    if len(plaintext) > MAX_REQUEST_BYTES:
        raise MessageTooLargeError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_REQUEST_BYTES}")
    return public_key.suite._suite().encrypt(plaintext, public_key._hpke_key(), info=info)


def hpke_open(ciphertext: bytes, private_key: PrivateKey, info: bytes) -> bytes:
    """Single-shot HPKE open; any failure is a :class:`DecryptionError`."""
    if len(ciphertext) > _MAX_CIPHERTEXT:
        raise MessageTooLargeError(f"ciphertext of {len(ciphertext)} bytes exceeds the request limit")
    try:
        return private_key.suite._suite().decrypt(ciphertext, private_key._key, info=info)
    except (InvalidTag, ValueError):
        raise DecryptionError("request did not decrypt (wrong key, wrong info or tampered)") from None


def seal_request(
    request: generate_pb2.GenerateRequest, public_key: PublicKey
) -> service_pb2.EncryptedRequest:
    """Pad ``request`` to its size bucket and seal it to the enclave key."""
    _check_request_fields(request)
    padded = generate_pb2.GenerateRequest()
    padded.CopyFrom(request)
    plaintext = pad_to_bucket(padded, request_bucket)
    kid = public_key.key_id
    return service_pb2.EncryptedRequest(
        key_id=kid, ciphertext=hpke_seal(plaintext, public_key, request_info(kid))
    )


def open_request(
    sealed: service_pb2.EncryptedRequest, private_key: PrivateKey
) -> generate_pb2.GenerateRequest:
    """Open a sealed request inside the enclave.

    Raises :class:`StaleKeyError` when it names another key, :class:`DecryptionError`
    when it does not open, :class:`MalformedInputError` when the plaintext is not a
    well-formed ``GenerateRequest``.
    """
    kid = private_key.public_key().key_id
    if sealed.key_id != kid:
        raise StaleKeyError("request is sealed to a key this enclave does not hold")
    plaintext = hpke_open(sealed.ciphertext, private_key, request_info(kid))
    request = generate_pb2.GenerateRequest()
    try:
        request.ParseFromString(plaintext)
    except DecodeError:
        raise MalformedInputError("request plaintext is not a GenerateRequest") from None
    _check_request_fields(request)
    return request


def _check_request_fields(request: generate_pb2.GenerateRequest) -> None:
    if len(request.request_id) != REQUEST_ID_SIZE:
        raise MalformedInputError(
            f"request_id must be {REQUEST_ID_SIZE} bytes, got {len(request.request_id)}"
        )
    if len(request.response_key) != RESPONSE_KEY_SIZE:
        raise MalformedInputError(
            f"response_key must be {RESPONSE_KEY_SIZE} bytes, got {len(request.response_key)}"
        )
