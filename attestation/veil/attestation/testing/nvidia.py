"""A fake NVIDIA-like device CA for tests: root → ICA → BROM → FMC leaf (P-384), plus report building.

Lives with the tests (as go-sev-guest's fakes do); the real trust anchor is never faked —
verification is told to trust this root explicitly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.attestation.nvidia.certs import TCB_INFO_OID, encode_tcb_info_fwid
from veil.attestation.nvidia.report import OpaqueFieldType, build_gpu_report
from veil.attestation.nvidia.verify import p384_signer

START = datetime(2023, 1, 1, tzinfo=UTC)
END = datetime(2030, 1, 1, tzinfo=UTC)
FWID = hashlib.sha384(b"fake gpu firmware").digest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    issuer: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    not_before: datetime = START,
    not_after: datetime = END,
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA384())


@dataclass
class FakeGpuCa:
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    ica_key: ec.EllipticCurvePrivateKey
    ica: x509.Certificate
    brom_key: ec.EllipticCurvePrivateKey
    brom: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.leaf, self.brom, self.ica, self.root)

    def report(
        self,
        nonce: bytes,
        *,
        measurements: dict[int, bytes] | None = None,
        driver: str = "545.00",
        vbios: bytes = bytes.fromhex("005e009601000000"),
        fwid: bytes | None = FWID,
        nvdec0: int = 0xAA,
    ) -> bytes:
        opaque: list[tuple[int, bytes]] = [
            (OpaqueFieldType.VBIOS_VERSION, vbios),
            (OpaqueFieldType.PROJECT, b"1010\x00"),
            (OpaqueFieldType.PROJECT_SKU, b"0200\x00"),
            (OpaqueFieldType.CHIP_SKU, b"882\x00"),
            (OpaqueFieldType.DRIVER_VERSION, driver.encode() + b"\x00"),
            (OpaqueFieldType.NVDEC0_STATUS, bytes([nvdec0])),
        ]
        if fwid is not None:
            opaque.append((OpaqueFieldType.FWID, fwid))
        values = measurements or {i: hashlib.sha384(bytes([i])).digest() for i in range(1, 65)}
        return build_gpu_report(
            nonce=nonce,
            measurements=values,
            opaque=opaque,
            responder_nonce=hashlib.sha256(nonce).digest(),
            sign=p384_signer(self.leaf_key),
        )


def make_fake_ca(*, fwid: bytes | None = FWID, leaf_not_after: datetime = END) -> FakeGpuCa:
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(4)]
    root_key, ica_key, brom_key, leaf_key = keys
    root = _cert("Fake Device Identity CA", "Fake Device Identity CA", root_key, root_key, ca=True)
    ica = _cert("Fake GH100 ICA", "Fake Device Identity CA", ica_key, root_key, ca=True)
    brom = _cert("Fake GH100 BROM", "Fake GH100 ICA", brom_key, ica_key, ca=True)
    leaf_ext: tuple[tuple[x509.ExtensionType, bool], ...] = ()
    if fwid is not None:
        leaf_ext = ((x509.UnrecognizedExtension(TCB_INFO_OID, encode_tcb_info_fwid(fwid)), False),)
    leaf = _cert(
        "Fake GH100 FMC LF",
        "Fake GH100 BROM",
        leaf_key,
        brom_key,
        ca=False,
        not_after=leaf_not_after,
        extensions=leaf_ext,
    )
    return FakeGpuCa(root_key, root, ica_key, ica, brom_key, brom, leaf_key, leaf)


def later(days: int) -> datetime:
    return START + timedelta(days=days)
