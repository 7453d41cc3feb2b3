"""Confidential Containers *initdata*: the pod's launch configuration, measured by the TEE.

A Kata Containers confidential pod carries one TOML document (the initdata) in the pod
annotation :data:`ANNOTATION`: the attestation-agent configuration and the agent policy
that decides which requests the Kata agent serves inside the guest. The Kata runtime
hashes the document and hands the digest to the hypervisor, where the hardware measures
it: SEV-SNP ``HOST_DATA`` (32 bytes), TDX ``MRCONFIGID`` (48 bytes). A release manifest
that names that value therefore pins the pod's whole launch configuration, not only the
guest image.

This module reproduces exactly what the Kata runtime does, checked against Kata
Containers' source (``kata-containers/kata-containers`` main at 7c6ba40c, ``VERSION``
4.1.0; the same code is in the 3.x releases that added initdata):

* the annotation key is ``io.katacontainers.config.hypervisor.cc_init_data``
  (``src/runtime/virtcontainers/pkg/annotations/annotations.go``: ``Initdata``;
  ``src/libs/kata-types/src/annotations/mod.rs``: ``KATA_ANNO_CFG_HYPERVISOR_INIT_DATA``);
  the runtime's configuration must list ``cc_init_data`` in ``enable_annotations``
  (the CoCo configurations do);
* the annotation value is the TOML document, gzip-compressed, then standard base64
  (``src/runtime/pkg/oci/utils.go``: ``addHypervisorInitdataOverrides``);
* the document has ``version = "0.1.0"``, ``algorithm`` one of sha256 / sha384 / sha512,
  and a ``[data]`` table of strings (``src/libs/kata-types/src/initdata.rs``);
* the digest is ``algorithm`` over the *decompressed document bytes as they are* (not a
  re-serialisation), then cut to or zero-padded to the platform's size: 32 bytes for
  SNP ``host-data``, 48 bytes for TDX ``mrconfigid``
  (``src/runtime/pkg/govmm/qemu/qemu.go``: ``adjustProperLength``; ``initdata.rs``:
  ``adjust_digest``).

Everything here is pure (bytes in, bytes out). Bad input raises :class:`InitdataError`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import tomllib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from veil.attestation.errors import PolicyError

__all__ = [
    "ANNOTATION",
    "HOST_DATA_SIZE",
    "MRCONFIGID_SIZE",
    "Initdata",
    "InitdataError",
    "decode_annotation",
    "encode_annotation",
    "parse_initdata",
]

ANNOTATION: Final = "io.katacontainers.config.hypervisor.cc_init_data"
VERSION: Final = "0.1.0"
ALGORITHMS: Final = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
HOST_DATA_SIZE: Final = 32  # SEV-SNP HOST_DATA
MRCONFIGID_SIZE: Final = 48  # TDX MRCONFIGID
MAX_INITDATA_BYTES: Final = 256 * 1024  # far above any real agent policy; bounds gzip expansion


class InitdataError(PolicyError):
    """An initdata document or annotation that Kata would refuse, or that cannot be pinned."""


@dataclass(frozen=True, slots=True)
class Initdata:
    """One initdata document: its exact bytes (what is hashed) and what they declare."""

    raw: bytes
    algorithm: str
    data: Mapping[str, str]

    @property
    def digest(self) -> bytes:
        """``algorithm`` over the document bytes (the Kata runtime's ``InitdataDigest``)."""
        return ALGORITHMS[self.algorithm](self.raw).digest()

    @property
    def host_data(self) -> bytes:
        """The SEV-SNP ``HOST_DATA`` a pod launched with this document carries."""
        return _fit(self.digest, HOST_DATA_SIZE)

    @property
    def mr_config_id(self) -> bytes:
        """The TDX ``MRCONFIGID`` a pod launched with this document carries."""
        return _fit(self.digest, MRCONFIGID_SIZE)


def _fit(digest: bytes, size: int) -> bytes:
    """Kata's ``adjustProperLength``: the first ``size`` bytes, zero-padded when shorter."""
    return digest[:size].ljust(size, b"\0")


def parse_initdata(raw: bytes) -> Initdata:
    """Parse and check one initdata document as Kata does (version, algorithm, ``[data]``)."""
    if len(raw) > MAX_INITDATA_BYTES:
        raise InitdataError(f"initdata of {len(raw)} bytes exceeds {MAX_INITDATA_BYTES}")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InitdataError(f"initdata is not UTF-8 TOML: {exc}") from None
    unknown = sorted(set(doc) - {"version", "algorithm", "data"})
    if unknown:
        raise InitdataError(f"initdata: unknown top-level key(s) {', '.join(unknown)}")
    if doc.get("version") != VERSION:
        raise InitdataError(f"initdata version is {doc.get('version')!r}; Kata supports {VERSION!r}")
    algorithm = doc.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise InitdataError(f"initdata algorithm is {algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
    data = doc.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InitdataError("initdata [data] must map file names to strings")
    return Initdata(raw=bytes(raw), algorithm=algorithm, data=dict(data))


def encode_annotation(raw: bytes) -> str:
    """The annotation value for ``raw``: gzip (mtime 0, so the same bytes give the same
    value), then standard base64. The document is checked first."""
    parse_initdata(raw)
    return base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")


def decode_annotation(value: str) -> Initdata:
    """The document an annotation value carries, checked (what the Kata runtime reads)."""
    try:
        packed = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InitdataError("initdata annotation is not standard base64") from None
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    try:
        raw = inflater.decompress(packed, MAX_INITDATA_BYTES + 1)
    except zlib.error:
        raise InitdataError("initdata annotation is not gzip data") from None
    if len(raw) > MAX_INITDATA_BYTES:
        raise InitdataError(f"initdata annotation inflates beyond {MAX_INITDATA_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise InitdataError("initdata annotation is truncated or has trailing bytes")
    return parse_initdata(raw)
