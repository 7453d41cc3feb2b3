"""AMD SEV-SNP certificates: loading, VCEK/VLEK extensions, and the pinned roots.

* :func:`load_certificates` reads a PEM bundle (one or more certificates) or a
  single DER certificate. AMD's VCEKs and VLEKs carry serial number 0, which
  RFC 5280 forbids and ``cryptography`` warns about; the warning is expected for
  these certificates and is silenced here, only for that message.
* :func:`parse_amd_extensions` decodes the KDS extensions under
  ``1.3.6.1.4.1.3704.1``: struct version, product name, the security patch levels
  (``3.1`` bootloader, ``3.2`` TEE, ``3.3`` SNP, ``3.4``–``3.7`` reserved, ``3.8``
  microcode, ``3.9`` FMC on Turin), the hwID (``4``; raw 64 bytes in older
  certificates, a DER OCTET STRING in newer ones, 8 bytes on Turin) and the
  VLEK's CSP id (``5``).
* :func:`pinned_ark` / :func:`pinned_ask` / :func:`pinned_asvk` return the AMD
  certificates shipped in ``roots/``, each checked against the SHA-256
  fingerprint of its DER bytes pinned below before it is returned.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from cryptography import x509

from veil.attestation.certificates import ensure_decodable, fingerprint, load_certificates
from veil.attestation.errors import MalformedInputError, UnsupportedError
from veil.attestation.snp.report import Product, TcbVersion

__all__ = [
    "PINNED_FINGERPRINTS",
    "AmdKeyExtensions",
    "ensure_decodable",
    "fingerprint",
    "load_certificates",
    "parse_amd_extensions",
    "pinned_ark",
    "pinned_ask",
    "pinned_asvk",
]

_AMD_OID = "1.3.6.1.4.1.3704.1"
_OID_STRUCT_VERSION = f"{_AMD_OID}.1"
_OID_PRODUCT_NAME = f"{_AMD_OID}.2"
_OID_SPL = {f"{_AMD_OID}.3.{n}": n for n in range(1, 10)}
_OID_HWID = f"{_AMD_OID}.4"
_OID_CSP_ID = f"{_AMD_OID}.5"
_KNOWN_OIDS = {_OID_STRUCT_VERSION, _OID_PRODUCT_NAME, _OID_HWID, _OID_CSP_ID, *_OID_SPL}

# SHA-256 over the DER bytes of each AMD certificate shipped in roots/ (from AMD KDS
# cert_chain / vlek cert_chain, as published by go-sev-guest, virtee/sev and trustee).
PINNED_FINGERPRINTS: dict[tuple[Product, str], str] = {
    (Product.MILAN, "ark"): "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    (Product.MILAN, "ask"): "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    (Product.MILAN, "asvk"): "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    (Product.GENOA, "ark"): "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    (Product.GENOA, "ask"): "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    (Product.GENOA, "asvk"): "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    (Product.TURIN, "ark"): "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    (Product.TURIN, "ask"): "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
    (Product.TURIN, "asvk"): "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
}


@dataclass(frozen=True, slots=True)
class AmdKeyExtensions:
    """The AMD KDS extensions of a VCEK or VLEK certificate."""

    struct_version: int | None
    product_name: str | None
    bl_spl: int | None
    tee_spl: int | None
    snp_spl: int | None
    spl_4: int | None
    spl_5: int | None
    spl_6: int | None
    spl_7: int | None
    ucode_spl: int | None
    fmc_spl: int | None
    hwid: bytes | None
    csp_id: str | None

    @property
    def product(self) -> Product | None:
        """The product line named by ``product_name`` (``"Milan-B0"`` → Milan), or None."""
        if self.product_name is None:
            return None
        try:
            return Product.from_name(self.product_name)
        except UnsupportedError:
            return None

    @property
    def is_vlek(self) -> bool:
        return self.csp_id is not None

    def tcb(self) -> TcbVersion:
        """The TCB_VERSION these patch levels certify (Turin layout when ``fmc_spl`` is present).

        Raises :class:`MalformedInputError` when a required level is missing or a
        reserved one is non-zero.
        """
        levels = {
            "bootloader": self.bl_spl,
            "tee": self.tee_spl,
            "snp": self.snp_spl,
            "microcode": self.ucode_spl,
        }
        missing = [name for name, value in levels.items() if value is None]
        if missing:
            raise MalformedInputError(f"certificate lacks the {', '.join(missing)} SPL extension(s)")
        if any(v for v in (self.spl_4, self.spl_5, self.spl_6, self.spl_7)):
            raise MalformedInputError("certificate sets a reserved SPL extension (spl_4..spl_7)")
        return TcbVersion.from_parts(
            bootloader=self.bl_spl or 0,
            tee=self.tee_spl or 0,
            snp=self.snp_spl or 0,
            microcode=self.ucode_spl or 0,
            fmc=self.fmc_spl,
        )


def _der_tlv(value: bytes, tag: int, what: str) -> bytes:
    if len(value) < 2 or value[0] != tag:
        raise MalformedInputError(f"{what}: expected DER tag 0x{tag:02x}")
    length = value[1]
    offset = 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 2 or len(value) < 2 + n:
            raise MalformedInputError(f"{what}: bad DER length")
        length = int.from_bytes(value[2 : 2 + n], "big")
        offset = 2 + n
    if len(value) != offset + length:
        raise MalformedInputError(f"{what}: DER length does not match the extension")
    return value[offset:]


def _der_uint(value: bytes, what: str) -> int:
    body = _der_tlv(value, 0x02, what)
    if not body or body[0] & 0x80 or (len(body) > 1 and body[0] == 0 and not body[1] & 0x80):
        raise MalformedInputError(f"{what}: not a minimal non-negative DER INTEGER")
    number = int.from_bytes(body, "big")
    if number > 0xFF:
        raise MalformedInputError(f"{what}: {number} does not fit a security patch level")
    return number


def _der_ia5(value: bytes, what: str) -> str:
    body = _der_tlv(value, 0x16, what)
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedInputError(f"{what}: not an IA5String") from None


def _hwid(value: bytes) -> bytes:
    # KDS wrote the hwID raw (64 bytes; 8 on Turin) in older certificates and as a DER
    # OCTET STRING in newer ones; the lengths tell the two apart without guessing.
    if len(value) in (64, 8):
        return value
    if len(value) in (66, 10) and value[0] == 0x04 and value[1] == len(value) - 2:
        return value[2:]
    raise MalformedInputError(f"hwID extension has an unexpected encoding ({len(value)} bytes)")


def parse_amd_extensions(cert: x509.Certificate) -> AmdKeyExtensions:
    """Decode the AMD KDS extensions of a VCEK/VLEK; absent ones are None.

    Raises :class:`MalformedInputError` for an undecodable or duplicated AMD extension,
    or for a certificate carrying both a hwID and a CSP id.
    """
    values: dict[str, bytes] = {}
    try:
        extensions = list(cert.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise MalformedInputError(f"certificate extensions do not parse: {exc}") from None
    for ext in extensions:
        oid = ext.oid.dotted_string
        if oid not in _KNOWN_OIDS:
            continue
        if not isinstance(ext.value, x509.UnrecognizedExtension):
            raise MalformedInputError(f"AMD extension {oid} has an unexpected type")
        values[oid] = ext.value.value
    spl: dict[int, int | None] = {}
    for oid, n in _OID_SPL.items():
        spl[n] = _der_uint(values[oid], f"SPL extension {oid}") if oid in values else None
    hwid = _hwid(values[_OID_HWID]) if _OID_HWID in values else None
    csp_id = _der_ia5(values[_OID_CSP_ID], "CSP id") if _OID_CSP_ID in values else None
    if hwid is not None and csp_id is not None:
        raise MalformedInputError("certificate has both a hwID (VCEK) and a CSP id (VLEK)")
    return AmdKeyExtensions(
        struct_version=(
            _der_uint(values[_OID_STRUCT_VERSION], "struct version")
            if _OID_STRUCT_VERSION in values
            else None
        ),
        product_name=_der_ia5(values[_OID_PRODUCT_NAME], "product name")
        if _OID_PRODUCT_NAME in values
        else None,
        bl_spl=spl[1],
        tee_spl=spl[2],
        snp_spl=spl[3],
        spl_4=spl[4],
        spl_5=spl[5],
        spl_6=spl[6],
        spl_7=spl[7],
        ucode_spl=spl[8],
        fmc_spl=spl[9],
        hwid=hwid,
        csp_id=csp_id,
    )


@functools.cache
def _pinned(product: Product, kind: str) -> x509.Certificate:
    name = f"amd_{product.value.lower()}_{kind}.pem"
    data = resources.files("veil.attestation").joinpath("roots", name).read_bytes()
    (cert,) = load_certificates(data)
    if fingerprint(cert) != PINNED_FINGERPRINTS[(product, kind)]:
        raise UnsupportedError(f"shipped AMD certificate {name} does not match its pinned fingerprint")
    return cert


def pinned_ark(product: Product) -> x509.Certificate:
    """The AMD Root Key certificate of ``product``, shipped with the package."""
    return _pinned(product, "ark")


def pinned_ask(product: Product) -> x509.Certificate:
    """The AMD SEV signing key (signs VCEKs) of ``product``."""
    return _pinned(product, "ask")


def pinned_asvk(product: Product) -> x509.Certificate:
    """The AMD SEV VLEK signing key (signs VLEKs) of ``product``."""
    return _pinned(product, "asvk")
