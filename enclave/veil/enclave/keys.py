"""The enclave's identity: its HPKE key pair and the claims it attests.

The key pair is generated at start-up and lives in process memory only
(:class:`veil.attestation.channel.PrivateKey` refuses to be pickled and has no
serialiser); a restart makes a new key, so clients holding the old one get
"stale key" and re-attest.

**Server build digest** (``claims.server_build_digest``, 32 bytes): SHA-256 over the
files of the installed ``veil`` distribution, so a client can tell which code it talks
to. Exactly:

* the packages ``veil``, ``veil.proto``, ``veil.attestation``, ``veil.enclave``,
  ``veil.kernels`` and ``veil.client``, each located with ``importlib`` without importing
  it (``veil`` is a namespace: its folder is the one holding ``veil/cli.py``); every file
  below each package directory, recursively,
  except inside another listed package's directory (a wheel nests them, an editable
  install does not — the result is the same) and except ``__pycache__`` directories;
* only files whose name ends in ``.py``, ``.pyi``, ``.proto``, ``.toml``, ``.pem`` or
  ``py.typed`` (sources, stubs, wire schema, the shipped data policy, pinned roots), in
  :data:`NATIVE_SOURCE_SUFFIXES` (``.cpp``, ``.cc``, ``.c``, ``.h``, ``.hpp``, ``.cu``, ``.cuh``:
  the C++ kernels :mod:`veil.kernels.cpu_ext` compiles — it loads a library only when its sidecar
  shows it was built from exactly these bytes) or in :data:`NATIVE_BINARY_SUFFIXES` (``.so``,
  ``.pyd``, ``.dylib``: a compiled module dropped beside the sources would be imported before
  the ``.py`` of the same name, so it must change the digest);
* each file is named by its path in the ``veil`` namespace with ``/`` separators
  (``veil/enclave/server.py``, ``veil/proto/v1/service_pb2.py``), the list is sorted by
  that name (Python string order), and the digest is
  ``SHA-256("veil/build/v2" ‖ Σ lp(name) ‖ SHA-256(file bytes))`` with ``lp`` the
  4-byte big-endian length prefix of :mod:`veil.attestation.binding`.

:func:`build_manifest` lists the (name, SHA-256) pairs so an auditor can diff two builds.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from veil.attestation.binding import Claims, length_prefixed
from veil.attestation.channel.hpke import HpkeSuite, PrivateKey, PublicKey
from veil.enclave.errors import EnclaveError

__all__ = [
    "BUILD_DIGEST_DOMAIN",
    "BUILD_FILE_SUFFIXES",
    "BUILD_PACKAGES",
    "NATIVE_BINARY_SUFFIXES",
    "NATIVE_SOURCE_SUFFIXES",
    "EnclaveIdentity",
    "build_digest",
    "build_manifest",
    "create_identity",
    "measurement_from_build_digest",
]

# v2: C/C++ sources and headers, and any native binary inside the packages, are covered (issue #12).
BUILD_DIGEST_DOMAIN = b"veil/build/v2"
BUILD_PACKAGES = ("veil", "veil.proto", "veil.attestation", "veil.enclave", "veil.kernels", "veil.client")
NATIVE_SOURCE_SUFFIXES = (".cpp", ".cc", ".c", ".h", ".hpp", ".cu", ".cuh")
NATIVE_BINARY_SUFFIXES = (".so", ".pyd", ".dylib")
BUILD_FILE_SUFFIXES = (
    ".py",
    ".pyi",
    ".proto",
    ".toml",
    ".pem",
    "py.typed",
    *NATIVE_SOURCE_SUFFIXES,
    *NATIVE_BINARY_SUFFIXES,
)
MEASUREMENT_SIZE = 48
# Namespace packages have no directory of their own; their files are found through a module.
_NAMESPACE_ANCHORS = {"veil": "veil.cli"}


def _package_dirs(packages: Sequence[str]) -> dict[str, Path]:
    dirs: dict[str, Path] = {}
    for name in packages:
        spec = importlib.util.find_spec(_NAMESPACE_ANCHORS.get(name, name))
        if spec is None:
            raise EnclaveError(f"package {name} is not installed")
        if name in _NAMESPACE_ANCHORS:
            # ``veil`` is a namespace spread over several folders (one per source root in a
            # checkout, one folder in a wheel): its own files sit beside the anchor module.
            if spec.origin is None:
                raise EnclaveError(f"package {name} is not installed")
            dirs[name] = Path(spec.origin).resolve().parent
        elif spec.submodule_search_locations:
            dirs[name] = Path(next(iter(spec.submodule_search_locations))).resolve()
        else:
            raise EnclaveError(f"{name} is a module, not a package")
    return dirs


def build_manifest(packages: Sequence[str] = BUILD_PACKAGES) -> list[tuple[str, bytes]]:
    """(namespace path, SHA-256 of the file) for every file in the build digest, sorted by path."""
    dirs = _package_dirs(packages)
    others = set(dirs.values())
    entries: dict[str, bytes] = {}
    for name, root in dirs.items():
        prefix = name.replace(".", "/")
        for path in _walk(root, others - {root}):
            rel = path.relative_to(root).as_posix()
            entries[f"{prefix}/{rel}"] = hashlib.sha256(path.read_bytes()).digest()
    return sorted(entries.items())


def _walk(root: Path, skip: set[Path]) -> Iterable[Path]:
    for path in sorted(root.iterdir()):
        if path.is_dir():
            if path.name == "__pycache__" or path.resolve() in skip:
                continue
            yield from _walk(path, skip)
        elif path.is_file() and path.name.endswith(BUILD_FILE_SUFFIXES):
            yield path


def build_digest(packages: Sequence[str] = BUILD_PACKAGES) -> bytes:
    """The 32-byte server build digest defined in the module docstring."""
    h = hashlib.sha256(BUILD_DIGEST_DOMAIN)
    for name, file_digest in build_manifest(packages):
        h.update(length_prefixed(name.encode("utf-8")))
        h.update(file_digest)
    return h.digest()


def measurement_from_build_digest(digest: bytes) -> bytes:
    """The 48-byte SNP launch measurement the simulated TEE reports: the build digest, zero-padded.

    Real SEV-SNP hardware measures the launched image instead; the simulation puts the
    build digest there so a client can check ``measurement == server_build_digest ‖ 0¹⁶``.
    """
    if len(digest) != 32:
        raise EnclaveError(f"build digest must be 32 bytes, got {len(digest)}")
    return digest + bytes(MEASUREMENT_SIZE - len(digest))


@dataclass(frozen=True, slots=True)
class EnclaveIdentity:
    """The in-memory key pair and the claims that name its public half."""

    private_key: PrivateKey
    claims: Claims
    claims_bytes: bytes

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> bytes:
        return self.public_key.key_id

    def __repr__(self) -> str:
        return f"EnclaveIdentity(key_id={self.key_id.hex()}, simulated={self.claims.simulated})"


def create_identity(
    *,
    model_digest: bytes,
    engine_version: str,
    data_policy_digest: bytes,
    server_build_digest: bytes,
    simulated: bool,
    suite: HpkeSuite = HpkeSuite.MLKEM768_X25519,
) -> EnclaveIdentity:
    """Generate a fresh key pair (memory only) and the claims naming it."""
    key = PrivateKey.generate(suite)
    claims = Claims(
        hpke_suite=suite.value,
        enclave_public_key=key.public_key().to_bytes(),
        model_digest=model_digest,
        engine_version=engine_version,
        data_policy_digest=data_policy_digest,
        server_build_digest=server_build_digest,
        simulated=simulated,
    )
    return EnclaveIdentity(key, claims, claims.canonical_bytes())
