"""The client's appraisal policy: which enclaves it is willing to talk to.

A :class:`Policy` is a frozen value, and the default **fails closed**. It trusts hardware
TEEs only, under the vendor roots shipped in ``roots/`` (AMD ARKs, NVIDIA device root),
never allows debug guests, never accepts the software simulator, requires VMPL 0, the
dated TCB floor shipped in ``data/tcb_floor.toml`` (per SNP product; TDX ``UpToDate``),
and a **pinned code identity**: an SNP measurement, TDX MRTD and RTMR0–3, Azure vTPM PCRs,
the server build, model and data-policy digests. Whatever is not pinned is a *failing*
check whose message says how to pin it. Pins come from a signed release manifest
(:meth:`Policy.from_release`, ``--release``; see :mod:`veil.attestation.release`) or from
explicit allow-lists; exploring unknown evidence takes the loudly named opt-out
``allow_any_measurement`` (``--any-measurement``), which logs a warning. Trusting the
simulator takes an explicit :meth:`Policy.simulated` (which reads the manifest the
simulated enclave signed beside its root) or a policy file naming a simulation root, and
says so loudly on stderr.

Policy files are TOML (every key optional)::

    platforms = ["SEV_SNP"]           # allowed: SEV_SNP, AZURE_SEV_SNP, TDX, AZURE_TDX, SIMULATED_SEV_SNP
    allow_debug = false               # never true in production
    min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }   # SNP, every product; fmc on Turin
    tcb_floor = { Milan = { bootloader = 4, tee = 0, snp = 22, microcode = 213 } }  # default: shipped
    measurements = ["<96 hex>"]       # SNP launch measurement / TDX MRTD allow-list; empty FAILS
    gpu_count = 1                     # exact number of GPU reports required; absent = any
    model_digests = ["<64 hex>"]      # SHA-256 of the weights file; empty FAILS
    data_policy_digest = "<64 hex>"   # the data-handling policy the enclave must enforce; absent FAILS
    build_digests = ["<64 hex>"]      # the server build (claims.server_build_digest); empty FAILS
    host_data = "<64 hex>"            # SNP HOST_DATA the launch must carry
    azure_pcrs = { 4 = "<64 hex>" }   # Azure CVM vTPM PCRs that measure the guest; empty FAILS on Azure
    require_crl = true                # the AMD chain is checked against its CRL
    allow_any_measurement = false     # LOUD opt-out: accept an unpinned code identity (skips, warns)

    [snp]                             # more SEV-SNP options (veil.attestation.snp.validate.SnpPolicy)
    vmpls = [0]
    require_smt_disabled = true

    [tdx]                             # more TDX options (veil.attestation.tdx.validate.TdxPolicy);
    rtmr0 = ["<96 hex>"]              # MRTD is `measurements`, debug is `allow_debug` above
    allowed_tcb_statuses = ["UpToDate"]

    [gpu]                             # GPU field options (veil.attestation.nvidia.validate.GpuPolicy)
    driver_versions = ["550.90.07"]
    require_rims = true

    [roots]                           # paths relative to the policy file
    amd = ["ark.pem"]                 # replaces the shipped AMD roots
    nvidia = ["root.pem"]             # replaces the shipped NVIDIA device root
    intel = ["root.pem"]              # replaces the shipped Intel SGX Root CA (TDX)
    simulation = "simulation-root.pem"  # needs "SIMULATED_SEV_SNP" in platforms

Unknown keys, wrong types and unreadable files raise :class:`PolicyError`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import logging
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.errors import PolicyError, VeilAttestationError
from veil.attestation.nvidia.validate import GpuPolicy
from veil.attestation.nvidia.verify import nvidia_device_root
from veil.attestation.snp.certs import load_certificates, pinned_ark
from veil.attestation.snp.report import Product, SnpReport, TcbVersion
from veil.attestation.snp.validate import SnpPolicy
from veil.attestation.tcb_floor import parse_snp_floor, shipped_tcb_floor, snp_floor_version
from veil.attestation.tdx.validate import TdxPolicy

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from veil.attestation.release import Release

__all__ = ["PlatformName", "Policy", "TrustedRoots", "load_roots", "vendor_amd_roots"]

_log = logging.getLogger("veil.attestation.policy")

TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")
MEASUREMENT_SIZES = (48,)  # SNP launch measurement, TDX MRTD
DIGEST_SIZE = 32
# SnpPolicy fields the top-level policy owns (so a policy file states each once).
_SNP_TOP_LEVEL = frozenset(
    {"allow_debug", "minimum_tcb", "measurements", "report_data", "host_data", "allow_any_measurement"}
)
_DEFAULT_SNP = SnpPolicy()
SIMULATION_RELEASE_FILE = "simulation-release.json"  # beside simulation-root.pem
SIMULATION_PUBLISHER_FILE = "simulation-publisher.pub"


def shipped_floor() -> dict[str, Mapping[str, int]]:
    return dict(shipped_tcb_floor().snp)


def default_tdx() -> TdxPolicy:
    return TdxPolicy(allowed_tcb_statuses=shipped_tcb_floor().tdx_statuses)


class PlatformName(enum.Enum):
    """Evidence platforms; the names are the proto ``Platform`` names without the prefix."""

    SIMULATED_SEV_SNP = "SIMULATED_SEV_SNP"
    SEV_SNP = "SEV_SNP"
    AZURE_SEV_SNP = "AZURE_SEV_SNP"
    TDX = "TDX"
    AZURE_TDX = "AZURE_TDX"

    @property
    def simulated(self) -> bool:
        return self is PlatformName.SIMULATED_SEV_SNP

    @classmethod
    def parse(cls, name: str) -> PlatformName:
        """``"SEV_SNP"`` or ``"PLATFORM_SEV_SNP"`` (any case); raises :class:`PolicyError`."""
        key = str(name).upper().removeprefix("PLATFORM_")
        try:
            return cls[key]
        except KeyError:
            allowed = ", ".join(p.value for p in cls)
            raise PolicyError(f"unknown platform {name!r} (allowed: {allowed})") from None


HARDWARE_PLATFORMS = frozenset(p for p in PlatformName if not p.simulated)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


@functools.cache
def vendor_amd_roots() -> tuple[x509.Certificate, ...]:
    return tuple(pinned_ark(product) for product in Product)


@dataclass(frozen=True, slots=True)
class TrustedRoots:
    """The trust anchors, one tuple per vendor.

    ``simulation`` holds the simulator's root(s); it is used only for evidence whose
    platform is ``SIMULATED_*`` and never for real hardware evidence, and vendor
    roots are never used for simulated evidence.
    """

    amd: tuple[x509.Certificate, ...] = ()
    nvidia: tuple[x509.Certificate, ...] = ()
    simulation: tuple[x509.Certificate, ...] = ()
    intel: tuple[x509.Certificate, ...] = ()  # Intel SGX Root CA (TDX PCK chain and collateral)

    @classmethod
    def vendor(cls) -> TrustedRoots:
        """The vendor roots shipped in the package (fingerprint-checked when loaded)."""
        from veil.attestation.tdx.verify import intel_sgx_root_ca

        try:
            return cls(amd=vendor_amd_roots(), nvidia=(nvidia_device_root(),), intel=(intel_sgx_root_ca(),))
        except (VeilAttestationError, OSError) as exc:
            raise PolicyError(f"shipped vendor roots unusable: {exc}") from exc

    def simulation_roles(self) -> tuple[tuple[x509.Certificate, ...], ...]:
        """The simulation roots by role: (AMD ARK, NVIDIA device root, NVIDIA RIM root).

        ``simulation-root.pem`` holds exactly these three, in this order, so each chain is
        anchored at its own root only (a RIM signed under the GPU device root is refused).
        A bundle of another size (a hand-made policy file) anchors every chain at any of its
        certificates.
        """
        sim = self.simulation
        if len(sim) == 3:
            return (sim[0],), (sim[1],), (sim[2],)
        return sim, sim, sim

    def describe(self) -> dict[str, list[str]]:
        """SHA-256 fingerprints of every root, per vendor."""
        return {
            name: [hashlib.sha256(_der(c)).hexdigest() for c in getattr(self, name)]
            for name in ("amd", "nvidia", "intel", "simulation")
        }


def load_roots(path: str | Path) -> tuple[x509.Certificate, ...]:
    """Every certificate in a PEM (or DER) file, as trust anchors."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read root certificate file {path}: {exc.strerror}") from None
    try:
        return tuple(load_certificates(data))
    except VeilAttestationError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def _hex_set(values: Iterable[bytes | str], what: str, sizes: tuple[int, ...]) -> frozenset[bytes]:
    out = set()
    for item in values:
        value = item
        if isinstance(item, str):
            try:
                value = bytes.fromhex(item.removeprefix("sha256:"))
            except ValueError:
                raise PolicyError(f"{what}: {item!r} is not hex") from None
        if not isinstance(value, bytes) or len(value) not in sizes:
            raise PolicyError(f"{what}: each entry must be {' or '.join(map(str, sizes))} bytes")
        out.add(value)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Policy:
    """What evidence must show before the client sends anything (see the module docstring).

    Empty identity allow-lists (``measurements``, ``model_digests``, ``build_digests``, no
    ``data_policy_digest``, TDX RTMRs, Azure PCRs) are failing checks unless
    ``allow_any_measurement``. ``min_tcb`` maps SNP TCB component names to minimum security
    patch levels for every product; without it ``tcb_floor`` (per product name, default the
    shipped floor) applies. ``release`` is the verified manifest the pins came from, if any.
    """

    platforms: frozenset[PlatformName] = HARDWARE_PLATFORMS
    allow_debug: bool = False
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    measurements: frozenset[bytes] = frozenset()
    gpu_count: int | None = None
    model_digests: frozenset[bytes] = frozenset()
    data_policy_digest: bytes | None = None
    trusted_roots: TrustedRoots = field(default_factory=TrustedRoots.vendor)
    snp: SnpPolicy = field(default_factory=SnpPolicy)
    tdx: TdxPolicy = field(default_factory=default_tdx)
    gpu: GpuPolicy = field(default_factory=GpuPolicy)
    # Fail-closed identity pinning (issue #11): an unpinned code identity fails unless this
    # explicit, loudly named opt-out is set (exploring unknown evidence only).
    allow_any_measurement: bool = False
    host_data: bytes | None = None  # SNP HOST_DATA (32 bytes) a release names
    azure_pcrs: Mapping[int, bytes] = field(default_factory=dict)  # Azure CVM vTPM PCR pins
    require_crl: bool = True  # the AMD chain must be checked against a (stapled) CRL
    build_digests: frozenset[bytes] = frozenset()  # claims.server_build_digest allow-list
    tcb_floor: Mapping[str, Mapping[str, int]] = field(default_factory=shipped_floor)
    release: Release | None = None

    def __post_init__(self) -> None:
        platforms = frozenset(
            p if isinstance(p, PlatformName) else PlatformName.parse(p) for p in self.platforms
        )
        object.__setattr__(self, "platforms", platforms)
        if not platforms:
            raise PolicyError("policy allows no platform")
        if not isinstance(self.allow_debug, bool):
            raise PolicyError("allow_debug must be a boolean")
        tcb = dict(self.min_tcb)
        for name, level in tcb.items():
            if name not in TCB_COMPONENTS:
                raise PolicyError(f"min_tcb: unknown component {name!r} (known: {', '.join(TCB_COMPONENTS)})")
            if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 255:
                raise PolicyError(f"min_tcb.{name} must be an integer in 0..255")
        object.__setattr__(self, "min_tcb", tcb)
        object.__setattr__(
            self, "measurements", _hex_set(self.measurements, "measurements", MEASUREMENT_SIZES)
        )
        object.__setattr__(
            self, "model_digests", _hex_set(self.model_digests, "model_digests", (DIGEST_SIZE,))
        )
        object.__setattr__(
            self, "build_digests", _hex_set(self.build_digests, "build_digests", (DIGEST_SIZE,))
        )
        object.__setattr__(self, "tcb_floor", parse_snp_floor(self.tcb_floor))
        if self.data_policy_digest is not None:
            (digest,) = _hex_set([self.data_policy_digest], "data_policy_digest", (DIGEST_SIZE,))
            object.__setattr__(self, "data_policy_digest", digest)
        if self.gpu_count is not None and (
            isinstance(self.gpu_count, bool) or not isinstance(self.gpu_count, int) or self.gpu_count < 0
        ):
            raise PolicyError("gpu_count must be a non-negative integer")
        if not isinstance(self.snp, SnpPolicy):
            raise PolicyError("snp must be an SnpPolicy")
        clashing = sorted(k for k in _SNP_TOP_LEVEL if getattr(self.snp, k) != getattr(_DEFAULT_SNP, k))
        if clashing:
            raise PolicyError(f"set {', '.join(clashing)} with the top-level keys, not in the SNP policy")
        for flag in ("allow_any_measurement", "require_crl"):
            if not isinstance(getattr(self, flag), bool):
                raise PolicyError(f"{flag} must be a boolean")
        if self.host_data is not None:
            (host_data,) = _hex_set([self.host_data], "host_data", (DIGEST_SIZE,))
            object.__setattr__(self, "host_data", host_data)
        pcrs: dict[int, bytes] = {}
        for index, value in dict(self.azure_pcrs).items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 23:
                raise PolicyError(f"azure_pcrs: PCR index {index!r} is not in 0..23")
            (pcrs[index],) = _hex_set([value], f"azure_pcrs.{index}", (DIGEST_SIZE,))
        object.__setattr__(self, "azure_pcrs", pcrs)
        if not isinstance(self.tdx, TdxPolicy) or not isinstance(self.gpu, GpuPolicy):
            raise PolicyError("tdx must be a TdxPolicy and gpu a GpuPolicy")
        if (
            self.tdx.allow_debug
            or self.tdx.mrtd
            or self.tdx.report_data is not None
            or self.tdx.allow_any_measurement
        ):
            raise PolicyError(
                "set allow_debug and measurements with the top-level keys, not in the TDX policy"
            )
        if not isinstance(self.trusted_roots, TrustedRoots):
            raise PolicyError("trusted_roots must be a TrustedRoots")
        simulated = PlatformName.SIMULATED_SEV_SNP in platforms
        if simulated and not self.trusted_roots.simulation:
            raise PolicyError("SIMULATED_SEV_SNP is allowed but no simulation root is given")
        if self.trusted_roots.simulation and not simulated:
            raise PolicyError("a simulation root is given but SIMULATED_SEV_SNP is not an allowed platform")
        if self.release is not None:
            from veil.attestation.release import Release

            if not isinstance(self.release, Release):
                raise PolicyError("release must be a verified Release")
        if self.allow_any_measurement:
            _log.warning(
                "ACCEPTING ANY CODE IDENTITY (allow_any_measurement): measurements, build, model and "
                "data-policy digests are not pinned; for exploring evidence only, never in production"
            )

    def __hash__(self) -> int:
        return hash(
            (self.platforms, self.allow_debug, tuple(sorted(self.min_tcb.items())), self.measurements)
        )

    def snp_policy(self, report: SnpReport, report_data: bytes | None) -> SnpPolicy:
        """The SEV-SNP field policy for ``report``: the ``snp`` options plus debug, TCB floor,
        measurements, ``host_data`` and the opt-out.

        ``min_tcb`` becomes a TCB_VERSION in the report's layout (Turin's includes ``fmc``) for
        every product; without it the per-product ``tcb_floor`` applies (the product is the
        report's CPUID, or the one :func:`validate_snp` is told).
        """
        minimum = None
        if self.min_tcb:
            parts = {k: self.min_tcb.get(k, 0) for k in ("bootloader", "tee", "snp", "microcode")}
            fmc = self.min_tcb.get("fmc", 0) if report.reported_tcb.turin else None
            minimum = TcbVersion.from_parts(**parts, fmc=fmc)
        floors = {Product(name): snp_floor_version(Product(name), lv) for name, lv in self.tcb_floor.items()}
        return dataclasses.replace(
            self.snp,
            allow_debug=self.allow_debug,
            minimum_tcb=minimum,
            minimum_tcbs=floors,
            measurements=self.measurements,
            report_data=report_data,
            host_data=self.host_data,
            allow_any_measurement=self.allow_any_measurement,
        )

    def tdx_policy(self, report_data: bytes | None) -> TdxPolicy:
        """The TDX field policy: the ``tdx`` options plus debug, MRTD (``measurements``) and the opt-out."""
        return dataclasses.replace(
            self.tdx,
            allow_debug=self.allow_debug,
            mrtd=self.measurements,
            report_data=report_data,
            allow_any_measurement=self.allow_any_measurement,
        )

    @property
    def allows_simulated(self) -> bool:
        """True when this policy trusts the software simulator (never by default)."""
        return PlatformName.SIMULATED_SEV_SNP in self.platforms

    def replace(self, **changes: Any) -> Policy:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def simulated(cls, root_pem_path: str | Path, **changes: Any) -> Policy:
        """Trust *only* the software simulator whose root is in ``root_pem_path``.

        For development and CI. The identity comes from the release manifest the simulated
        enclave signed beside its root (``simulation-release.json``, verified with
        ``simulation-publisher.pub`` from the same folder), so simulated evidence goes through
        the same fail-closed pinning as hardware. The evidence it accepts proves nothing about
        hardware; a warning saying so is logged (and printed to stderr when logging is not
        configured). Raises :class:`PolicyError` (:class:`ReleaseError` for the manifest).
        """
        root = Path(root_pem_path)
        roots = load_roots(root)
        fingerprints = ", ".join(hashlib.sha256(_der(c)).hexdigest()[:16] for c in roots)
        _log.warning(
            "TRUSTING A SIMULATED TEE: evidence signed by the simulation root %s (sha256 %s…) "
            "proves nothing about hardware; never use this policy in production",
            root_pem_path,
            fingerprints,
        )
        manifest, publisher = root.parent / SIMULATION_RELEASE_FILE, root.parent / SIMULATION_PUBLISHER_FILE
        try:
            manifest_bytes, publisher_key = manifest.read_bytes(), publisher.read_bytes()
        except OSError as exc:
            raise PolicyError(
                f"cannot read the simulated enclave's release manifest {exc.filename}: {exc.strerror} "
                "(`veil serve --tee simulated` writes it beside the simulation root)"
            ) from None
        base = cls.from_release(
            manifest_bytes,
            publisher_key=publisher_key,
            platform=PlatformName.SIMULATED_SEV_SNP,
            trusted_roots=TrustedRoots(simulation=roots),
        )
        return base.replace(**changes) if changes else base

    @classmethod
    def from_release(
        cls,
        manifest: bytes,
        *,
        publisher_key: bytes | str | Ed25519PublicKey,
        platform: PlatformName | str | None = None,
        trusted_roots: TrustedRoots | None = None,
    ) -> Policy:
        """A policy pinning exactly what a signed release manifest names.

        ``manifest`` is the DSSE envelope (:mod:`veil.attestation.release`); ``publisher_key``
        the Ed25519 public key that must have signed it (PEM, 32 raw bytes or hex). The policy
        allows the platforms the manifest names (only ``platform`` when given; the simulated
        one only with a simulation root in ``trusted_roots``) and pins, as the union over them,
        measurements, ``host_data``, TDX RTMRs, Azure PCRs, the build, model and data-policy
        digests, the GPU count and firmware versions and the TCB floor. Pass ``platform`` to
        pin exactly one platform's values. Raises :class:`ReleaseError` (a
        :class:`PolicyError`) for a bad signature, an unknown publisher key, or a platform the
        manifest does not name.
        """
        from veil.attestation.release import policy_from_release

        return policy_from_release(
            manifest, publisher_key=publisher_key, platform=platform, trusted_roots=trusted_roots
        )

    @classmethod
    def from_toml(cls, text: str, *, base_dir: str | Path | None = None) -> Policy:
        """Parse a TOML policy (see the module docstring); root paths resolve against ``base_dir``."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy is not valid TOML: {exc}") from None
        return cls.from_mapping(doc, base_dir=Path(base_dir) if base_dir else Path.cwd())

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Read a TOML policy file; relative root paths resolve against its folder."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read policy file {p}: {exc}") from None
        try:
            return cls.from_toml(text, base_dir=p.resolve().parent)
        except PolicyError as exc:
            raise PolicyError(f"{p}: {exc}") from None

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], *, base_dir: Path) -> Policy:
        """Build a policy from a parsed TOML document."""
        known = {
            "platforms", "allow_debug", "min_tcb", "measurements", "gpu_count", "model_digests",
            "data_policy_digest", "roots", "snp", "tdx", "gpu", "allow_any_measurement", "host_data",
            "azure_pcrs", "require_crl", "build_digests", "tcb_floor",
        }  # fmt: skip
        unknown = sorted(set(doc) - known)
        if unknown:
            raise PolicyError(f"unknown policy key(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        if "platforms" in doc:
            kwargs["platforms"] = frozenset(PlatformName.parse(p) for p in _list(doc, "platforms", str))
        if "allow_debug" in doc:
            kwargs["allow_debug"] = _typed(doc, "allow_debug", bool)
        if "min_tcb" in doc:
            kwargs["min_tcb"] = dict(_typed(doc, "min_tcb", dict))
        for key in ("measurements", "model_digests", "build_digests"):
            if key in doc:
                kwargs[key] = _list(doc, key, str)
        if "tcb_floor" in doc:
            kwargs["tcb_floor"] = _typed(doc, "tcb_floor", dict)
        if "gpu_count" in doc:
            kwargs["gpu_count"] = _typed(doc, "gpu_count", int)
        if "data_policy_digest" in doc:
            kwargs["data_policy_digest"] = _typed(doc, "data_policy_digest", str)
        for key in ("allow_any_measurement", "require_crl"):
            if key in doc:
                kwargs[key] = _typed(doc, key, bool)
        if "host_data" in doc:
            kwargs["host_data"] = _typed(doc, "host_data", str)
        if "azure_pcrs" in doc:
            table = _typed(doc, "azure_pcrs", dict)
            try:
                kwargs["azure_pcrs"] = {int(k): v for k, v in table.items()}
            except ValueError:
                raise PolicyError("azure_pcrs keys must be PCR numbers") from None
        if "roots" in doc:
            kwargs["trusted_roots"] = _roots(_typed(doc, "roots", dict), base_dir)
        if "snp" in doc:
            table = _typed(doc, "snp", dict)
            top = sorted(set(table) & (_SNP_TOP_LEVEL | {"minimum_tcb"}))
            if top:
                raise PolicyError(f"[snp] {', '.join(top)}: use the top-level keys instead")
            try:
                kwargs["snp"] = SnpPolicy.from_mapping(table)
            except VeilAttestationError as exc:
                raise PolicyError(f"[snp]: {exc}") from None
        for key, kind in (("tdx", TdxPolicy), ("gpu", GpuPolicy)):
            if key in doc:
                try:
                    kwargs[key] = kind.from_mapping(_typed(doc, key, dict))
                except VeilAttestationError as exc:
                    raise PolicyError(f"[{key}]: {exc}") from None
        policy = cls(**kwargs)
        if policy.allows_simulated:
            _log.warning(
                "TRUSTING A SIMULATED TEE (policy file allows SIMULATED_SEV_SNP): "
                "such evidence proves nothing about hardware"
            )
        return policy

    def describe(self) -> list[str]:
        """One line per setting, for CLI summaries."""
        roots = self.trusted_roots.describe()
        unpinned = "ANY (opt-out)" if self.allow_any_measurement else "none pinned: fails"
        release = self.release
        return [
            f"platforms: {', '.join(sorted(p.value for p in self.platforms))}",
            "release: "
            + (f"{release.name} (publisher key id {release.publisher_key_id})" if release else "none"),
            f"debug guests: {'ALLOWED' if self.allow_debug else 'rejected'}",
            f"minimum TCB: {self.min_tcb or f'floor per product {dict(self.tcb_floor)}'}",
            f"measurements: {len(self.measurements) or unpinned}",
            f"builds: {len(self.build_digests) or unpinned}",
            f"GPUs required: {'any' if self.gpu_count is None else self.gpu_count}",
            f"models: {len(self.model_digests) or unpinned}",
            f"data policy: {self.data_policy_digest.hex() if self.data_policy_digest else unpinned}",
            "roots: " + ", ".join(f"{k} {len(v)}" for k, v in roots.items() if v),
        ]


def _typed(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    value = doc[key]
    if kind is int and isinstance(value, bool):
        raise PolicyError(f"{key} must be an integer")
    if not isinstance(value, kind):
        raise PolicyError(f"{key} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _list(doc: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    value = doc[key]
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise PolicyError(f"{key} must be a list of {kind.__name__}")
    return value


def _roots(doc: Mapping[str, Any], base_dir: Path) -> TrustedRoots:
    unknown = sorted(set(doc) - {"amd", "nvidia", "intel", "simulation"})
    if unknown:
        raise PolicyError(f"unknown [roots] key(s): {', '.join(unknown)}")
    vendor = TrustedRoots.vendor()

    def load(key: str) -> tuple[x509.Certificate, ...]:
        value = doc[key]
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or not paths:
            raise PolicyError(f"roots.{key} must be a path or a non-empty list of paths")
        return tuple(c for p in paths for c in load_roots(base_dir / p))

    return TrustedRoots(
        amd=load("amd") if "amd" in doc else vendor.amd,
        nvidia=load("nvidia") if "nvidia" in doc else vendor.nvidia,
        intel=load("intel") if "intel" in doc else vendor.intel,
        simulation=load("simulation") if "simulation" in doc else (),
    )
