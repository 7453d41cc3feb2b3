"""A fake AMD key hierarchy: ARK → ASK (or ASVK) → VCEK/VLEK, as AMD's KDS issues them.

RSA-PSS (SHA-384, salt 48) for the CA links, P-384 for the leaf, the KDS extensions
on the leaf. The tests use RSA-2048 (:func:`rsa_key`) instead of AMD's 4096 to keep key
generation fast; the simulated TEE passes its own RSA-4096 keys, names and validity to
:func:`make_fake_amd` and :meth:`FakeAmd.leaf`. The real AMD roots are never faked:
verification is told to trust this ARK explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from veil.attestation.snp.report import SnpReport, TcbVersion, build_snp_report
from veil.attestation.snp.verify import sign_snp_report
from veil.attestation.testing.pki import ca_key_usage, der_ia5, der_int, ext, key_identifiers

__all__ = [
    "AMD_OID",
    "END",
    "INSIDE",
    "PSS48",
    "START",
    "FakeAmd",
    "der_ia5",
    "der_int",
    "ext",
    "issue",
    "make_fake_amd",
    "name",
    "rsa_key",
    "signed_report",
]

START = datetime(2023, 1, 1, tzinfo=UTC)
END = datetime(2030, 1, 1, tzinfo=UTC)
INSIDE = datetime(2025, 6, 1, tzinfo=UTC)
AMD_OID = "1.3.6.1.4.1.3704.1"
PSS48 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
FAKE_ORGANIZATION = "Fake Micro Devices"

_RSA_KEYS: list[rsa.RSAPrivateKey] = []


def rsa_key(i: int) -> rsa.RSAPrivateKey:
    """Cached RSA-2048 keys (generation is the slow part)."""
    while len(_RSA_KEYS) <= i:
        _RSA_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA_KEYS[i]


def name(cn: str, organization: str = FAKE_ORGANIZATION) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def issue(
    subject: str | x509.Name,
    issuer: x509.Name,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    *,
    ca: bool,
    extensions: tuple[x509.ExtensionType, ...] = (),
    pss: padding.PSS | padding.PKCS1v15 | None = PSS48,
    serial: int | None = 1,
    not_before: datetime = START,
    not_after: datetime = END,
    key_ids: bool = False,
) -> x509.Certificate:
    """A certificate signed by ``signer``; ``serial=None`` draws a random one.

    ``key_ids`` adds the key usage (CA: keyCertSign + cRLSign) and the subject and
    authority key identifiers, as AMD's certificates carry them.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject) if isinstance(subject, str) else subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        if key_ids:
            builder = builder.add_extension(ca_key_usage(), critical=True)
    if key_ids:
        for identifier in key_identifiers(public_key, signer.public_key()):
            builder = builder.add_extension(identifier, critical=False)
    for e in extensions:
        builder = builder.add_extension(e, critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=pss)


@dataclass
class FakeAmd:
    """An ARK, its ASK and (unless made without) its ASVK, with their keys."""

    product: str
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate | None
    ark_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa_key(0))
    ask_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa_key(1))
    asvk_key: rsa.RSAPrivateKey | None = field(default_factory=lambda: rsa_key(2))
    organization: str = FAKE_ORGANIZATION
    prefix: str = ""  # prepended to every common name ("SIMULATED " for the simulator)
    key_ids: bool = False

    def leaf(
        self,
        tcb: TcbVersion,
        *,
        hwid: bytes | None = bytes(range(64)),
        csp_id: str | None = None,
        product_name: str | None = None,
        hwid_octet_string: bool = False,
        key: ec.EllipticCurvePrivateKey | None = None,
        struct_version: int = 0,
        not_before: datetime = START,
        not_after: datetime = END,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A VCEK (hwid given) or VLEK (csp_id given) certifying ``tcb``; a fresh key unless given."""
        key = key or ec.generate_private_key(ec.SECP384R1())
        exts = [
            ext(f"{AMD_OID}.1", der_int(struct_version)),
            ext(f"{AMD_OID}.2", der_ia5(product_name or f"{self.product}-B0")),
            ext(f"{AMD_OID}.3.1", der_int(tcb.bootloader)),
            ext(f"{AMD_OID}.3.2", der_int(tcb.tee)),
            ext(f"{AMD_OID}.3.3", der_int(tcb.snp)),
            *(ext(f"{AMD_OID}.3.{n}", der_int(0)) for n in (4, 5, 6, 7)),
            ext(f"{AMD_OID}.3.8", der_int(tcb.microcode)),
        ]
        if tcb.fmc is not None:
            exts.append(ext(f"{AMD_OID}.3.9", der_int(tcb.fmc)))
        if hwid is not None:
            value = bytes([0x04, len(hwid)]) + hwid if hwid_octet_string else hwid
            exts.append(ext(f"{AMD_OID}.4", value))
        if csp_id is not None:
            exts.append(ext(f"{AMD_OID}.5", der_ia5(csp_id)))
        if csp_id is not None:
            if self.asvk is None or self.asvk_key is None:
                raise ValueError("this fake AMD was made without an ASVK: it issues no VLEK")
            issuer, signer = self.asvk, self.asvk_key
        else:
            issuer, signer = self.ask, self.ask_key
        cert = issue(
            name(self.prefix + ("SEV-VLEK" if csp_id else "SEV-VCEK"), self.organization),
            issuer.subject,
            key.public_key(),
            signer,
            ca=False,
            extensions=tuple(exts),
            serial=None if self.key_ids else 1,
            not_before=not_before,
            not_after=not_after,
            key_ids=self.key_ids,
        )
        return key, cert


def make_fake_amd(
    product: str = "Milan",
    *,
    ark_key: rsa.RSAPrivateKey | None = None,
    ask_key: rsa.RSAPrivateKey | None = None,
    with_asvk: bool = True,
    organization: str = FAKE_ORGANIZATION,
    prefix: str = "",
    not_before: datetime = START,
    not_after: datetime = END,
    key_ids: bool = False,
) -> FakeAmd:
    """ARK, ASK (and ASVK) for ``product``; the cached test keys unless keys are given.

    ``key_ids`` also gives each certificate a random serial, key usage and key identifiers.
    """
    ark_key, ask_key = ark_key or rsa_key(0), ask_key or rsa_key(1)
    asvk_key = rsa_key(2) if with_asvk else None
    ark_name = name(f"{prefix}ARK-{product}", organization)

    def ca(cn: str, key: rsa.RSAPrivateKey) -> x509.Certificate:
        return issue(
            name(prefix + cn, organization),
            ark_name,
            key.public_key(),
            ark_key,
            ca=True,
            serial=None if key_ids else 1,
            not_before=not_before,
            not_after=not_after,
            key_ids=key_ids,
        )

    ark, ask = ca(f"ARK-{product}", ark_key), ca(f"SEV-{product}", ask_key)
    asvk = ca(f"SEV-VLEK-{product}", asvk_key) if asvk_key is not None else None
    return FakeAmd(product, ark, ask, asvk, ark_key, ask_key, asvk_key, organization, prefix, key_ids)


def signed_report(key: ec.EllipticCurvePrivateKey, **kwargs: object) -> SnpReport:
    """``build_snp_report(**kwargs)`` signed with ``key`` as AMD firmware signs it."""
    return sign_snp_report(build_snp_report(**kwargs), key)  # type: ignore[arg-type]
