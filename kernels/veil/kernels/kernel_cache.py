"""Which compiled kernel library may be loaded: the identity of a build and its sidecar record.

A compiled library is native code that sees plaintext activations, so the enclave loads one only
when it can show it was built from exactly the C++ sources the attested build digest covers
(``veil.enclave.keys``), for this torch and this Python. At build time the builder writes, beside
``NAME.so``, a sidecar ``NAME.json``::

    {"format": "veil/cpu-kernels/v1", "name": NAME, "source_digest": HEX,
     "sources": {"common.h": HEX, ...}, "torch": VERSION, "python": sys.version,
     "flags": [...], "library_sha256": HEX}

(sorted keys, UTF-8). Before a library is loaded, :func:`verify_cached` re-derives every field
but the last from the source files as they are now and compares them exactly, then hashes the
``.so`` bytes and compares ``library_sha256``; it hands back the very bytes it hashed, which the
caller writes to its own cache and loads, so nothing read later can differ from what was checked.

``source_digest`` = ``SHA-256("veil/cpu-kernels/v1" ‖ Σ lp(name) ‖ SHA-256(bytes) ‖
lp(torch) ‖ lp(python) ‖ Σ lp(flag))`` over the sources sorted by file name; the library's name
is ``veil_cpu_`` + its first 16 hex digits. Pure: no torch, no compiler; I/O only in
:func:`verify_cached` and :func:`read_sources`.

What a sidecar proves is consistency, not provenance: whoever can write both files can forge
both. The enclave therefore keeps its own copy in its state directory and treats any other
location (``make setup``'s ``~/.cache/veil/kernels``) as a source of bytes to verify and copy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from veil.kernels.errors import KernelCacheError

__all__ = [
    "KERNEL_DIGEST_DOMAIN",
    "KernelIdentity",
    "identify",
    "read_sources",
    "sidecar_bytes",
    "verify_cached",
]

KERNEL_DIGEST_DOMAIN = b"veil/cpu-kernels/v1"
SOURCE_SUFFIXES = (".cpp", ".cc", ".c", ".h", ".hpp")
_MAX_SIDECAR = 64 * 1024
_MAX_LIBRARY = 256 * 1024 * 1024


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@dataclass(frozen=True, slots=True)
class KernelIdentity:
    """What a compiled library must have been built from; ``name`` is derived from ``source_digest``."""

    sources: tuple[tuple[str, bytes], ...]  # (file name, SHA-256), sorted by name
    torch_version: str
    python_version: str
    flags: tuple[str, ...]
    source_digest: bytes

    @property
    def name(self) -> str:
        return "veil_cpu_" + self.source_digest.hex()[:16]

    def record(self, library_sha256: bytes) -> dict[str, object]:
        return {
            "format": KERNEL_DIGEST_DOMAIN.decode(),
            "name": self.name,
            "source_digest": self.source_digest.hex(),
            "sources": {name: digest.hex() for name, digest in self.sources},
            "torch": self.torch_version,
            "python": self.python_version,
            "flags": list(self.flags),
            "library_sha256": library_sha256.hex(),
        }


def read_sources(directory: Path) -> dict[str, bytes]:
    """Every C/C++ source and header directly in ``directory`` (read once, by file name)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name.endswith(SOURCE_SUFFIXES)
    }


def identify(
    sources: Mapping[str, bytes], torch_version: str, python_version: str, flags: Iterable[str]
) -> KernelIdentity:
    """The identity of a build of ``sources`` (file name → bytes) with these versions and flags."""
    if not sources:
        raise KernelCacheError("no kernel sources to identify")
    digests = tuple((name, hashlib.sha256(sources[name]).digest()) for name in sorted(sources))
    flag_list = tuple(flags)
    h = hashlib.sha256(KERNEL_DIGEST_DOMAIN)
    for name, digest in digests:
        h.update(_lp(name.encode()) + digest)
    h.update(_lp(torch_version.encode()) + _lp(python_version.encode()))
    for flag in flag_list:
        h.update(_lp(flag.encode()))
    return KernelIdentity(digests, torch_version, python_version, flag_list, h.digest())


def sidecar_bytes(identity: KernelIdentity, library: bytes) -> bytes:
    """The sidecar recording that ``library`` (the ``.so`` bytes) is a build of ``identity``."""
    record = identity.record(hashlib.sha256(library).digest())
    return (json.dumps(record, sort_keys=True, indent=1) + "\n").encode()


def verify_cached(directory: Path, identity: KernelIdentity) -> bytes:
    """The library bytes in ``directory`` if its sidecar names exactly ``identity`` and its hash.

    Raises :class:`KernelCacheError` naming the first field that differs (a missing entry too).
    """
    name = identity.name
    sidecar, library = directory / f"{name}.json", directory / f"{name}.so"
    try:
        raw = sidecar.read_bytes()[: _MAX_SIDECAR + 1]
        data = library.read_bytes()
    except OSError as exc:
        raise KernelCacheError(f"kernel cache entry {directory}: {exc.strerror or 'unreadable'}") from None
    if len(raw) > _MAX_SIDECAR or len(data) > _MAX_LIBRARY:
        raise KernelCacheError(f"kernel cache entry {directory}: sidecar or library too large")
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KernelCacheError(f"kernel cache entry {directory}: sidecar is not JSON") from None
    if not isinstance(record, dict):
        raise KernelCacheError(f"kernel cache entry {directory}: sidecar is not a JSON object")
    expected = identity.record(hashlib.sha256(data).digest())
    for key in sorted(expected):
        if record.get(key) != expected[key]:
            what = "library bytes" if key == "library_sha256" else key
            raise KernelCacheError(f"kernel cache entry {directory}: {what} does not match")
    if set(record) != set(expected):
        raise KernelCacheError(f"kernel cache entry {directory}: sidecar has unknown fields")
    return data
