"""A fake AMD key hierarchy for tests: ARK → ASK (or ASVK) → VCEK/VLEK, as AMD's KDS issues them.

RSA-PSS (SHA-384, salt 48) for the CA links, P-384 for the leaf, the KDS extensions
on the leaf. RSA-2048 instead of AMD's 4096 keeps key generation fast. The real
AMD roots are never faked: verification is told to trust this ARK explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from veil.attestation.snp.report import SnpReport, TcbVersion, build_snp_report
from veil.attestation.snp.verify import sign_snp_report

START = datetime(2023, 1, 1, tzinfo=UTC)
END = datetime(2030, 1, 1, tzinfo=UTC)
INSIDE = datetime(2025, 6, 1, tzinfo=UTC)
AMD_OID = "1.3.6.1.4.1.3704.1"
PSS48 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)

_RSA_KEYS: list[rsa.RSAPrivateKey] = []


def rsa_key(i: int) -> rsa.RSAPrivateKey:
    """Cached RSA-2048 keys (generation is the slow part)."""
    while len(_RSA_KEYS) <= i:
        _RSA_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA_KEYS[i]


def name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fake Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


def der_int(n: int) -> bytes:
    body = n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def der_ia5(s: str) -> bytes:
    return bytes([0x16, len(s)]) + s.encode()


def issue(
    subject: str,
    issuer: x509.Name,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    *,
    ca: bool,
    extensions: tuple[x509.ExtensionType, ...] = (),
    pss: padding.PSS | padding.PKCS1v15 | None = PSS48,
    serial: int = 1,
    not_before: datetime = START,
    not_after: datetime = END,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for e in extensions:
        builder = builder.add_extension(e, critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=pss)


@dataclass
class FakeAmd:
    product: str
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate

    def leaf(
        self,
        tcb: TcbVersion,
        *,
        hwid: bytes | None = bytes(range(64)),
        csp_id: str | None = None,
        product_name: str | None = None,
        hwid_octet_string: bool = False,
        not_after: datetime = END,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A VCEK (hwid given) or VLEK (csp_id given) certifying ``tcb``."""
        key = ec.generate_private_key(ec.SECP384R1())
        exts = [
            ext(f"{AMD_OID}.1", der_int(0)),
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
        issuer, signer = (self.asvk, rsa_key(2)) if csp_id is not None else (self.ask, rsa_key(1))
        cert = issue(
            "SEV-VLEK" if csp_id else "SEV-VCEK",
            issuer.subject,
            key.public_key(),
            signer,
            ca=False,
            extensions=tuple(exts),
            not_after=not_after,
        )
        return key, cert


def make_fake_amd(product: str = "Milan") -> FakeAmd:
    ark_key, ask_key, asvk_key = rsa_key(0), rsa_key(1), rsa_key(2)
    ark_name = name(f"ARK-{product}")
    ark = issue(f"ARK-{product}", ark_name, ark_key.public_key(), ark_key, ca=True)
    ask = issue(f"SEV-{product}", ark_name, ask_key.public_key(), ark_key, ca=True)
    asvk = issue(f"SEV-VLEK-{product}", ark_name, asvk_key.public_key(), ark_key, ca=True)
    return FakeAmd(product, ark, ask, asvk)


def signed_report(key: ec.EllipticCurvePrivateKey, **kwargs: object) -> SnpReport:
    return sign_snp_report(build_snp_report(**kwargs), key)  # type: ignore[arg-type]
