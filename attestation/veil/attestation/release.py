"""Signed release manifests: what a genuine Veil enclave of one release proves, per platform.

One document per release. It is an `in-toto Statement v1
<https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md>`_ whose subject is
the server build digest and whose predicate (type :data:`PREDICATE_TYPE`) names, per
platform (``SEV_SNP``, ``AZURE_SEV_SNP``, ``TDX``, ``AZURE_TDX``, ``SIMULATED_SEV_SNP``)::

    measurements      SNP launch measurements / TDX MRTDs (hex, 48 bytes)
    host_data         SNP HOST_DATA (hex, 32 bytes; optional)
    mr_config_id      TDX MRCONFIGID (hex, 48 bytes; optional)
    rtmr              TDX RTMR0-3 allow-lists (four lists of hex, 48 bytes)
    azure_pcrs        Azure CVM vTPM PCRs {"<index>": hex 32 bytes}
    model_digests     SHA-256 of the weights files (hex)
    data_policy_digest       SHA-256 of the data-handling policy the enclave enforces
    policy_test_report_digest  SHA-256 of that build's data-handling policy test report
    gpu_count         GPU reports required (NVSwitches not counted)
    gpu_firmware      {"driver": [...], "vbios": [...]} allowed versions
    tcb_floor         SNP {"Milan": {"bootloader": 4, ...}} / TDX {"tdx_statuses": [...]}

A Confidential Containers pod's initdata (:mod:`veil.attestation.initdata`) lands in
``host_data`` on SNP and ``mr_config_id`` on TDX (``veil release build --initdata FILE``).

The statement travels in a DSSE envelope (``payloadType`` ``application/vnd.in-toto+json``)
signed with an Ed25519 publisher key. Why DSSE + in-toto rather than a Sigstore bundle: a
Sigstore bundle's trust comes from Fulcio certificates and Rekor inclusion proofs, which a
client checks against Sigstore's online trust root; a DSSE envelope verifies offline with one
pinned public key, which is what a client with no network at request time needs. The
envelope and key handling are ``securesystemslib``'s (the library in-toto and TUF use), not
home-made. Every function here is pure except :func:`load_publisher_key` and friends, which
take bytes.

Refusals raise :class:`~veil.attestation.errors.ReleaseError` (check ``policy.release``):
not an envelope, a signature that does not verify, a signature by another key than the
publisher key given ("unknown publisher key"), a statement that is not a Veil release, an
unknown field (a newer manifest's pin is never ignored), a platform the manifest does not name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib import exceptions as sslib_errors
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]  # re-exported, not in __all__

from veil.attestation.errors import PolicyError, ReleaseError
from veil.attestation.nvidia.validate import GpuPolicy
from veil.attestation.policy import PlatformName, Policy, TrustedRoots, default_tdx, shipped_floor
from veil.attestation.tcb_floor import parse_snp_floor

__all__ = [
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "PlatformRelease",
    "Release",
    "key_fingerprint",
    "load_publisher_key",
    "load_signing_key",
    "policy_from_release",
    "public_key_pem",
    "publisher_key_id",
    "sign_release",
    "verify_release",
]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://veil.dev/attestation/release/v1"  # an identifier; never fetched
SUBJECT_NAME = "veil-server-build"
MAX_MANIFEST_BYTES = 1024 * 1024
_TDX_FAMILY = frozenset({PlatformName.TDX, PlatformName.AZURE_TDX})
_PLATFORM_KEYS = frozenset({
    "measurements", "host_data", "mr_config_id", "rtmr", "azure_pcrs", "model_digests", "data_policy_digest",
    "policy_test_report_digest", "gpu_count", "gpu_firmware", "tcb_floor",
})  # fmt: skip


def _hexes(values: Iterable[bytes]) -> list[str]:
    return sorted(v.hex() for v in values)


def _unhex(value: Any, size: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise ReleaseError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(value.removeprefix("sha256:"))
    except ValueError:
        raise ReleaseError(f"{what} is not hex") from None
    if len(raw) != size:
        raise ReleaseError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def _unhex_list(value: Any, size: int, what: str) -> frozenset[bytes]:
    if not isinstance(value, list):
        raise ReleaseError(f"{what} must be a list")
    return frozenset(_unhex(v, size, what) for v in value)


def _strings(value: Any, what: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReleaseError(f"{what} must be a list of strings")
    return frozenset(value)


@dataclass(frozen=True, slots=True)
class PlatformRelease:
    """What a genuine enclave of this release proves on one platform (see the module docstring)."""

    measurements: frozenset[bytes] = frozenset()
    host_data: bytes | None = None
    mr_config_id: bytes | None = None
    rtmr: tuple[frozenset[bytes], ...] = (frozenset(), frozenset(), frozenset(), frozenset())
    azure_pcrs: Mapping[int, bytes] = field(default_factory=dict)
    model_digests: frozenset[bytes] = frozenset()
    data_policy_digest: bytes | None = None
    policy_test_report_digest: bytes | None = None
    gpu_count: int | None = None
    gpu_driver_versions: frozenset[str] = frozenset()
    gpu_vbios_versions: frozenset[str] = frozenset()
    snp_tcb_floor: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    tdx_statuses: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "measurements": _hexes(self.measurements),
            "model_digests": _hexes(self.model_digests),
        }
        if self.host_data is not None:
            doc["host_data"] = self.host_data.hex()
        if self.mr_config_id is not None:
            doc["mr_config_id"] = self.mr_config_id.hex()
        if any(self.rtmr):
            doc["rtmr"] = [_hexes(r) for r in self.rtmr]
        if self.azure_pcrs:
            doc["azure_pcrs"] = {str(i): v.hex() for i, v in sorted(self.azure_pcrs.items())}
        for key in ("data_policy_digest", "policy_test_report_digest"):
            value = getattr(self, key)
            if value is not None:
                doc[key] = value.hex()
        if self.gpu_count is not None:
            doc["gpu_count"] = self.gpu_count
        if self.gpu_driver_versions or self.gpu_vbios_versions:
            doc["gpu_firmware"] = {
                "driver": sorted(self.gpu_driver_versions),
                "vbios": sorted(self.gpu_vbios_versions),
            }
        floor: dict[str, Any] = {k: dict(v) for k, v in sorted(self.snp_tcb_floor.items())}
        if self.tdx_statuses:
            floor["tdx_statuses"] = sorted(self.tdx_statuses)
        if floor:
            doc["tcb_floor"] = floor
        return doc

    @staticmethod
    def from_json(doc: Any, where: str) -> PlatformRelease:
        if not isinstance(doc, Mapping):
            raise ReleaseError(f"{where} must be an object")
        unknown = sorted(set(doc) - _PLATFORM_KEYS)
        if unknown:
            raise ReleaseError(f"{where}: unknown field(s) {', '.join(unknown)} (refused, not ignored)")
        kw: dict[str, Any] = {
            "measurements": _unhex_list(doc.get("measurements", []), 48, f"{where}.measurements"),
            "model_digests": _unhex_list(doc.get("model_digests", []), 32, f"{where}.model_digests"),
        }
        if "host_data" in doc:
            kw["host_data"] = _unhex(doc["host_data"], 32, f"{where}.host_data")
        if "mr_config_id" in doc:
            kw["mr_config_id"] = _unhex(doc["mr_config_id"], 48, f"{where}.mr_config_id")
        if "rtmr" in doc:
            rtmr = doc["rtmr"]
            if not isinstance(rtmr, list) or len(rtmr) != 4:
                raise ReleaseError(f"{where}.rtmr must be four lists (RTMR0-3)")
            kw["rtmr"] = tuple(_unhex_list(r, 48, f"{where}.rtmr[{i}]") for i, r in enumerate(rtmr))
        if "azure_pcrs" in doc:
            pcrs = doc["azure_pcrs"]
            if not isinstance(pcrs, Mapping) or not all(str(k).isdigit() and int(k) < 24 for k in pcrs):
                raise ReleaseError(f"{where}.azure_pcrs must map PCR numbers 0..23 to hex")
            kw["azure_pcrs"] = {int(k): _unhex(v, 32, f"{where}.azure_pcrs.{k}") for k, v in pcrs.items()}
        for key in ("data_policy_digest", "policy_test_report_digest"):
            if key in doc:
                kw[key] = _unhex(doc[key], 32, f"{where}.{key}")
        if "gpu_count" in doc:
            count = doc["gpu_count"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ReleaseError(f"{where}.gpu_count must be a non-negative integer")
            kw["gpu_count"] = count
        if "gpu_firmware" in doc:
            fw = doc["gpu_firmware"]
            if not isinstance(fw, Mapping) or set(fw) - {"driver", "vbios"}:
                raise ReleaseError(f"{where}.gpu_firmware holds driver and vbios lists")
            kw["gpu_driver_versions"] = _strings(fw.get("driver", []), f"{where}.gpu_firmware.driver")
            kw["gpu_vbios_versions"] = _strings(fw.get("vbios", []), f"{where}.gpu_firmware.vbios")
        if "tcb_floor" in doc:
            floor = dict(doc["tcb_floor"]) if isinstance(doc["tcb_floor"], Mapping) else None
            if floor is None:
                raise ReleaseError(f"{where}.tcb_floor must be an object")
            if "tdx_statuses" in floor:
                kw["tdx_statuses"] = _strings(floor.pop("tdx_statuses"), f"{where}.tcb_floor.tdx_statuses")
            try:
                kw["snp_tcb_floor"] = parse_snp_floor(floor, f"{where}.tcb_floor")
            except PolicyError as exc:
                raise ReleaseError(str(exc)) from None
        return PlatformRelease(**kw)


@dataclass(frozen=True, slots=True)
class Release:
    """A release manifest's content: its name, the server build digest, per-platform pins.

    ``publisher_key_id`` is set by :func:`verify_release`: the key that signed it.
    """

    name: str
    build_digest: bytes
    platforms: Mapping[PlatformName, PlatformRelease]
    publisher_key_id: str | None = None

    def platform(self, platform: PlatformName) -> PlatformRelease:
        """The pins for ``platform``; :class:`ReleaseError` when the manifest does not name it."""
        if platform not in self.platforms:
            named = ", ".join(sorted(p.value for p in self.platforms))
            raise ReleaseError(
                f"release {self.name} does not name platform {platform.value} (names: {named})"
            )
        return self.platforms[platform]

    def statement(self) -> dict[str, Any]:
        """The in-toto Statement v1 (a JSON object)."""
        return {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": SUBJECT_NAME, "digest": {"sha256": self.build_digest.hex()}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": {
                "release": self.name,
                "platforms": {p.value: r.to_json() for p, r in sorted(self.platforms.items(), key=_by_name)},
            },
        }

    @staticmethod
    def from_statement(doc: Any) -> Release:
        """Parse an in-toto Statement naming a Veil release (strict: unknown fields refused)."""
        if not isinstance(doc, Mapping) or doc.get("_type") != STATEMENT_TYPE:
            raise ReleaseError(f"payload is not an in-toto Statement v1 ({STATEMENT_TYPE})")
        if doc.get("predicateType") != PREDICATE_TYPE:
            raise ReleaseError(f"predicateType is {doc.get('predicateType')!r}, not a Veil release")
        subjects = doc.get("subject")
        if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], Mapping):
            raise ReleaseError("a Veil release has exactly one subject: the server build")
        digest = subjects[0].get("digest")
        if subjects[0].get("name") != SUBJECT_NAME or not isinstance(digest, Mapping):
            raise ReleaseError(f"the subject must be {SUBJECT_NAME!r} with a sha256 digest")
        build = _unhex(digest.get("sha256"), 32, "subject digest sha256")
        predicate = doc.get("predicate")
        if not isinstance(predicate, Mapping) or set(predicate) - {"release", "platforms"}:
            raise ReleaseError("predicate must hold exactly release and platforms")
        name, platforms = predicate.get("release"), predicate.get("platforms")
        if not isinstance(name, str) or not name or not isinstance(platforms, Mapping) or not platforms:
            raise ReleaseError("predicate needs a release name and at least one platform")
        parsed: dict[PlatformName, PlatformRelease] = {}
        for key, value in platforms.items():
            try:
                platform = PlatformName.parse(key)
            except PolicyError as exc:
                raise ReleaseError(f"predicate.platforms: {exc}") from None
            parsed[platform] = PlatformRelease.from_json(value, f"platforms.{platform.value}")
        return Release(name, build, parsed)

    def payload(self) -> bytes:
        """The statement as canonical bytes (sorted keys, no spaces, UTF-8)."""
        return json.dumps(self.statement(), sort_keys=True, separators=(",", ":")).encode()


def _by_name(item: tuple[PlatformName, Any]) -> str:
    return item[0].value


# ---------------------------------------------------------------------------------- keys


def load_publisher_key(data: bytes | str | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key: the key itself, 32 raw bytes, 64 hex characters, or PEM (SPKI)."""
    if isinstance(data, Ed25519PublicKey):
        return data
    raw = data.encode() if isinstance(data, str) else bytes(data)
    text = raw.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
            if not isinstance(key, Ed25519PublicKey):
                raise ReleaseError("publisher key is not an Ed25519 key")
            return key
        if len(text) == 64:
            raw = bytes.fromhex(text.decode("ascii"))
        if len(raw) == 32:
            return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnicodeDecodeError):
        pass
    raise ReleaseError("publisher key must be an Ed25519 public key: PEM, 32 raw bytes or 64 hex characters")


def load_signing_key(data: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8, unencrypted), as ``veil release keygen`` writes."""
    try:
        key = serialization.load_pem_private_key(bytes(data), password=None)
    except (ValueError, TypeError):
        raise ReleaseError("signing key is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError("signing key is not an Ed25519 key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM, the form ``veil release keygen`` writes beside the private key."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def publisher_key_id(key: Ed25519PublicKey) -> str:
    """The DSSE ``keyid`` of ``key`` (securesystemslib's default: SHA-256 of its canonical JSON)."""
    return str(SSlibKey.from_crypto(key).keyid)


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex (what people compare)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------------- sign, verify


def sign_release(release: Release, key: Ed25519PrivateKey) -> bytes:
    """The DSSE envelope (JSON bytes) of ``release``'s statement, signed with ``key``."""
    envelope = Envelope(release.payload(), PAYLOAD_TYPE, {})
    envelope.sign(CryptoSigner(key))
    return (json.dumps(envelope.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def verify_release(manifest: bytes, publisher_key: bytes | str | Ed25519PublicKey) -> Release:
    """Verify a DSSE-enveloped release manifest with ``publisher_key``; return what it names.

    Raises :class:`ReleaseError` (check ``policy.release``) for anything but a manifest
    signed by exactly this key whose statement parses.
    """
    key = SSlibKey.from_crypto(load_publisher_key(publisher_key))
    if len(manifest) > MAX_MANIFEST_BYTES:
        raise ReleaseError(f"manifest of {len(manifest)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        envelope = Envelope.from_dict(json.loads(manifest))
    except (ValueError, KeyError, TypeError, AttributeError, sslib_errors.Error):
        raise ReleaseError(
            "manifest is not a DSSE envelope (JSON with payload, payloadType, signatures)"
        ) from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise ReleaseError(f"envelope payloadType is {envelope.payload_type!r}, not {PAYLOAD_TYPE}")
    if key.keyid not in envelope.signatures:
        ids = ", ".join(sorted(envelope.signatures)) or "none"
        raise ReleaseError(
            f"unknown publisher key: the manifest is signed by key id(s) {ids}, not {key.keyid}"
        )
    try:
        envelope.verify([key], 1)
    except (sslib_errors.Error, ValueError):
        raise ReleaseError(
            f"bad signature: the manifest's signature by key {key.keyid} does not verify"
        ) from None
    try:
        statement = json.loads(envelope.payload)
    except (ValueError, UnicodeDecodeError):
        raise ReleaseError("signed payload is not JSON") from None
    release = Release.from_statement(statement)
    return Release(release.name, release.build_digest, release.platforms, key.keyid)


# ---------------------------------------------------------------------------------- policy


def policy_from_release(
    manifest: bytes,
    *,
    publisher_key: bytes | str | Ed25519PublicKey,
    platform: PlatformName | str | None = None,
    trusted_roots: TrustedRoots | None = None,
) -> Policy:
    """:meth:`Policy.from_release <veil.attestation.policy.Policy.from_release>`'s body."""

    release = verify_release(manifest, publisher_key)
    roots = trusted_roots if trusted_roots is not None else TrustedRoots.vendor()
    if platform is not None:
        chosen = PlatformName.parse(platform) if isinstance(platform, str) else platform
        release.platform(chosen)  # raises when the manifest does not name it
        allowed = [chosen]
    else:
        allowed = [p for p in release.platforms if not p.simulated or roots.simulation]
        if not allowed:
            raise ReleaseError(
                f"release {release.name} names only the simulated platform: trust its simulation root"
            )
    pins = [release.platforms[p] for p in allowed]
    tdx = default_tdx()
    statuses = frozenset(s for p in pins for s in p.tdx_statuses)
    r0, r1, r2, r3 = (frozenset(v for p in pins for v in p.rtmr[i]) for i in range(4))
    floor: dict[str, Mapping[str, int]] = {}
    for p in pins:
        for product, levels in p.snp_tcb_floor.items():
            if product in floor and floor[product] != levels:
                raise ReleaseError(f"release {release.name}: platforms disagree on the {product} TCB floor")
            floor[product] = levels
    # HOST_DATA is an SNP field and MRCONFIGID a TDX one: each is compared among its own family.
    host_data = {release.platforms[p].host_data for p in allowed if p not in _TDX_FAMILY} or {None}
    mr_config_id = {release.platforms[p].mr_config_id for p in allowed if p in _TDX_FAMILY} or {None}
    data_policy = {p.data_policy_digest for p in pins}
    gpu_counts = {p.gpu_count for p in pins}
    if len(host_data) > 1 or len(mr_config_id) > 1 or len(data_policy) > 1 or len(gpu_counts) > 1:
        raise ReleaseError(
            f"release {release.name}: platforms differ in host_data, mr_config_id, data policy or "
            "GPU count; choose one with platform="
        )
    return Policy(
        platforms=frozenset(allowed),
        measurements=frozenset(m for p in pins for m in p.measurements),
        model_digests=frozenset(m for p in pins for m in p.model_digests),
        data_policy_digest=data_policy.pop(),
        build_digests=frozenset({release.build_digest}),
        host_data=host_data.pop(),
        azure_pcrs={i: v for p in pins for i, v in p.azure_pcrs.items()},
        gpu_count=gpu_counts.pop(),
        gpu=GpuPolicy(
            driver_versions=frozenset(v for p in pins for v in p.gpu_driver_versions),
            vbios_versions=frozenset(v for p in pins for v in p.gpu_vbios_versions),
        ),
        tcb_floor=floor or shipped_floor(),
        tdx=dataclasses.replace(
            tdx,
            rtmr=(r0, r1, r2, r3),
            allowed_tcb_statuses=statuses or tdx.allowed_tcb_statuses,
            mr_config_id=mr_config_id.pop(),
        ),
        trusted_roots=roots,
        release=release,
    )
