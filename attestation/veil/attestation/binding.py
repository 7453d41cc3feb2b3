"""The trust binding between attestation evidence and the encrypted channel.

Exactly as DESIGN.md ("Trust and binding", "Channel") defines it; the pinned
vectors in ``tests/attestation/test_binding.py`` break on any change here.

* ``claims``: canonical bytes = sorted-key JSON, UTF-8, no insignificant white
  space; byte strings as lowercase hex.
* ``report_data`` (64 bytes, signed by the hardware) =
  ``SHA-512("veil/report-data/v2" ‖ lp(nonce) ‖ lp(SHA-256(claims)) ‖ lp(gpu_0) ‖ lp(gpu_1) ‖ …)``
  with ``lp(x)`` = 4-byte big-endian length then ``x``, and for each GPU report, in the
  order of ``Evidence.gpus``, ``gpu_i`` = ``kind (1 byte: 1 GPU, 2 NVSwitch, as the proto
  enum) ‖ index (4 bytes big-endian, GpuEvidence.index) ‖ SHA-256(report)``. Version 1
  hashed the report alone, so relabelling a GPU as an NVSwitch (which changes the GPU
  count a policy checks) broke no signature; version 2 binds the label.
* ``gpu_nonce`` = ``SHA-256("veil/gpu-nonce/v1" ‖ nonce ‖ enclave public key bytes)``.
* ``key_id`` = first 16 bytes of ``SHA-256(enclave public key bytes)``.
* ``tpm_nonce`` (Azure CVMs) = ``SHA-256("veil/tpm-nonce/v1" ‖ report_data)``: the vTPM quote's
  ``extraData``, so the quoted PCRs belong to the same exchange (32 bytes: every vTPM accepts a
  SHA-256-sized qualifying datum). ``report_data`` itself is the HCL ``user-data``.

The enclave public key bytes are the HPKE serialisation of the key: for the
hybrid ``MLKEM768_X25519`` KEM the ML-KEM-768 encapsulation key (1184 bytes)
followed by the X25519 key (32 bytes); for ``X25519`` the 32-byte key alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from veil.attestation.errors import MalformedInputError

__all__ = [
    "EVIDENCE_FORMAT_VERSION",
    "GPU_KIND_GPU",
    "GPU_KIND_NVSWITCH",
    "NONCE_SIZE",
    "BoundGpu",
    "Claims",
    "gpu_nonce",
    "key_id",
    "length_prefixed",
    "report_data",
    "tpm_nonce",
]

EVIDENCE_FORMAT_VERSION = 2
NONCE_SIZE = 32
KEY_ID_SIZE = 16
REPORT_DATA_DOMAIN = b"veil/report-data/v2"
GPU_KIND_GPU = 1  # evidence_pb2.GpuEvidence.KIND_GPU
GPU_KIND_NVSWITCH = 2  # evidence_pb2.GpuEvidence.KIND_NVSWITCH
GPU_NONCE_DOMAIN = b"veil/gpu-nonce/v1"
TPM_NONCE_DOMAIN = b"veil/tpm-nonce/v1"
REPORT_DATA_SIZE = 64
_MAX_CLAIMS_BYTES = 64 * 1024


def length_prefixed(data: bytes) -> bytes:
    """``lp(x)``: 4-byte big-endian length, then ``x``."""
    if len(data) >= 1 << 32:
        raise MalformedInputError("field too long to length-prefix")
    return len(data).to_bytes(4, "big") + data


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise MalformedInputError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")


def key_id(public_key_bytes: bytes) -> bytes:
    """First 16 bytes of SHA-256 over the enclave public key bytes."""
    if not public_key_bytes:
        raise MalformedInputError("empty enclave public key")
    return hashlib.sha256(public_key_bytes).digest()[:KEY_ID_SIZE]


def gpu_nonce(nonce: bytes, public_key_bytes: bytes) -> bytes:
    """The 32-byte nonce each GPU report is requested with."""
    _check_nonce(nonce)
    if not public_key_bytes:
        raise MalformedInputError("empty enclave public key")
    return hashlib.sha256(GPU_NONCE_DOMAIN + nonce + public_key_bytes).digest()


def tpm_nonce(report_data: bytes) -> bytes:
    """The 32-byte nonce (``extraData``) of an Azure vTPM quote bound to ``report_data``."""
    if len(report_data) != REPORT_DATA_SIZE:
        raise MalformedInputError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    return hashlib.sha256(TPM_NONCE_DOMAIN + report_data).digest()


class BoundGpu(Protocol):
    """What of one GPU's evidence ``report_data`` binds (``GpuEvidence`` and the enclave's
    ``GpuEvidencePart`` both have these fields)."""

    @property
    def kind(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def report(self) -> bytes: ...


def _gpu_item(gpu: BoundGpu) -> bytes:
    kind, index = int(gpu.kind), int(gpu.index)
    if kind not in (GPU_KIND_GPU, GPU_KIND_NVSWITCH):
        raise MalformedInputError(f"GPU evidence kind {kind} is neither GPU (1) nor NVSwitch (2)")
    if not 0 <= index < 1 << 32:
        raise MalformedInputError(f"GPU evidence index {index} out of range")
    return bytes([kind]) + index.to_bytes(4, "big") + hashlib.sha256(bytes(gpu.report)).digest()


def report_data(nonce: bytes, claims: bytes, gpus: Sequence[BoundGpu] = ()) -> bytes:
    """The 64 bytes the CPU TEE signs, binding nonce, claims and every GPU report with its
    kind and index (see the module docstring); raises :class:`MalformedInputError` for a
    nonce of the wrong size or a GPU of unknown kind."""
    _check_nonce(nonce)
    h = hashlib.sha512(REPORT_DATA_DOMAIN)
    h.update(length_prefixed(nonce))
    h.update(length_prefixed(hashlib.sha256(claims).digest()))
    for gpu in gpus:
        h.update(length_prefixed(_gpu_item(gpu)))
    return h.digest()


_BYTES_FIELDS = {
    "enclave_public_key": None,
    "model_digest": 32,
    "data_policy_digest": 32,
    "server_build_digest": 32,
}


@dataclass(frozen=True, slots=True)
class Claims:
    """What the enclave states about itself; the canonical bytes are hashed into report_data."""

    hpke_suite: str
    enclave_public_key: bytes
    model_digest: bytes
    engine_version: str
    data_policy_digest: bytes
    server_build_digest: bytes
    simulated: bool = False
    evidence_format_version: int = EVIDENCE_FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, size in _BYTES_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, bytes) or not value:
                raise MalformedInputError(f"claims.{name} must be non-empty bytes")
            if size is not None and len(value) != size:
                raise MalformedInputError(f"claims.{name} must be {size} bytes, got {len(value)}")
        if not self.hpke_suite or not self.engine_version:
            raise MalformedInputError("claims.hpke_suite and claims.engine_version must be set")

    def to_json_obj(self) -> dict[str, Any]:
        """The claims as a JSON object (bytes as lowercase hex)."""
        obj = asdict(self)
        for name in _BYTES_FIELDS:
            obj[name] = obj[name].hex()
        return obj

    def canonical_bytes(self) -> bytes:
        """Sorted-key JSON, UTF-8, compact separators."""
        return _canonical_json(self.to_json_obj())

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical bytes."""
        return hashlib.sha256(self.canonical_bytes()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Claims:
        """Parse canonical claims bytes; non-canonical encodings are rejected."""
        if len(data) > _MAX_CLAIMS_BYTES:
            raise MalformedInputError("claims larger than 64 KiB")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedInputError(f"claims are not UTF-8 JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise MalformedInputError("claims must be a JSON object")
        expected = {f for f in cls.__dataclass_fields__}
        if set(obj) != expected:
            missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
            raise MalformedInputError(f"claims fields mismatch (missing {missing}, unexpected {extra})")
        values: dict[str, Any] = {}
        for name, value in obj.items():
            if name in _BYTES_FIELDS:
                if not isinstance(value, str):
                    raise MalformedInputError(f"claims.{name} must be a hex string")
                try:
                    values[name] = bytes.fromhex(value)
                except ValueError:
                    raise MalformedInputError(f"claims.{name} is not hex") from None
            else:
                values[name] = value
        if not isinstance(values["simulated"], bool):
            raise MalformedInputError("claims.simulated must be a boolean")
        if type(values["evidence_format_version"]) is not int:
            raise MalformedInputError("claims.evidence_format_version must be an integer")
        if not isinstance(values["hpke_suite"], str) or not isinstance(values["engine_version"], str):
            raise MalformedInputError("claims.hpke_suite and claims.engine_version must be strings")
        claims = cls(**values)
        if claims.canonical_bytes() != data:
            raise MalformedInputError("claims bytes are not in canonical form")
        return claims


def _canonical_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
