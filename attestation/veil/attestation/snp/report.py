"""AMD SEV-SNP ``ATTESTATION_REPORT``: parsing and serialising (pure, no I/O).

The layout is Table 23 of AMD's *SEV Secure Nested Paging Firmware ABI
Specification* (56860): 0x4A0 bytes, little-endian fields, report versions 2, 3,
4 and 5. Version 3 added the CPUID family/model/stepping at 0x188 (so the
product is known without a certificate); version 5 added the mitigation vectors
at 0x1F8 and 0x200. Turin (family 0x1A) packs its TCB_VERSION differently and
adds an FMC security patch level.

Parsing is strict in the way go-sev-guest is: every reserved range must be zero,
reserved flag bits must be clear and the guest policy's must-be-one bit set, so
:meth:`SnpReport.to_bytes` of a parsed report gives back exactly the input bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass, field

from veil.attestation.errors import MalformedInputError, UnsupportedError

__all__ = [
    "REPORT_SIZE",
    "SIGNATURE_ALGO_ECDSA_P384_SHA384",
    "SIGNED_SIZE",
    "GuestPolicy",
    "PlatformInfo",
    "Product",
    "SigningKey",
    "SnpReport",
    "TcbVersion",
    "build_snp_report",
    "parse_snp_report",
    "product_from_cpuid",
]

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIGNATURE_COMPONENT_SIZE = 72
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
SUPPORTED_VERSIONS = frozenset({2, 3, 4, 5})
TURIN_FAMILY = 0x1A
_POLICY_RESERVED_ONE = 1 << 17
_POLICY_MAX_BIT = 25


class Product(enum.Enum):
    """An SEV-SNP product line; the value is the name AMD's KDS uses."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @classmethod
    def from_name(cls, name: str) -> Product:
        """``"Milan"``, ``"milan"`` or a KDS product name with stepping (``"Milan-B0"``)."""
        base = name.split("-", 1)[0].strip().lower()
        for product in cls:
            if product.value.lower() == base:
                return product
        raise UnsupportedError(f"unknown SEV-SNP product {name!r}")


def product_from_cpuid(family: int, model: int) -> Product | None:
    """The product line for a CPUID family/model, or None when it is not an SNP product we know."""
    if family == 0x19:
        if model <= 0x0F:
            return Product.MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:  # Genoa, Genoa-X; Bergamo/Siena
            return Product.GENOA
        return None
    if family == TURIN_FAMILY and model <= 0x1F:  # Turin (0x02) and Turin dense (0x11)
        return Product.TURIN
    return None


class SigningKey(enum.IntEnum):
    """``SIGNING_KEY`` (report bits 0x48[4:2]): which key signed the report."""

    VCEK = 0
    VLEK = 1
    NONE = 7


def _decode_tcb(raw: int, *, turin: bool) -> tuple[int, int, int, int, int | None]:
    if not 0 <= raw < 1 << 64:
        raise MalformedInputError("TCB_VERSION out of range")
    b = raw.to_bytes(8, "little")
    if turin:
        return (b[1], b[2], b[3], b[7], b[0])
    return (b[0], b[1], b[6], b[7], None)


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """A 64-bit ``TCB_VERSION``: the security patch level of each firmware component.

    Milan and Genoa: byte 0 bootloader, 1 TEE, 6 SNP, 7 microcode. Turin: byte 0 FMC,
    1 bootloader, 2 TEE, 3 SNP, 7 microcode (``fmc`` is None on the older layout).
    The remaining bytes are reserved; ``raw`` keeps all eight.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None
    raw: int

    def __post_init__(self) -> None:
        if _decode_tcb(self.raw, turin=self.fmc is not None) != (
            self.bootloader,
            self.tee,
            self.snp,
            self.microcode,
            self.fmc,
        ):
            raise MalformedInputError("TCB_VERSION components disagree with its raw value")

    @property
    def turin(self) -> bool:
        return self.fmc is not None

    @staticmethod
    def from_raw(raw: int, *, turin: bool) -> TcbVersion:
        """Decode a raw TCB_VERSION in the Turin layout or the Milan/Genoa one."""
        return TcbVersion(*_decode_tcb(raw, turin=turin), raw)

    @staticmethod
    def from_parts(
        *, bootloader: int, tee: int, snp: int, microcode: int, fmc: int | None = None
    ) -> TcbVersion:
        """Compose a TCB_VERSION (reserved bytes zero); give ``fmc`` for the Turin layout."""
        parts = (bootloader, tee, snp, microcode, 0 if fmc is None else fmc)
        if any(not 0 <= p <= 0xFF for p in parts):
            raise MalformedInputError("TCB component outside 0..255")
        if fmc is None:
            b = bytes([bootloader, tee, 0, 0, 0, 0, snp, microcode])
        else:
            b = bytes([fmc, bootloader, tee, snp, 0, 0, 0, microcode])
        return TcbVersion(bootloader, tee, snp, microcode, fmc, int.from_bytes(b, "little"))

    def components(self) -> dict[str, int]:
        """The named security patch levels (``fmc`` only on Turin)."""
        parts = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            parts["fmc"] = self.fmc
        return parts

    def at_least(self, minimum: TcbVersion) -> bool:
        """True when every component is >= the minimum's (both must use the same layout)."""
        if self.turin != minimum.turin:
            return False
        mine = self.components()
        return all(mine[name] >= level for name, level in minimum.components().items())

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.components().items()) + f" (0x{self.raw:016x})"


@dataclass(frozen=True, slots=True)
class GuestPolicy:
    """The guest ``POLICY`` bits (ABI spec Table 9)."""

    abi_minor: int
    abi_major: int
    smt: bool
    migrate_ma: bool
    debug: bool
    single_socket: bool
    cxl_allow: bool
    mem_aes_256_xts: bool
    rapl_dis: bool
    ciphertext_hiding: bool
    page_swap_disable: bool

    @staticmethod
    def from_int(value: int) -> GuestPolicy:
        def bit(n: int) -> bool:
            return bool(value >> n & 1)

        return GuestPolicy(
            value & 0xFF, value >> 8 & 0xFF, bit(16), bit(18), bit(19), bit(20), bit(21), bit(22), bit(23),
            bit(24), bit(25),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PlatformInfo:
    """``PLATFORM_INFO`` bits: the platform state when the report was made."""

    smt_en: bool
    tsme_en: bool
    ecc_en: bool
    rapl_dis: bool
    ciphertext_hiding_en: bool
    alias_check_complete: bool
    tio_en: bool

    @staticmethod
    def from_int(value: int) -> PlatformInfo:
        return PlatformInfo(*(bool(value >> n & 1) for n in (0, 1, 2, 3, 4, 5, 7)))


@dataclass(frozen=True, slots=True)
class SnpReport:
    """Every field of an SEV-SNP ``ATTESTATION_REPORT``, named as in the ABI spec.

    ``cpuid_*`` are None in version 2 reports, the mitigation vectors None before
    version 5. ``signature_r`` / ``signature_s`` are the 72-byte little-endian fields
    at 0x2A0 and 0x2E8. ``raw`` is the serialised report, always in step with the
    fields (recomputed on construction, so ``dataclasses.replace`` stays consistent).
    """

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: bytes
    signature_s: bytes
    raw: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", _serialise(self))

    def to_bytes(self) -> bytes:
        """The 0x4A0-byte report."""
        return self.raw

    def signed_bytes(self) -> bytes:
        """Bytes 0x000..0x29F, the region the signature covers."""
        return self.raw[:SIGNED_SIZE]

    @property
    def product(self) -> Product | None:
        """The product line from CPUID (version 3+ reports), else None."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    @property
    def guest_policy(self) -> GuestPolicy:
        return GuestPolicy.from_int(self.policy)

    @property
    def platform(self) -> PlatformInfo:
        return PlatformInfo.from_int(self.platform_info)

    @property
    def flags(self) -> int:
        """The raw 32-bit word at 0x48 (AUTHOR_KEY_EN, MASK_CHIP_KEY, SIGNING_KEY)."""
        return int(self.author_key_en) | int(self.mask_chip_key) << 1 | self.signing_key << 2

    @property
    def firmware_current(self) -> tuple[int, int, int]:
        """(major, minor, build) of the running SNP firmware."""
        return (self.current_major, self.current_minor, self.current_build)

    @property
    def firmware_committed(self) -> tuple[int, int, int]:
        return (self.committed_major, self.committed_minor, self.committed_build)

    def to_dict(self) -> dict[str, object]:
        """Every field, JSON-ready (bytes as hex, TCBs by component), plus the decoded bit fields."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            if f.name == "raw":
                continue
            value = getattr(self, f.name)
            if isinstance(value, bytes):
                out[f.name] = value.hex()
            elif isinstance(value, TcbVersion):
                out[f.name] = {**value.components(), "raw": f"0x{value.raw:016x}"}
            else:
                out[f.name] = value
        out["product"] = self.product.value if self.product else None
        out["guest_policy_bits"] = dataclasses.asdict(self.guest_policy)
        out["platform_info_bits"] = dataclasses.asdict(self.platform)
        try:
            out["signing_key_name"] = SigningKey(self.signing_key).name
        except ValueError:
            out["signing_key_name"] = f"reserved ({self.signing_key})"
        return out

    def with_signature(self, r: int, s: int) -> SnpReport:
        """A copy carrying the ECDSA signature (r, s) in the report's little-endian form."""
        try:
            r_bytes = r.to_bytes(SIGNATURE_COMPONENT_SIZE, "little")
            s_bytes = s.to_bytes(SIGNATURE_COMPONENT_SIZE, "little")
        except OverflowError as exc:
            raise MalformedInputError("signature component too large") from exc
        return dataclasses.replace(self, signature_r=r_bytes, signature_s=s_bytes)


_FIXED_SIZES = {
    "family_id": 16,
    "image_id": 16,
    "report_data": 64,
    "measurement": 48,
    "host_data": 32,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "report_id": 32,
    "report_id_ma": 32,
    "chip_id": 64,
    "signature_r": SIGNATURE_COMPONENT_SIZE,
    "signature_s": SIGNATURE_COMPONENT_SIZE,
}


def _check_int(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise MalformedInputError(f"{name} does not fit in {bits} bits")


def _serialise(r: SnpReport) -> bytes:
    for name, size in _FIXED_SIZES.items():
        value = getattr(r, name)
        if not isinstance(value, bytes) or len(value) != size:
            raise MalformedInputError(f"{name} must be {size} bytes")
    for name in ("version", "guest_svn", "vmpl", "signature_algo"):
        _check_int(name, getattr(r, name), 32)
    for name in ("policy", "platform_info"):
        _check_int(name, getattr(r, name), 64)
    for name in ("current_build", "current_minor", "current_major"):
        _check_int(name, getattr(r, name), 8)
    for name in ("committed_build", "committed_minor", "committed_major"):
        _check_int(name, getattr(r, name), 8)
    _check_int("signing_key", r.signing_key, 3)
    has_cpuid = r.version >= 3
    if has_cpuid != (r.cpuid_fam_id is not None and r.cpuid_mod_id is not None and r.cpuid_step is not None):
        raise MalformedInputError("CPUID fields are present exactly in version 3+ reports")
    has_mit = r.version >= 5
    if has_mit != (r.launch_mit_vector is not None and r.current_mit_vector is not None):
        raise MalformedInputError("mitigation vectors are present exactly in version 5+ reports")
    turin = r.cpuid_fam_id == TURIN_FAMILY
    for name in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
        if getattr(r, name).turin != turin:
            raise MalformedInputError(f"{name} layout does not match the report's CPU family")

    out = bytearray(REPORT_SIZE)
    struct.pack_into("<IIQ", out, 0x00, r.version, r.guest_svn, r.policy)
    out[0x10:0x20] = r.family_id
    out[0x20:0x30] = r.image_id
    struct.pack_into(
        "<IIQQI", out, 0x30, r.vmpl, r.signature_algo, r.current_tcb.raw, r.platform_info, r.flags
    )
    out[0x50:0x90] = r.report_data
    out[0x90:0xC0] = r.measurement
    out[0xC0:0xE0] = r.host_data
    out[0xE0:0x110] = r.id_key_digest
    out[0x110:0x140] = r.author_key_digest
    out[0x140:0x160] = r.report_id
    out[0x160:0x180] = r.report_id_ma
    struct.pack_into("<Q", out, 0x180, r.reported_tcb.raw)
    if r.cpuid_fam_id is not None and r.cpuid_mod_id is not None and r.cpuid_step is not None:
        for name, value in (("cpuid_fam_id", r.cpuid_fam_id), ("cpuid_mod_id", r.cpuid_mod_id)):
            _check_int(name, value, 8)
        _check_int("cpuid_step", r.cpuid_step, 8)
        out[0x188:0x18B] = bytes([r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step])
    out[0x1A0:0x1E0] = r.chip_id
    struct.pack_into("<Q", out, 0x1E0, r.committed_tcb.raw)
    out[0x1E8:0x1EB] = bytes([r.current_build, r.current_minor, r.current_major])
    out[0x1EC:0x1EF] = bytes([r.committed_build, r.committed_minor, r.committed_major])
    struct.pack_into("<Q", out, 0x1F0, r.launch_tcb.raw)
    if r.launch_mit_vector is not None and r.current_mit_vector is not None:
        _check_int("launch_mit_vector", r.launch_mit_vector, 64)
        _check_int("current_mit_vector", r.current_mit_vector, 64)
        struct.pack_into("<QQ", out, 0x1F8, r.launch_mit_vector, r.current_mit_vector)
    out[0x2A0:0x2E8] = r.signature_r
    out[0x2E8:0x330] = r.signature_s
    return bytes(out)


def _require_zero(data: bytes, lo: int, hi: int) -> None:
    if any(data[lo:hi]):
        raise MalformedInputError(f"reserved bytes 0x{lo:03X}..0x{hi - 1:03X} are not zero")


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse a 0x4A0-byte ATTESTATION_REPORT (versions 2 to 5).

    Raises :class:`MalformedInputError` for a wrong length or non-zero reserved
    bits, :class:`UnsupportedError` for an unknown version or signature algorithm.
    """
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise MalformedInputError(f"SEV-SNP report must be {REPORT_SIZE} bytes, got {len(data)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedError(f"SEV-SNP report version {version} is not supported (2 to 5 are)")
    vmpl, sig_algo, current_tcb, platform_info, flags = struct.unpack_from("<IIQQI", data, 0x30)
    if sig_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise UnsupportedError(
            f"signature algorithm {sig_algo} is not supported (1 = ECDSA P-384/SHA-384 is)"
        )
    if not policy & _POLICY_RESERVED_ONE:
        raise MalformedInputError("guest policy bit 17 is reserved and must be 1")
    if policy >> (_POLICY_MAX_BIT + 1):
        raise MalformedInputError(f"guest policy has reserved bits set: 0x{policy:x}")
    if flags >> 5:
        raise MalformedInputError(f"reserved bits of the signer-info word are set: 0x{flags:x}")
    signing_key = flags >> 2 & 7
    if signing_key not in (SigningKey.VCEK, SigningKey.VLEK, SigningKey.NONE):
        raise MalformedInputError(f"SIGNING_KEY {signing_key} is reserved")
    _require_zero(data, 0x4C, 0x50)
    fam: int | None = None
    mod: int | None = None
    step: int | None = None
    if version >= 3:
        fam, mod, step = data[0x188], data[0x189], data[0x18A]
        _require_zero(data, 0x18B, 0x1A0)
    else:
        _require_zero(data, 0x188, 0x1A0)
    _require_zero(data, 0x1EB, 0x1EC)
    _require_zero(data, 0x1EF, 0x1F0)
    if version >= 5:
        launch_mit, current_mit = struct.unpack_from("<QQ", data, 0x1F8)
        mit: tuple[int | None, int | None] = (launch_mit, current_mit)
    else:
        mit = (None, None)
        _require_zero(data, 0x1F8, 0x208)
    _require_zero(data, 0x208, SIGNED_SIZE)
    _require_zero(data, 0x330, REPORT_SIZE)
    turin = fam == TURIN_FAMILY

    def tcb(offset: int) -> TcbVersion:
        return TcbVersion.from_raw(struct.unpack_from("<Q", data, offset)[0], turin=turin)

    report = SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=TcbVersion.from_raw(current_tcb, turin=turin),
        platform_info=platform_info,
        author_key_en=bool(flags & 1),
        mask_chip_key=bool(flags & 2),
        signing_key=signing_key,
        report_data=data[0x50:0x90],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=tcb(0x180),
        cpuid_fam_id=fam,
        cpuid_mod_id=mod,
        cpuid_step=step,
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        current_build=data[0x1E8],
        current_minor=data[0x1E9],
        current_major=data[0x1EA],
        committed_build=data[0x1EC],
        committed_minor=data[0x1ED],
        committed_major=data[0x1EE],
        launch_tcb=tcb(0x1F0),
        launch_mit_vector=mit[0],
        current_mit_vector=mit[1],
        signature_r=data[0x2A0:0x2E8],
        signature_s=data[0x2E8:0x330],
    )
    if report.raw != data:  # every byte is either a field or checked zero above
        raise MalformedInputError("SEV-SNP report does not round-trip")
    return report


_DEFAULT_CPUID = {
    Product.MILAN: (0x19, 0x01, 0x01),
    Product.GENOA: (0x19, 0x11, 0x01),
    Product.TURIN: (0x1A, 0x02, 0x00),
}


def build_snp_report(
    *,
    version: int = 3,
    product: Product | None = Product.MILAN,
    cpuid: tuple[int, int, int] | None = None,
    guest_svn: int = 0,
    policy: int = 0x30000,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    vmpl: int = 0,
    current_tcb: TcbVersion | None = None,
    reported_tcb: TcbVersion | None = None,
    committed_tcb: TcbVersion | None = None,
    launch_tcb: TcbVersion | None = None,
    platform_info: int = 0,
    author_key_en: bool = False,
    mask_chip_key: bool = False,
    signing_key: int = SigningKey.VCEK,
    report_data: bytes = bytes(64),
    measurement: bytes = bytes(48),
    host_data: bytes = bytes(32),
    id_key_digest: bytes = bytes(48),
    author_key_digest: bytes = bytes(48),
    report_id: bytes = bytes(32),
    report_id_ma: bytes = b"\xff" * 32,
    chip_id: bytes = bytes(64),
    firmware: tuple[int, int, int] = (1, 55, 0),
    mit_vectors: tuple[int, int] = (0, 0),
) -> SnpReport:
    """Compose an unsigned report (signature zero); sign it with ``sign_snp_report``.

    ``product`` (or an explicit ``cpuid`` family/model/stepping) fills the CPUID
    bytes of version 3+ reports and picks the TCB layout. TCBs default to all zero
    in that layout; ``firmware`` is (major, minor, build) for both current and committed.
    """
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedError(f"SEV-SNP report version {version} is not supported")
    fms: tuple[int, int, int] | None = None
    if version >= 3:
        fms = cpuid if cpuid is not None else (_DEFAULT_CPUID[product] if product is not None else None)
        if fms is None:
            raise MalformedInputError("version 3+ reports need a product or CPUID")
    turin = fms is not None and fms[0] == TURIN_FAMILY
    zero = TcbVersion.from_raw(0, turin=turin)
    major, minor, build = firmware
    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        signature_algo=SIGNATURE_ALGO_ECDSA_P384_SHA384,
        current_tcb=current_tcb or reported_tcb or zero,
        platform_info=platform_info,
        author_key_en=author_key_en,
        mask_chip_key=mask_chip_key,
        signing_key=int(signing_key),
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        id_key_digest=id_key_digest,
        author_key_digest=author_key_digest,
        report_id=report_id,
        report_id_ma=report_id_ma,
        reported_tcb=reported_tcb or zero,
        cpuid_fam_id=fms[0] if fms else None,
        cpuid_mod_id=fms[1] if fms else None,
        cpuid_step=fms[2] if fms else None,
        chip_id=chip_id,
        committed_tcb=committed_tcb or reported_tcb or zero,
        current_build=build,
        current_minor=minor,
        current_major=major,
        committed_build=build,
        committed_minor=minor,
        committed_major=major,
        launch_tcb=launch_tcb or reported_tcb or zero,
        launch_mit_vector=mit_vectors[0] if version >= 5 else None,
        current_mit_vector=mit_vectors[1] if version >= 5 else None,
        signature_r=bytes(SIGNATURE_COMPONENT_SIZE),
        signature_s=bytes(SIGNATURE_COMPONENT_SIZE),
    )
