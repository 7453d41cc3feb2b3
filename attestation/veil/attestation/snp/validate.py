"""SEV-SNP **validate**: a verified report's fields against a policy (pure, no I/O).

Run :func:`veil.attestation.snp.verify.verify_snp` first: these checks only mean
something once the signature and chain hold. The default :class:`SnpPolicy` is
production-strict and fails closed: debug and migration agents refused, provisional
(uncommitted) firmware refused, committed ≤ current TCB enforced, VMPL 0 required, and
an empty measurement allow-list is a **failing** ``policy.measurement`` (the code identity
must be pinned) unless the loud opt-out ``allow_any_measurement`` is set. Optional
allow-lists (ID key, author key, ``host_data`` when none is pinned) show as a skipped
check ("no allow-list"), never as a pass.

TCB rule. The minimum TCB is always compared with ``reported_tcb``: that is the
level the VCEK/VLEK certifies, and firmware below it cannot derive that key, so it
is the cryptographically meaningful one. ``tcb_rule`` adds stricter comparisons:
``COMMITTED`` also requires the committed TCB (the anti-rollback floor) to meet the
minimum; ``CURRENT`` requires the committed and the running (current) TCB to.
``minimum_tcbs`` holds a floor per product (the client policy fills it from the dated
floor shipped in ``veil/attestation/data/tcb_floor.toml``); ``minimum_tcb``, when set,
applies to every product instead. With per-product floors and a product that has none
(or is unknown), ``policy.min_tcb`` fails.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from veil.attestation.errors import MalformedInputError, UnsupportedError
from veil.attestation.snp.azure import TpmQuote, parse_tpms_attest
from veil.attestation.snp.report import Product, SigningKey, SnpReport, TcbVersion
from veil.attestation.verdict import Verdict, VerdictBuilder

__all__ = ["UNPINNED_MEASUREMENT", "SnpPolicy", "TcbRule", "validate_azure_pcrs", "validate_snp"]

UNPINNED_MEASUREMENT = (
    "no measurement pinned: pin one with a signed release manifest (Policy.from_release, "
    "--release/--publisher-key) or an allow-list (measurements = [...]); to explore unknown "
    "evidence only, opt out with allow_any_measurement = true (--any-measurement)"
)
ANY_MEASUREMENT = "UNPINNED: any code identity accepted (allow_any_measurement opt-out; never in production)"


class TcbRule(enum.Enum):
    """Which of the report's TCB values must meet ``minimum_tcb`` (reported always does)."""

    REPORTED = "reported"
    COMMITTED = "committed"
    CURRENT = "current"


def _frozen_bytes(values: Iterable[bytes], size: int, what: str) -> frozenset[bytes]:
    out = frozenset(bytes(v) for v in values)
    if any(len(v) != size for v in out):
        raise MalformedInputError(f"every {what} must be {size} bytes")
    return out


@dataclass(frozen=True)
class SnpPolicy:
    """What a verified SEV-SNP report must show. Defaults are production-strict.

    Byte-valued fields are exact sizes: ``report_data`` 64, ``host_data`` 32,
    measurements 48, ID/author key digests 48, ``family_id``/``image_id`` 16.
    ``None`` / empty means "not checked" and is reported as a skip, except ``measurements``:
    empty fails ``policy.measurement`` unless ``allow_any_measurement``. ``vmpls`` None
    allows any VMPL (the default is VMPL 0 only).
    """

    allow_debug: bool = False
    allow_migration_agent: bool = False
    require_smt_disabled: bool = False
    vmpls: frozenset[int] | None = frozenset({0})
    minimum_tcb: TcbVersion | None = None
    minimum_tcbs: Mapping[Product, TcbVersion] = field(default_factory=dict, hash=False)
    tcb_rule: TcbRule = TcbRule.REPORTED
    permit_provisional_firmware: bool = False
    minimum_firmware: tuple[int, int, int] | None = None
    minimum_guest_svn: int | None = None
    measurements: frozenset[bytes] = field(default_factory=frozenset)
    report_data: bytes | None = None
    host_data: bytes | None = None
    require_id_block: bool = False
    id_key_digests: frozenset[bytes] = field(default_factory=frozenset)
    author_key_digests: frozenset[bytes] = field(default_factory=frozenset)
    family_id: bytes | None = None
    image_id: bytes | None = None
    products: frozenset[Product] | None = None
    signing_keys: frozenset[SigningKey] = frozenset({SigningKey.VCEK, SigningKey.VLEK})
    allow_any_measurement: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "measurements", _frozen_bytes(self.measurements, 48, "measurement"))
        set_(self, "id_key_digests", _frozen_bytes(self.id_key_digests, 48, "ID key digest"))
        set_(self, "author_key_digests", _frozen_bytes(self.author_key_digests, 48, "author key digest"))
        for name, size in (("report_data", 64), ("host_data", 32), ("family_id", 16), ("image_id", 16)):
            value = getattr(self, name)
            if value is not None and len(value) != size:
                raise MalformedInputError(f"policy {name} must be {size} bytes, got {len(value)}")
        if self.vmpls is not None:
            set_(self, "vmpls", frozenset(self.vmpls))
            if any(not 0 <= v <= 3 for v in self.vmpls):
                raise MalformedInputError("VMPLs are 0..3")
        if self.products is not None:
            set_(self, "products", frozenset(self.products))
        floors = dict(self.minimum_tcbs)
        if any(not isinstance(p, Product) or not isinstance(t, TcbVersion) for p, t in floors.items()):
            raise MalformedInputError("minimum_tcbs maps a Product to a TcbVersion")
        set_(self, "minimum_tcbs", floors)

    @staticmethod
    def from_mapping(data: Mapping[str, Any]) -> SnpPolicy:
        """A policy from a JSON/TOML-style mapping: byte fields as hex strings,
        ``minimum_tcb`` as ``{"bootloader": .., "tee": .., "snp": .., "microcode": .., "fmc": ..}``,
        ``tcb_rule`` as ``"reported" | "committed" | "current"``, ``products`` as names,
        ``signing_keys`` as ``"VCEK"``/``"VLEK"``. Unknown keys are an error.
        """
        known = set(SnpPolicy.__dataclass_fields__) - {"minimum_tcbs"}
        unknown = set(data) - known
        if unknown:
            raise MalformedInputError(f"unknown SNP policy key(s): {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {}
        try:
            for key, value in data.items():
                if key in ("report_data", "host_data", "family_id", "image_id"):
                    kwargs[key] = bytes.fromhex(value)
                elif key in ("measurements", "id_key_digests", "author_key_digests"):
                    kwargs[key] = frozenset(bytes.fromhex(v) for v in value)
                elif key == "minimum_tcb":
                    kwargs[key] = TcbVersion.from_parts(
                        bootloader=int(value["bootloader"]),
                        tee=int(value["tee"]),
                        snp=int(value["snp"]),
                        microcode=int(value["microcode"]),
                        fmc=int(value["fmc"]) if value.get("fmc") is not None else None,
                    )
                elif key == "tcb_rule":
                    kwargs[key] = TcbRule(value)
                elif key == "products":
                    kwargs[key] = frozenset(Product.from_name(v) for v in value)
                elif key == "signing_keys":
                    kwargs[key] = frozenset(SigningKey[v.upper()] for v in value)
                elif key == "vmpls":
                    kwargs[key] = frozenset(int(v) for v in value)
                elif key == "minimum_firmware":
                    major, minor, build = (int(v) for v in value)
                    kwargs[key] = (major, minor, build)
                elif key == "minimum_guest_svn":
                    kwargs[key] = int(value)
                else:
                    if not isinstance(value, bool):
                        raise MalformedInputError(f"SNP policy {key} must be true or false")
                    kwargs[key] = value
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise MalformedInputError(f"bad SNP policy value: {exc}") from None
        return SnpPolicy(**kwargs)


def _hex(b: bytes, n: int = 16) -> str:
    h = b.hex()
    return h if len(h) <= n else h[:n] + "…"


def _tcb_checks(b: VerdictBuilder, report: SnpReport, policy: SnpPolicy, product: Product | None) -> None:
    # Internal consistency, always: committed <= current, reported <= current.
    problems = [
        f"{name} {tcb} exceeds current {report.current_tcb}"
        for name, tcb in (("committed", report.committed_tcb), ("reported", report.reported_tcb))
        if not report.current_tcb.at_least(tcb)
    ]
    b.check("policy.tcb_order", not problems, "; ".join(problems) or "reported, committed <= current")

    # Name each component whose committed level differs from the running one (Turin: fmc too).
    committed, current = report.committed_tcb.components(), report.current_tcb.components()
    differs = [
        f"{name} committed {committed.get(name)} vs current {current.get(name)}"
        for name in dict.fromkeys([*committed, *current])
        if committed.get(name) != current.get(name)
    ]
    if report.firmware_committed != report.firmware_current:
        differs.append(
            f"firmware committed {'.'.join(map(str, report.firmware_committed))} "
            f"vs current {'.'.join(map(str, report.firmware_current))}"
        )
    provisional = bool(differs) or report.committed_tcb.raw != report.current_tcb.raw
    if provisional and not differs:  # only reserved TCB bytes differ
        differs.append(
            f"TCB committed 0x{report.committed_tcb.raw:016x} vs current 0x{report.current_tcb.raw:016x}"
        )
    if policy.permit_provisional_firmware:
        b.passed(
            "policy.provisional_firmware",
            f"provisional firmware permitted by policy: {'; '.join(differs)}"
            if provisional
            else "committed = current (provisional firmware permitted by policy)",
        )
    else:
        b.check(
            "policy.provisional_firmware",
            not provisional,
            f"running uncommitted firmware: {'; '.join(differs)}" if provisional else "committed = current",
        )

    _min_tcb_check(b, report, policy, product)
    _firmware_check(b, report, policy)


def _min_tcb_check(b: VerdictBuilder, report: SnpReport, policy: SnpPolicy, product: Product | None) -> None:
    minimum = policy.minimum_tcb
    if minimum is None and policy.minimum_tcbs:
        minimum = policy.minimum_tcbs.get(product) if product is not None else None
        if minimum is None:
            known = ", ".join(sorted(p.value for p in policy.minimum_tcbs))
            b.fail(
                "policy.min_tcb",
                f"no TCB floor for {product.value if product else 'an unknown product'} "
                f"(floors for {known}): name the product (--product) or set min_tcb",
            )
            return
    if minimum is None:
        b.skip("policy.min_tcb", "no minimum TCB in policy")
        return
    compared = [("reported", report.reported_tcb)]
    if policy.tcb_rule in (TcbRule.COMMITTED, TcbRule.CURRENT):
        compared.append(("committed", report.committed_tcb))
    if policy.tcb_rule is TcbRule.CURRENT:
        compared.append(("current", report.current_tcb))
    low = [f"{name} {tcb}" for name, tcb in compared if not tcb.at_least(minimum)]
    b.check(
        "policy.min_tcb",
        not low,
        (f"below minimum {minimum}: " + "; ".join(low))
        if low
        else f"{', '.join(n for n, _ in compared)} >= {minimum}",
    )


def _firmware_check(b: VerdictBuilder, report: SnpReport, policy: SnpPolicy) -> None:
    if policy.minimum_firmware is None:
        b.skip("policy.min_firmware", "no minimum firmware version in policy")
    else:
        ok = report.firmware_committed >= policy.minimum_firmware
        b.check(
            "policy.min_firmware",
            ok,
            f"committed firmware {'.'.join(map(str, report.firmware_committed))} "
            f"{'>=' if ok else '<'} {'.'.join(map(str, policy.minimum_firmware))}",
        )


def _exact(b: VerdictBuilder, name: str, actual: bytes, expected: bytes | None, what: str) -> None:
    if expected is None:
        b.skip(name, f"no expected {what} in policy")
    else:
        ok = actual == expected
        b.check(name, ok, f"{what} {_hex(actual)} " + ("matches" if ok else f"!= expected {_hex(expected)}"))


def validate_snp(report: SnpReport, policy: SnpPolicy, *, product: Product | str | None = None) -> Verdict:
    """Appraise a (verified) report against ``policy``; every check is named ``policy.*``.

    ``product``: the verified product (a :class:`Product` or a name such as ``"Milan"``)
    when the report does not carry CPUID (version 2); defaults to the report's own
    CPUID product. An unknown product name counts as no product.
    """
    b = VerdictBuilder()
    prod: Product | None = report.product
    if isinstance(product, Product):
        prod = product
    elif isinstance(product, str):
        try:
            prod = Product.from_name(product)
        except UnsupportedError:
            prod = None
    if policy.products is None:
        b.skip("policy.product", "any product allowed")
    else:
        allowed = ", ".join(sorted(p.value for p in policy.products))
        b.check(
            "policy.product",
            prod in policy.products,
            f"{prod.value if prod else 'unknown product'} "
            + ("allowed" if prod in policy.products else f"not in {allowed}"),
        )

    gp = report.guest_policy
    b.check(
        "policy.debug",
        policy.allow_debug or not gp.debug,
        "guest policy DEBUG=1 (host can read and change guest memory)"
        + (", allowed by policy" if policy.allow_debug else "")
        if gp.debug
        else "DEBUG=0",
    )
    b.check(
        "policy.migration_agent",
        policy.allow_migration_agent or not gp.migrate_ma,
        ("MIGRATE_MA=1" + (", allowed by policy" if policy.allow_migration_agent else ""))
        if gp.migrate_ma
        else "MIGRATE_MA=0",
    )
    if policy.require_smt_disabled:
        smt = report.platform.smt_en
        b.check("policy.smt", not smt, "platform SMT enabled" if smt else "platform SMT disabled")
    else:
        b.skip("policy.smt", "SMT permitted by policy")

    if policy.vmpls is None:
        b.skip("policy.vmpl", "any VMPL allowed")
    else:
        b.check(
            "policy.vmpl", report.vmpl in policy.vmpls, f"VMPL {report.vmpl}, allowed {sorted(policy.vmpls)}"
        )

    try:
        key_name = SigningKey(report.signing_key).name
    except ValueError:
        key_name = str(report.signing_key)
    b.check(
        "policy.signing_key",
        report.signing_key in policy.signing_keys,
        f"signed by {key_name}, allowed {sorted(k.name for k in policy.signing_keys)}",
    )
    _tcb_checks(b, report, policy, prod)
    if policy.minimum_guest_svn is None:
        b.skip("policy.guest_svn", "no minimum guest SVN in policy")
    else:
        b.check(
            "policy.guest_svn",
            report.guest_svn >= policy.minimum_guest_svn,
            f"guest SVN {report.guest_svn}, minimum {policy.minimum_guest_svn}",
        )

    if not policy.measurements:
        if policy.allow_any_measurement:
            b.skip("policy.measurement", f"{ANY_MEASUREMENT}; measurement {_hex(report.measurement)}")
        else:
            b.fail("policy.measurement", f"{UNPINNED_MEASUREMENT} (report: {report.measurement.hex()})")
    else:
        ok = report.measurement in policy.measurements
        b.check(
            "policy.measurement",
            ok,
            f"{_hex(report.measurement)} " + ("allowed" if ok else "not in the allow-list"),
        )
    _exact(b, "policy.report_data", report.report_data, policy.report_data, "report_data")
    _exact(b, "policy.host_data", report.host_data, policy.host_data, "host_data")
    _id_block_checks(b, report, policy)
    return b.build()


def _id_block_checks(b: VerdictBuilder, report: SnpReport, policy: SnpPolicy) -> None:
    has_id_block = any(report.id_key_digest)
    if policy.id_key_digests:
        ok = report.id_key_digest in policy.id_key_digests
        b.check(
            "policy.id_key",
            ok,
            f"ID key {_hex(report.id_key_digest)} " + ("allowed" if ok else "not in the allow-list"),
        )
    elif policy.require_id_block:
        b.check(
            "policy.id_key", has_id_block, "ID block present" if has_id_block else "no ID block at launch"
        )
    else:
        b.skip("policy.id_key", "no allow-list")
    if policy.author_key_digests:
        ok = report.author_key_en and report.author_key_digest in policy.author_key_digests
        b.check(
            "policy.author_key",
            ok,
            f"author key {_hex(report.author_key_digest)} "
            + ("allowed" if ok else "absent or not in the allow-list"),
        )
    else:
        b.skip("policy.author_key", "no allow-list")
    _exact(b, "policy.family_id", report.family_id, policy.family_id, "family_id")
    _exact(b, "policy.image_id", report.image_id, policy.image_id, "image_id")


def validate_azure_pcrs(quote: TpmQuote, pins: Mapping[int, bytes], *, allow_any: bool = False) -> Verdict:
    """``policy.azure_pcrs``: an Azure CVM's vTPM PCRs that measure the guest equal the pinned values.

    Run after :func:`~veil.attestation.snp.azure_verify.verify_azure_snp`, whose
    ``azure.tpm.pcr_digest`` proves the PCR values are the ones the quote signs. A pinned
    PCR the quote does not select fails; no pins fail unless ``allow_any`` (the loud opt-out).
    """
    b = VerdictBuilder()
    if not pins:
        if allow_any:
            b.skip("policy.azure_pcrs", ANY_MEASUREMENT)
        else:
            b.fail(
                "policy.azure_pcrs",
                "no vTPM PCR pinned: pin them with a signed release manifest (Policy.from_release) "
                'or azure_pcrs = { 4 = "<64 hex>", ... }; opt out with allow_any_measurement = true',
            )
        return b.build()
    try:
        attest = parse_tpms_attest(quote.message)
        selected = set(attest.pcr_select[0].pcrs) if len(attest.pcr_select) == 1 else set()
    except MalformedInputError as exc:
        b.fail("policy.azure_pcrs", f"quote did not parse: {exc}")
        return b.build()
    bad = []
    for index, value in sorted(pins.items()):
        if index not in selected or index >= len(quote.pcrs):
            bad.append(f"PCR{index} is not in the quote")
        elif quote.pcrs[index] != value:
            bad.append(f"PCR{index} {quote.pcrs[index].hex()} != pinned {value.hex()}")
    b.check(
        "policy.azure_pcrs",
        not bad,
        "; ".join(bad) or f"PCRs {', '.join(map(str, sorted(pins)))} equal the pinned values",
    )
    return b.build()
