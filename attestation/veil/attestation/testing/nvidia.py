"""A fake NVIDIA-like device CA: root → ICA → (BROM →) FMC leaf, all P-384, plus SPDM report signing.

The tests use :func:`make_fake_ca`'s defaults (a four-certificate chain, TCG ``DiceTcbInfo``
FWID); the simulated TEE passes its own keys, "SIMULATED" names, validity and a
three-certificate chain with NVIDIA's FWID encoding (:func:`nvidia_tcb_info`), and signs
its reports with :meth:`FakeGpuCa.report`. The real trust anchor is never faked —
verification is told to trust this root explicitly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.attestation.nvidia.certs import TCB_INFO_OID, encode_tcb_info_fwid
from veil.attestation.nvidia.report import OpaqueFieldType, build_gpu_report
from veil.attestation.nvidia.verify import p384_signer
from veil.attestation.testing.pki import (
    ca_key_usage,
    der,
    der_int,
    der_octets,
    key_identifiers,
    leaf_key_usage,
    spki_der,
)

__all__ = [
    "END",
    "FAKE_SUBJECTS",
    "FWID",
    "START",
    "FakeGpuCa",
    "later",
    "make_fake_ca",
    "nvidia_tcb_info",
]

START = datetime(2023, 1, 1, tzinfo=UTC)
END = datetime(2030, 1, 1, tzinfo=UTC)
FWID = hashlib.sha384(b"fake gpu firmware").digest()
# root, ICA, BROM, leaf (three names: no BROM)
FAKE_SUBJECTS = ("Fake Device Identity CA", "Fake GH100 ICA", "Fake GH100 BROM", "Fake GH100 FMC LF")
_SHA384_OID_DER = bytes.fromhex("0609608648016503040202")

TcbInfoEncoder = Callable[[bytes, ec.EllipticCurvePublicKey], bytes]


def nvidia_tcb_info(fwid: bytes, leaf_key: ec.EllipticCurvePublicKey) -> bytes:
    """DICE TcbInfo as NVIDIA encodes it: ``SEQUENCE { INTEGER 1, SubjectPublicKeyInfo,
    SEQUENCE { sha384, OCTET STRING fwid } }`` (the FWID is the last 48 bytes)."""
    return der(0x30, der_int(1) + spki_der(leaf_key) + der(0x30, _SHA384_OID_DER + der_octets(fwid)))


def tcg_tcb_info(fwid: bytes, leaf_key: ec.EllipticCurvePublicKey) -> bytes:
    """The TCG ``DiceTcbInfo`` with one SHA-384 entry in ``fwids [6]``."""
    return encode_tcb_info_fwid(fwid)


def _name(cn: str, organization: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if organization is not None:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _cert(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    not_before: datetime = START,
    not_after: datetime = END,
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
    key_ids: bool = False,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(ca_key_usage() if ca else leaf_key_usage(), critical=True)
    )
    if key_ids:
        for identifier in key_identifiers(key.public_key(), issuer_key.public_key()):
            builder = builder.add_extension(identifier, critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA384())


@dataclass
class FakeGpuCa:
    """The chain's keys and certificates; ``brom`` and ``brom_key`` are None in a three-link chain."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    ica_key: ec.EllipticCurvePrivateKey
    ica: x509.Certificate
    brom_key: ec.EllipticCurvePrivateKey | None
    brom: x509.Certificate | None
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Leaf first, root last."""
        middle = (self.brom,) if self.brom is not None else ()
        return (self.leaf, *middle, self.ica, self.root)

    def report(
        self,
        nonce: bytes,
        *,
        measurements: Mapping[int, bytes] | Sequence[bytes] | None = None,
        driver: str = "545.00",
        vbios: bytes = bytes.fromhex("005e009601000000"),
        fwid: bytes | None = FWID,
        nvdec0: int | None = 0xAA,
        project: bytes = b"1010",
        project_sku: bytes | None = b"0200",
        chip_sku: bytes | None = b"882",
        opaque_data_version: bytes | None = None,
        responder_nonce: bytes | None = None,
    ) -> bytes:
        """An SPDM GET_MEASUREMENTS request + signed MEASUREMENTS response for ``nonce``.

        Opaque fields given as None are left out; ``responder_nonce`` defaults to
        SHA-256(nonce) (deterministic for tests; the simulator passes fresh random bytes).
        """
        opaque: list[tuple[int, bytes]] = [
            (OpaqueFieldType.VBIOS_VERSION, vbios),
            (OpaqueFieldType.PROJECT, project + b"\x00"),
        ]
        if project_sku is not None:
            opaque.append((OpaqueFieldType.PROJECT_SKU, project_sku + b"\x00"))
        if chip_sku is not None:
            opaque.append((OpaqueFieldType.CHIP_SKU, chip_sku + b"\x00"))
        opaque.append((OpaqueFieldType.DRIVER_VERSION, driver.encode() + b"\x00"))
        if nvdec0 is not None:
            opaque.append((OpaqueFieldType.NVDEC0_STATUS, bytes([nvdec0])))
        if fwid is not None:
            opaque.append((OpaqueFieldType.FWID, fwid))
        if opaque_data_version is not None:
            opaque.append((OpaqueFieldType.OPAQUE_DATA_VERSION, opaque_data_version))
        values = measurements or {i: hashlib.sha384(bytes([i])).digest() for i in range(1, 65)}
        return build_gpu_report(
            nonce=nonce,
            measurements=values,
            opaque=[(int(t), v) for t, v in opaque],
            responder_nonce=responder_nonce
            if responder_nonce is not None
            else hashlib.sha256(nonce).digest(),
            sign=p384_signer(self.leaf_key),
        )


def make_fake_ca(
    *,
    fwid: bytes | None = FWID,
    leaf_not_after: datetime | None = None,
    keys: Sequence[ec.EllipticCurvePrivateKey] | None = None,
    subjects: Sequence[str] = FAKE_SUBJECTS,
    organization: str | None = None,
    not_before: datetime = START,
    not_after: datetime = END,
    tcb_info: TcbInfoEncoder = tcg_tcb_info,
    key_ids: bool = False,
) -> FakeGpuCa:
    """A device CA named by ``subjects`` (root, ICA, [BROM,] leaf); fresh P-384 keys unless given.

    The leaf carries ``fwid`` in a TcbInfo extension encoded by ``tcb_info`` (none if
    ``fwid`` is None); ``key_ids`` adds subject and authority key identifiers.
    """
    if len(subjects) not in (3, 4):
        raise ValueError("a fake GPU chain has 3 or 4 certificates (root, ICA, [BROM,] leaf)")
    keys = list(keys) if keys is not None else [ec.generate_private_key(ec.SECP384R1()) for _ in subjects]
    if len(keys) != len(subjects):
        raise ValueError(f"{len(subjects)} subjects need {len(subjects)} keys, got {len(keys)}")
    names = [_name(cn, organization) for cn in subjects]
    leaf_ext: tuple[tuple[x509.ExtensionType, bool], ...] = ()
    if fwid is not None:
        leaf_ext = ((x509.UnrecognizedExtension(TCB_INFO_OID, tcb_info(fwid, keys[-1].public_key())), False),)
    certs: list[x509.Certificate] = []
    for i, subject in enumerate(names):
        up = max(i - 1, 0)  # the root signs itself
        leaf = i == len(names) - 1
        certs.append(
            _cert(
                subject,
                names[up],
                keys[i],
                keys[up],
                ca=not leaf,
                not_before=not_before,
                not_after=(leaf_not_after or not_after) if leaf else not_after,
                extensions=leaf_ext if leaf else (),
                key_ids=key_ids,
            )
        )
    brom_key, brom = (keys[2], certs[2]) if len(subjects) == 4 else (None, None)
    return FakeGpuCa(keys[0], certs[0], keys[1], certs[1], brom_key, brom, keys[-1], certs[-1])


def later(days: int) -> datetime:
    return START + timedelta(days=days)
