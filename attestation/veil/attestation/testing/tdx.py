"""A fake Intel PKI that mints TDX quotes and PCS collateral, for cases no real vector covers.

Same structure, names and algorithms as Intel's (P-256 / SHA-256, an SGX extension in
the PCK leaf, signed TCB info / QE identity JSON, CRLs); only the root differs, and it
is passed to the verifier (``VerifyOptions.trusted_roots``) and to dcap-qvl.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from veil.attestation.tdx.collateral import TdxCollateral, load_collateral

SGX_OID = "1.2.840.113741.1.13.1"
QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
FMSPC = bytes.fromhex("b0c06f000000")


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + value


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _int(value: int) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return _tlv(0x02, raw)


def _entry(oid: str, value: bytes) -> bytes:
    return _tlv(0x30, _oid(oid) + value)


def sgx_extension(
    *, components: tuple[int, ...], pce_svn: int, fmspc: bytes, pce_id: bytes = b"\0\0"
) -> bytes:
    tcb = b"".join(_entry(f"{SGX_OID}.2.{i + 1}", _int(c)) for i, c in enumerate(components))
    tcb += _entry(f"{SGX_OID}.2.17", _int(pce_svn)) + _entry(f"{SGX_OID}.2.18", _tlv(0x04, bytes(components)))
    body = (
        _entry(f"{SGX_OID}.1", _tlv(0x04, bytes(16)))
        + _entry(f"{SGX_OID}.2", _tlv(0x30, tcb))
        + _entry(f"{SGX_OID}.3", _tlv(0x04, pce_id))
        + _entry(f"{SGX_OID}.4", _tlv(0x04, fmspc))
        + _entry(f"{SGX_OID}.5", _tlv(0x0A, b"\x00"))
    )
    return _tlv(0x30, body)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fake Intel"),
        ]
    )


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class TcbLevelSpec:
    sgx: tuple[int, ...]
    pce_svn: int
    tdx: tuple[int, ...]
    status: str
    advisories: tuple[str, ...] = ()


@dataclass
class FakeIntel:
    now: datetime
    ca_name: str = "Intel SGX PCK Platform CA"
    _serial: int = 1000
    revoked_pck: list[int] = field(default_factory=list)
    revoked_by_root: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._cert(
            _name("Intel SGX Root CA"), self.root_key, self.root_key.public_key(), None, ca=True
        )
        self.pck_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.pck_ca = self._cert(
            _name(self.ca_name), self.root_key, self.pck_ca_key.public_key(), self.root, ca=True
        )
        self.tcb_key = ec.generate_private_key(ec.SECP256R1())
        self.tcb_signer = self._cert(
            _name("Intel SGX TCB Signing"), self.root_key, self.tcb_key.public_key(), self.root, ca=False
        )

    def _cert(
        self,
        subject: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        public: ec.EllipticCurvePublicKey,
        issuer: x509.Certificate | None,
        *,
        ca: bool,
        extra: bytes | None = None,
    ) -> x509.Certificate:
        self._serial += 1
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(public)
            .serial_number(self._serial)
            .not_valid_before(self.now - timedelta(days=30))
            .not_valid_after(self.now + timedelta(days=3650))
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        if issuer is not None:
            issuer_key = issuer.public_key()
            assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
            )
        if extra is not None:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_OID), extra), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    def _crl(self, issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, serials: list[int]) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(self.now - timedelta(days=1))
            .next_update(self.now + timedelta(days=29))
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(self.now - timedelta(days=2))
                .build()
            )
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    # ------------------------------------------------------------------ quote

    def quote(
        self,
        *,
        version: int = 4,
        body_type: int = 2,
        cpu_svn: tuple[int, ...] = (3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0),
        pce_svn: int = 11,
        tee_tcb_svn: bytes = bytes([6, 1, 3]) + bytes(13),
        tee_tcb_svn2: bytes | None = None,
        td_attributes: int = 1 << 28,
        mr_td: bytes = b"\x11" * 48,
        report_data: bytes = b"\x22" * 64,
        qe_isv_svn: int = 4,
        qe_mrsigner: bytes = QE_MRSIGNER,
        mr_signer_seam: bytes = bytes(48),
        fmspc: bytes = FMSPC,
    ) -> tuple[bytes, x509.Certificate]:
        """A signed quote and its PCK leaf."""
        pck_key = ec.generate_private_key(ec.SECP256R1())
        leaf = self._cert(
            _name("Intel SGX PCK Certificate"),
            self.pck_ca_key,
            pck_key.public_key(),
            self.pck_ca,
            ca=False,
            extra=sgx_extension(components=cpu_svn, pce_svn=pce_svn, fmspc=fmspc),
        )
        ak = ec.generate_private_key(ec.SECP256R1())
        nums = ak.public_key().public_numbers()
        ak_raw = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
        header = struct.pack("<HHIHH", version, 2, 0x81, 0, 0) + bytes.fromhex(
            "939a7233f79c4ca9940a0db3957f0607"
        )
        header += bytes(20)
        body = (
            tee_tcb_svn
            + b"\x33" * 48  # mr_seam
            + mr_signer_seam
            + bytes(8)  # seam attributes
            + td_attributes.to_bytes(8, "little")
            + bytes.fromhex("e702060000000000")
            + mr_td
            + bytes(48 * 3)
            + b"\x44" * 48 * 4
            + report_data
        )
        if body_type == 3:  # TD report 1.5: the current TEE TCB SVN (default: unchanged) + MRSERVICETD
            body += (tee_tcb_svn if tee_tcb_svn2 is None else tee_tcb_svn2) + bytes(48)
        signed = header + (struct.pack("<HI", body_type, len(body)) if version == 5 else b"") + body
        auth = b"\x55" * 32
        qe_report = (
            bytes(16)
            + struct.pack("<I", 0)
            + bytes(28)
            + bytes.fromhex("11000000000000000700000000000000")
            + b"\x66" * 32
            + bytes(32)
            + qe_mrsigner
            + bytes(96)
            + struct.pack("<HH", 2, qe_isv_svn)
            + bytes(60)
            + hashlib.sha256(ak_raw + auth).digest()
            + bytes(32)
        )
        chain = (_pem(leaf, self.pck_ca, self.root).encode()) + b"\x00"
        cert_data = struct.pack("<HI", 5, len(chain)) + chain
        qe_cert = qe_report + _raw_sig(pck_key, qe_report) + struct.pack("<H", len(auth)) + auth + cert_data
        sig_data = _raw_sig(ak, signed) + ak_raw + struct.pack("<HI", 6, len(qe_cert)) + qe_cert
        return signed + struct.pack("<I", len(sig_data)) + sig_data, leaf

    # ------------------------------------------------------------------ collateral

    def collateral(
        self,
        *,
        levels: list[TcbLevelSpec] | None = None,
        module_levels: list[tuple[int, str, tuple[str, ...]]] | None = None,
        qe_levels: list[tuple[int, str]] | None = None,
        fmspc: bytes = FMSPC,
    ) -> TdxCollateral:
        if levels is None:
            levels = [
                TcbLevelSpec((3, 3, 2, 2, 4, 1, 0, 5) + (0,) * 8, 11, (5, 0, 3) + (0,) * 13, "UpToDate")
            ]
        if module_levels is None:
            module_levels = [(4, "UpToDate", ())]
        if qe_levels is None:
            qe_levels = [(4, "UpToDate")]
        issue, nxt = _day(self.now - timedelta(days=1)), _day(self.now + timedelta(days=29))
        tcb_info = {
            "id": "TDX",
            "version": 3,
            "issueDate": issue,
            "nextUpdate": nxt,
            "fmspc": fmspc.hex().upper(),
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
            "tdxModule": {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8},
            "tdxModuleIdentities": [
                {
                    "id": "TDX_01",
                    "mrsigner": "00" * 48,
                    "attributes": "00" * 8,
                    "attributesMask": "FF" * 8,
                    "tcbLevels": [
                        {"tcb": {"isvsvn": svn}, "tcbDate": issue, "tcbStatus": st, "advisoryIDs": list(adv)}
                        for svn, st, adv in module_levels
                    ],
                }
            ],
            "tcbLevels": [
                {
                    "tcb": {
                        "sgxtcbcomponents": [{"svn": s} for s in lv.sgx],
                        "pcesvn": lv.pce_svn,
                        "tdxtcbcomponents": [{"svn": s} for s in lv.tdx],
                    },
                    "tcbDate": issue,
                    "tcbStatus": lv.status,
                    "advisoryIDs": list(lv.advisories),
                }
                for lv in levels
            ],
        }
        qe_identity = {
            "id": "TD_QE",
            "version": 2,
            "issueDate": issue,
            "nextUpdate": nxt,
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": QE_MRSIGNER.hex().upper(),
            "isvprodid": 2,
            "tcbLevels": [
                {"tcb": {"isvsvn": svn}, "tcbDate": issue, "tcbStatus": st} for svn, st in qe_levels
            ],
        }
        tcb_text = json.dumps(tcb_info, separators=(",", ":"))
        qe_text = json.dumps(qe_identity, separators=(",", ":"))
        doc = {
            "pck_crl_issuer_chain": _pem(self.pck_ca, self.root),
            "root_ca_crl": self._crl(self.root, self.root_key, self.revoked_by_root).hex(),
            "pck_crl": self._crl(self.pck_ca, self.pck_ca_key, self.revoked_pck).hex(),
            "tcb_info_issuer_chain": _pem(self.tcb_signer, self.root),
            "tcb_info": tcb_text,
            "tcb_info_signature": _raw_sig(self.tcb_key, tcb_text.encode()).hex(),
            "qe_identity_issuer_chain": _pem(self.tcb_signer, self.root),
            "qe_identity": qe_text,
            "qe_identity_signature": _raw_sig(self.tcb_key, qe_text.encode()).hex(),
        }
        return load_collateral(json.dumps(doc).encode())
