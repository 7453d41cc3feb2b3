"""SEV-SNP **verify**: the report's signature, its certificate chain, and the VCEK's extensions.

The chain is VCEK → ASK → ARK (or VLEK → ASVK → ARK), every link RSASSA-PSS with
SHA-384, MGF1-SHA-384 and a 48-byte salt (exactly those parameters; anything else
fails). The ARK must be one of the options' ``trusted_roots``: when there are none, the
AMD ARK of the report's product, pinned in the package. The report is signed with ECDSA P-384 /
SHA-384 over bytes 0x000..0x29F; r and s are 72-byte little-endian fields.

Stricter than go-sev-guest where it is lax: an ARK carried in the bundle must be
byte-identical to a trusted root; ARK and ASK must be CA certificates (basic
constraints ``CA:TRUE``); the product is cross-checked between the caller, the
report's CPUID and the VCEK's product name; the VCEK's reserved SPL extensions
must be zero; the report's SIGNING_KEY must agree with the leaf's kind; every
certificate must be valid at the injected ``now``. Clock and roots come in one
:class:`~veil.attestation.options.VerifyOptions`.

Check names say which key they are about. A VCEK report gives ``snp.chain.ark``,
``snp.chain.ask``, ``snp.chain.leaf``, ``snp.vcek.*``; a VLEK report gives ``snp.chain.ark``,
``snp.chain.asvk``, ``snp.chain.leaf``, ``snp.vlek.*`` (same suffixes: ``extensions``,
``signing_key``, ``product``, ``tcb``, ``hwid``), and every message names VLEK / ASVK. The
stable prefixes are ``snp.chain.`` and ``snp.``; ``snp.chain.ark``, ``snp.chain.leaf``,
``snp.chain.validity``, ``snp.chain.crl`` and ``snp.signature`` are the same for both.

A check that judges something a failed check should have authenticated is ``skip``
("not checked: … failed"), never ``pass``: the leaf's extensions (product, TCB, hwID)
after a failed ``snp.chain.*`` link, the report's fields (TCB, CHIP_ID, SIGNING_KEY)
after a failed ``snp.signature``, the CRL after a failed ARK or ASK/ASVK.

Field policy (debug, TCB minimums, measurements, ...) is :mod:`veil.attestation.snp.validate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from veil.attestation.errors import MalformedInputError, UnsupportedError
from veil.attestation.options import VerifyOptions
from veil.attestation.snp.certs import (
    AmdKeyExtensions,
    ensure_decodable,
    fingerprint,
    parse_amd_extensions,
    pinned_ark,
    pinned_ask,
    pinned_asvk,
)
from veil.attestation.snp.report import (
    REPORT_SIZE,
    SIGNED_SIZE,
    Product,
    SigningKey,
    SnpReport,
    parse_snp_report,
)
from veil.attestation.verdict import Verdict, VerdictBuilder

__all__ = [
    "sign_snp_report",
    "verify_amd_chain",
    "verify_report_signature",
    "verify_snp",
    "verify_snp_bytes",
]

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_SERIAL_WARNING = r".*serial number which wasn't positive.*"


def sign_snp_report(report: SnpReport, key: ec.EllipticCurvePrivateKey) -> SnpReport:
    """A copy of ``report`` signed with ``key`` (P-384) the way AMD firmware signs it.

    For the simulated TEE and for tests; real reports are signed by the AMD secure processor.
    """
    if not isinstance(key.curve, ec.SECP384R1):
        raise UnsupportedError("SEV-SNP reports are signed with P-384 keys")
    r, s = decode_dss_signature(key.sign(report.signed_bytes(), ec.ECDSA(hashes.SHA384())))
    return report.with_signature(r, s)


def verify_report_signature(raw: bytes, public_key: object) -> str | None:
    """Check the ECDSA P-384 / SHA-384 signature of a 0x4A0-byte report.

    Returns None when it verifies, else the reason it does not.
    """
    if len(raw) != REPORT_SIZE:
        return f"report is {len(raw)} bytes, not {REPORT_SIZE}"
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP384R1
    ):
        return "the signing certificate's key is not an EC P-384 key"
    r = int.from_bytes(raw[0x2A0:0x2E8], "little")
    s = int.from_bytes(raw[0x2E8:0x330], "little")
    if not (0 < r < 1 << 384 and 0 < s < 1 << 384):
        return "signature components r, s are out of range"
    try:
        public_key.verify(encode_dss_signature(r, s), raw[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return "ECDSA P-384/SHA-384 signature over bytes 0x000..0x29F does not verify"
    return None


def _pss_problem(
    issuer: x509.Certificate, signature: bytes, tbs: bytes, sig_oid: x509.ObjectIdentifier
) -> str | None:
    if sig_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return f"signed with {sig_oid.dotted_string}, not RSASSA-PSS"
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return "issuer key is not RSA"
    if key.key_size < 2048:
        return f"issuer RSA key is only {key.key_size} bits"
    try:
        key.verify(signature, tbs, _PSS, hashes.SHA384())
    except InvalidSignature:
        return "RSASSA-PSS (SHA-384, salt 48) signature does not verify"
    return None


def _link_problem(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    if cert.issuer != issuer.subject:
        return f"issuer {cert.issuer.rfc4514_string()} is not {issuer.subject.rfc4514_string()}"
    return _pss_problem(issuer, cert.signature, cert.tbs_certificate_bytes, cert.signature_algorithm_oid)


def _decodable(b: VerdictBuilder, certs: Sequence[x509.Certificate]) -> bool:
    for i, cert in enumerate(certs):
        try:
            ensure_decodable(cert)
        except MalformedInputError as exc:
            b.fail("snp.chain.parse", f"certificate {i}: {exc}")
            return False
    return True


def _public_key(cert: x509.Certificate) -> object:
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return bc.ca


def _name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = cns[0].value if cns else cert.subject.rfc4514_string()
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _serial(cert: x509.Certificate) -> int:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING)
        return cert.serial_number


def _resolve_product(
    report: SnpReport | None, exts: AmdKeyExtensions | None, product: Product | str | None, b: VerdictBuilder
) -> Product | None:
    claims: list[tuple[str, Product]] = []
    if product is not None:
        try:
            claims.append(("caller", product if isinstance(product, Product) else Product.from_name(product)))
        except UnsupportedError as exc:
            b.fail("snp.product", str(exc))
            return None
    if report is not None and report.cpuid_fam_id is not None and report.cpuid_mod_id is not None:
        if report.product is None:
            b.fail(
                "snp.product",
                f"report CPUID family 0x{report.cpuid_fam_id:02x} model 0x{report.cpuid_mod_id:02x} "
                "is not a known SEV-SNP product",
            )
            return None
        claims.append(("report CPUID", report.product))
    if exts is not None and exts.product is not None:
        claims.append(("certificate productName", exts.product))
    if not claims:
        b.fail(
            "snp.product", "product unknown: version 2 report, no product given, no productName in the VCEK"
        )
        return None
    distinct = {p for _, p in claims}
    if len(distinct) > 1:
        b.fail("snp.product", "products disagree: " + ", ".join(f"{src} {p.value}" for src, p in claims))
        return None
    chosen = claims[0][1]
    b.passed("snp.product", f"{chosen.value} (from {', '.join(src for src, _ in claims)})")
    return chosen


def _verify_chain(
    b: VerdictBuilder,
    certs: Sequence[x509.Certificate],
    *,
    trusted_roots: Sequence[x509.Certificate],
    prod: Product | None,
    vlek: bool,
    now: datetime,
    crl: x509.CertificateRevocationList | None,
) -> None:
    leaf = certs[0]
    leaf_kind, inter_kind = ("VLEK", "ASVK") if vlek else ("VCEK", "ASK")
    ask_check = _ask_check(vlek)
    default_roots = not trusted_roots
    roots: list[x509.Certificate]
    if not default_roots:
        roots = []
        for i, r in enumerate(trusted_roots):
            try:
                roots.append(ensure_decodable(r))
            except MalformedInputError as exc:
                b.fail("snp.chain.ark", f"trusted root {i}: {exc}")
                return
    else:
        roots = [pinned_ark(prod)] if prod is not None else [pinned_ark(p) for p in Product]
    intermediate: x509.Certificate | None = certs[1] if len(certs) > 1 else None
    if intermediate is None and default_roots and prod is not None:
        intermediate = pinned_asvk(prod) if vlek else pinned_ask(prod)
    bundled_root = certs[2] if len(certs) > 2 else None
    extra = len(certs) - 3

    root: x509.Certificate | None = None
    if extra > 0:
        b.fail("snp.chain.ark", f"{extra} certificate(s) after the ARK; expected leaf, intermediate, root")
    elif bundled_root is not None and not any(bundled_root == r for r in roots):
        b.fail("snp.chain.ark", f"the bundle's root {_name(bundled_root)} is not a trusted root")
    elif intermediate is None:
        b.fail("snp.chain.ark", f"no {inter_kind} given, and none is pinned for a custom or unknown root")
    else:
        candidates = [r for r in roots if r.subject == intermediate.issuer]
        if not candidates:
            b.fail("snp.chain.ark", f"no trusted root named {intermediate.issuer.rfc4514_string()}")
        else:
            # Several trusted roots may share a name; prefer the one whose key signed the intermediate.
            root = next((r for r in candidates if _link_problem(intermediate, r) is None), candidates[0])
            problem = _link_problem(root, root)
            if problem is None and not _is_ca(root):
                problem = "root is not a CA certificate (basic constraints)"
            source = "pinned" if default_roots else "caller-trusted"
            if problem is None:
                b.passed("snp.chain.ark", f"{_name(root)} ({source}, sha256 {fingerprint(root)[:16]}…)")
            else:
                b.fail("snp.chain.ark", f"{_name(root)}: {problem}")

    if intermediate is None:
        b.fail(ask_check, f"no {inter_kind} given")
    elif root is not None:
        problem = _link_problem(intermediate, root)
        if problem is None and not _is_ca(intermediate):
            problem = "not a CA certificate (basic constraints)"
        b.check(
            ask_check,
            problem is None,
            f"{inter_kind} {_name(intermediate)}: {problem or 'signed by ' + _name(root)}",
        )
    elif not b.blocked(ask_check, "snp.chain.ark"):
        b.fail(ask_check, f"no trusted root to check the {inter_kind} against")

    if intermediate is not None:
        problem = _link_problem(leaf, intermediate)
        if problem is None and _is_ca(leaf):
            problem = "the signing key's certificate must not be a CA"
        leaf_key = _public_key(leaf)
        if problem is None and not (
            isinstance(leaf_key, ec.EllipticCurvePublicKey) and isinstance(leaf_key.curve, ec.SECP384R1)
        ):
            problem = "the signing key is not an EC P-384 key"
        b.check(
            "snp.chain.leaf", problem is None, f"{leaf_kind}: {problem or 'signed by ' + _name(intermediate)}"
        )
    elif not b.blocked("snp.chain.leaf", ask_check):
        b.fail("snp.chain.leaf", f"{leaf_kind}: no {inter_kind} to check it against")

    chain = [c for c in (leaf, intermediate, root) if c is not None]
    expired = [
        f"{_name(c)} valid {c.not_valid_before_utc:%Y-%m-%d}..{c.not_valid_after_utc:%Y-%m-%d}"
        for c in chain
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc
    ]
    b.check(
        "snp.chain.validity",
        not expired,
        f"not valid at {now.isoformat()}: " + "; ".join(expired)
        if expired
        else f"all valid at {now.isoformat()}",
    )
    _check_crl(b, crl, root, intermediate, now, vlek=vlek)


def _ask_check(vlek: bool) -> str:
    return "snp.chain.asvk" if vlek else "snp.chain.ask"


def _chain_checks(vlek: bool) -> tuple[str, str, str]:
    """The links a leaf's extensions are only AMD's word after."""
    return ("snp.chain.ark", _ask_check(vlek), "snp.chain.leaf")


def _key_prefix(vlek: bool) -> str:
    return "snp.vlek" if vlek else "snp.vcek"


def verify_amd_chain(
    certs: Sequence[x509.Certificate],
    options: VerifyOptions,
    *,
    product: Product | str | None = None,
    crl: x509.CertificateRevocationList | None = None,
) -> Verdict:
    """Verify a VCEK/VLEK certificate chain alone (no report), as :func:`verify_snp` does.

    Checks: ``snp.product`` (caller vs the certificate's productName), the
    ``snp.chain.*`` checks and ``snp.vcek.product`` (``snp.vlek.product`` for a VLEK).
    """
    b = VerdictBuilder()
    if not certs:
        b.fail("snp.chain.leaf", "no VCEK/VLEK certificate given")
        return b.build()
    if not _decodable(b, certs):
        return b.build()
    try:
        exts = parse_amd_extensions(certs[0])
    except MalformedInputError as exc:
        b.fail("snp.vcek.extensions", str(exc))
        return b.build()
    prod = _resolve_product(None, exts, product, b)
    _verify_chain(
        b, certs, trusted_roots=options.trusted_roots, prod=prod, vlek=exts.is_vlek, now=options.now, crl=crl
    )
    name = f"{_key_prefix(exts.is_vlek)}.product"
    if not b.blocked(name, *_chain_checks(exts.is_vlek)):
        _check_product_name(b, name, exts, prod, product)
    return b.build()


def verify_snp(
    report: SnpReport,
    certs: Sequence[x509.Certificate],
    options: VerifyOptions,
    *,
    product: Product | str | None = None,
    crl: x509.CertificateRevocationList | None = None,
) -> Verdict:
    """Verify an SEV-SNP report's signature and its certificate chain at ``options.now``.

    ``certs``: the VCEK (or VLEK) first, then the ASK (or ASVK), then optionally the
    ARK. With no ``options.trusted_roots`` (the AMD ARKs pinned in the package) a
    missing ASK/ASVK is taken from the package too, so a bare VCEK (as Azure hands
    out) suffices. Give ``trusted_roots`` to trust another root (the simulated TEE's);
    then the bundle must carry the intermediate. ``product`` (``"Milan"``, ``"Genoa"``,
    ``"Turin"``) is checked against the report's CPUID and the VCEK's product name;
    with a stepping (``"Milan-B0"``) the VCEK's product name must match it exactly.
    ``crl``: an optional AMD CRL (signed by the ARK) against which the ASK is checked.

    Checks, in order: ``snp.product``, ``snp.chain.ark``, ``snp.chain.ask``,
    ``snp.chain.leaf``, ``snp.chain.validity``, ``snp.chain.crl``, ``snp.signature``,
    ``snp.vcek.signing_key``, ``snp.vcek.product``, ``snp.vcek.tcb``, ``snp.vcek.hwid``
    (for a VLEK: ``snp.chain.asvk`` and ``snp.vlek.*``).
    """
    b = VerdictBuilder()
    if not certs:
        b.fail("snp.chain.leaf", "no VCEK/VLEK certificate given")
        b.fail("snp.signature", "no VCEK/VLEK certificate to verify the signature with")
        return b.build()
    if not _decodable(b, certs):
        b.fail("snp.signature", "no usable VCEK/VLEK certificate to verify the signature with")
        return b.build()
    leaf = certs[0]
    claimed_vlek = report.signing_key == SigningKey.VLEK
    exts: AmdKeyExtensions | None
    try:
        exts = parse_amd_extensions(leaf)
    except MalformedInputError as exc:
        exts = None
        b.fail(f"{_key_prefix(claimed_vlek)}.extensions", str(exc))
    prod = _resolve_product(report, exts, product, b)
    vlek = claimed_vlek or (exts is not None and exts.is_vlek)
    leaf_kind = "VLEK" if vlek else "VCEK"

    _verify_chain(
        b, certs, trusted_roots=options.trusted_roots, prod=prod, vlek=vlek, now=options.now, crl=crl
    )

    # The report itself.
    problem = verify_report_signature(report.raw, _public_key(leaf))
    b.check(
        "snp.signature", problem is None, problem or f"ECDSA P-384/SHA-384, verified with the {leaf_kind}"
    )
    _check_extensions(b, report, exts, prod=prod, vlek=vlek, product=product)
    return b.build()


def _check_crl(
    b: VerdictBuilder,
    crl: x509.CertificateRevocationList | None,
    root: x509.Certificate | None,
    intermediate: x509.Certificate | None,
    now: datetime,
    *,
    vlek: bool,
) -> None:
    if crl is None:
        b.skip("snp.chain.crl", "no CRL given")
        return
    if b.blocked("snp.chain.crl", "snp.chain.ark", _ask_check(vlek)):
        return
    if root is None or intermediate is None:
        b.fail("snp.chain.crl", "no trusted chain to check the CRL against")
        return
    problem = None
    if crl.issuer != root.subject:
        problem = f"CRL issued by {crl.issuer.rfc4514_string()}, not the ARK"
    else:
        problem = _pss_problem(root, crl.signature, crl.tbs_certlist_bytes, crl.signature_algorithm_oid)
    if problem is None:
        next_update = crl.next_update_utc
        if not crl.last_update_utc <= now or (next_update is not None and now > next_update):
            problem = f"CRL not current at {now.isoformat()}"
        elif crl.get_revoked_certificate_by_serial_number(_serial(intermediate)) is not None:
            problem = f"{_name(intermediate)} is revoked"
    b.check("snp.chain.crl", problem is None, problem or f"{_name(intermediate)} not revoked")


def _check_product_name(
    b: VerdictBuilder, name: str, exts: AmdKeyExtensions, prod: Product | None, wanted: Product | str | None
) -> None:
    stepping = isinstance(wanted, str) and "-" in wanted  # e.g. "Milan-B0": the stepping must match too
    if exts.product is None:
        b.fail(name, f"productName {exts.product_name!r} names no known product")
    elif prod is not None and exts.product is not prod:
        b.fail(name, f"certificate is for {exts.product_name}, report is from {prod.value}")
    elif stepping and str(exts.product_name).lower() != str(wanted).strip().lower():
        b.fail(name, f"certificate is for {exts.product_name}, expected {wanted}")
    else:
        b.passed(name, f"{exts.product_name}")


def _check_extensions(
    b: VerdictBuilder,
    report: SnpReport,
    exts: AmdKeyExtensions | None,
    *,
    prod: Product | None,
    vlek: bool,
    product: Product | str | None,
) -> None:
    prefix = _key_prefix(vlek)
    chain = _chain_checks(vlek)
    # The extensions are AMD's word only when the chain holds; the report's fields only when signed.
    parsed = f"{_key_prefix(report.signing_key == SigningKey.VLEK)}.extensions"
    signing_key = f"{prefix}.signing_key"
    if not b.blocked(signing_key, parsed, *chain, "snp.signature"):
        if report.signing_key == SigningKey.NONE:
            b.fail(signing_key, "the report says it is unsigned (SIGNING_KEY = 7)")
        elif exts is not None:
            claimed = "VLEK" if report.signing_key == SigningKey.VLEK else "VCEK"
            actual = "VLEK" if exts.is_vlek else "VCEK"
            b.check(signing_key, claimed == actual, f"report names the {claimed}; certificate is a {actual}")
    if exts is None:
        for name in ("product", "tcb", "hwid"):
            b.skip(f"{prefix}.{name}", f"not checked: {parsed} failed")
        return

    if not b.blocked(f"{prefix}.product", *chain):
        _check_product_name(b, f"{prefix}.product", exts, prod, product)

    tcb = f"{prefix}.tcb"
    if not b.blocked(tcb, *chain, "snp.signature"):
        try:
            certified = exts.tcb()
        except MalformedInputError as exc:
            b.fail(tcb, str(exc))
        else:
            if certified.turin != (prod is Product.TURIN):
                b.fail(tcb, "FMC SPL extension present exactly on Turin certificates; this one disagrees")
            else:
                same = certified.raw == report.reported_tcb.raw
                b.check(
                    tcb,
                    same,
                    f"certificate {certified}"
                    + ("" if same else f" but report's reported_tcb is {report.reported_tcb}"),
                )

    hwid = f"{prefix}.hwid"
    if b.blocked(hwid, *chain, "snp.signature"):
        return
    if vlek:
        if exts.hwid is not None:
            b.fail(hwid, "a VLEK must not carry a hwID")
        else:
            b.skip(hwid, f"VLEK (CSP {exts.csp_id}) carries no hwID")
        return
    if exts.hwid is None:
        b.fail(hwid, "VCEK has no hwID extension")
    elif report.mask_chip_key:
        b.skip(hwid, "report's CHIP_ID is masked (MASK_CHIP_KEY)")
    elif len(exts.hwid) == 8:
        ok = prod is Product.TURIN and exts.hwid == report.chip_id[:8]
        b.check(hwid, ok, "8-byte Turin hwID " + ("= CHIP_ID[0:8]" if ok else "does not match CHIP_ID"))
    else:
        ok = exts.hwid == report.chip_id
        b.check(hwid, ok, "hwID = CHIP_ID" if ok else "hwID does not match the report's CHIP_ID")


def verify_snp_bytes(
    data: bytes,
    certs: Sequence[x509.Certificate],
    options: VerifyOptions,
    *,
    product: Product | str | None = None,
    crl: x509.CertificateRevocationList | None = None,
) -> tuple[SnpReport | None, Verdict]:
    """Parse then verify raw report bytes; a report that does not parse is a failed check.

    When parsing fails (``snp.report.parse``), the signature is still checked over the
    raw bytes with the leaf's key, so tampering shows as ``snp.signature`` too.
    """
    b = VerdictBuilder()
    try:
        report = parse_snp_report(data)
    except MalformedInputError as exc:
        b.fail("snp.report.parse", str(exc))
        if certs and _decodable(b, certs[:1]):
            problem = verify_report_signature(bytes(data), _public_key(certs[0]))
            b.check("snp.signature", problem is None, problem or "verifies, but the report does not parse")
        else:
            b.fail("snp.signature", "no VCEK/VLEK certificate to verify the signature with")
        return None, b.build()
    b.passed("snp.report.parse", f"version {report.version}")
    return report, b.build() + verify_snp(report, certs, options, product=product, crl=crl)
