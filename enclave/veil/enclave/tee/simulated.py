"""The simulated TEE: real-layout SEV-SNP and NVIDIA H100 evidence signed by a software root.

For development and CI only; it is loud about itself (``Evidence.simulated``, the claims'
``simulated: true``, platform ``PLATFORM_SIMULATED_SEV_SNP``, "SIMULATED" in every
certificate subject and in every log line of ``veil serve``). The evidence is
byte-for-byte in the real formats, so the same verifiers that check AMD and NVIDIA
evidence check it; only the trust anchor differs, and no default policy trusts it.

Simulation chains (generated into ``STATE_DIR/simulation/`` on first start, reused later):

* CPU, shaped like AMD's KDS chain for Milan: ``ARK`` (RSA-4096, self-signed) → ``ASK``
  (RSA-4096) → ``VCEK`` (EC P-384); both RSA signatures are RSASSA-PSS / SHA-384 /
  salt 48 as AMD's. The VCEK carries AMD's extensions: structVersion (1.3.6.1.4.1.3704.1.1),
  productName "Milan-B0" (.1.2, IA5String), blSPL / teeSPL / snpSPL / ucodeSPL
  (.1.3.1 / .2 / .3 / .8, INTEGER; spl_4..7 = 0) matching the reports' ``reported_tcb``,
  and hwID (.1.4) = the simulated chip id as a DER OCTET STRING (the newer KDS encoding).
* GPU, shaped like NVIDIA's device identity chain (all EC P-384, ECDSA-SHA384):
  ``Device Identity CA`` (root) → ``GH100 Identity`` ICA → ``GSP FMC LF`` leaf; the leaf
  carries 2.23.133.5.4.1 (DICE TcbInfo as NVIDIA encodes it: ``SEQUENCE { INTEGER 1,
  SubjectPublicKeyInfo, SEQUENCE { sha384, OCTET STRING fwid } }``) whose FWID (its last
  48 bytes) equals the FWID TLV in every report's opaque data.

``STATE_DIR/simulation-root.pem`` is the trust anchor a client is told to trust
(``veil chat --trust-simulated PEM``, ``Policy.simulated(PEM)``): a PEM bundle of
exactly two certificates, first the simulated ARK (root of the SNP chain), then the
simulated NVIDIA device root (root of the GPU chain). Private keys of the simulation
chains sit next to it (mode 0600): this is a simulation, and they are what makes it one.
The enclave's HPKE key is never written anywhere.

Reports: SNP ``ATTESTATION_REPORT`` version 3 (Milan CPUID 0x19/0x01/0x01), policy
0x30000 (SMT allowed, must-be-one bit; debug and migration agent off), VMPL 0,
signed by the VCEK; ``measurement`` is given by the caller (the server passes the build
digest zero-padded to 48 bytes, see :func:`veil.enclave.keys.measurement_from_build_digest`).
GPU reports: SPDM 1.1 GET_MEASUREMENTS request with the GPU nonce at bytes 4..36 and a
MEASUREMENTS response with 8 measurement blocks, a fresh responder nonce, opaque data
(driver and VBIOS version, project "VEIL-SIM", FWID) and a P-384 signature by the leaf.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from veil.attestation.nvidia.report import OpaqueFieldType, build_gpu_report
from veil.attestation.nvidia.verify import p384_signer
from veil.attestation.snp.report import Product, TcbVersion, build_snp_report
from veil.attestation.snp.verify import sign_snp_report
from veil.enclave.errors import AttestationProviderError
from veil.enclave.tee.provider import AttestationProvider, CpuEvidencePart, GpuEvidencePart
from veil.proto.v1 import evidence_pb2

__all__ = [
    "SIMULATION_ROOT_FILE",
    "SimulatedTeeProvider",
    "SimulationAuthority",
    "load_or_create_simulation",
    "root_fingerprints",
]

SIMULATION_ROOT_FILE = "simulation-root.pem"
_SIM_DIR = "simulation"
_IDENTITY_FILE = "identity.json"
_AMD_OID = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = f"{_AMD_OID}.1"
OID_PRODUCT_NAME = f"{_AMD_OID}.2"
OID_BL_SPL = f"{_AMD_OID}.3.1"
OID_TEE_SPL = f"{_AMD_OID}.3.2"
OID_SNP_SPL = f"{_AMD_OID}.3.3"
OID_UCODE_SPL = f"{_AMD_OID}.3.8"
OID_HWID = f"{_AMD_OID}.4"
OID_DICE_TCB_INFO = "2.23.133.5.4.1"
_SHA384_OID_DER = bytes.fromhex("0609608648016503040202")
PRODUCT_NAME = "Milan-B0"
SNP_POLICY = 0x30000
SNP_PLATFORM_INFO = 0x3
GPU_MEASUREMENT_COUNT = 8
GPU_DRIVER_VERSION = b"590.12\x00"
GPU_VBIOS_VERSION = bytes.fromhex("00a5009601000000")
_KEY_NAMES = ("ark", "ask", "vcek", "gpu-root", "gpu-ica", "gpu-leaf")
_FOREVER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
_O_SIM = "Veil SIMULATED TEE (not AMD, not NVIDIA)"

Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- DER scraps for the extension values (the only ASN.1 this module writes by hand) ---


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_int(n: int) -> bytes:
    body = n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big")
    return _der(0x02, body)


def _ext(oid: str, der_value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), der_value)


# --- the authority: keys, certificates, chip identity ----------------------------------


@dataclass(frozen=True, slots=True)
class SimulationAuthority:
    """The simulation chains and the simulated chip's identity, loaded from the state dir."""

    ark_key: rsa.RSAPrivateKey
    ark_cert: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    ask_cert: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    vcek_cert: x509.Certificate
    gpu_root_key: ec.EllipticCurvePrivateKey
    gpu_root_cert: x509.Certificate
    gpu_ica_key: ec.EllipticCurvePrivateKey
    gpu_ica_cert: x509.Certificate
    gpu_leaf_key: ec.EllipticCurvePrivateKey
    gpu_leaf_cert: x509.Certificate
    chip_id: bytes
    report_id: bytes
    fwid: bytes
    tcb: TcbVersion
    root_path: Path

    def snp_chain_pem(self) -> bytes:
        """``Evidence.cpu_cert_chain``: VCEK, ASK, ARK."""
        return _pem(self.vcek_cert, self.ask_cert, self.ark_cert)

    def gpu_chain_pem(self) -> bytes:
        """``GpuEvidence.cert_chain``: leaf, ICA, root."""
        return _pem(self.gpu_leaf_cert, self.gpu_ica_cert, self.gpu_root_cert)

    def root_bundle_pem(self) -> bytes:
        """The two trust anchors: simulated ARK, then simulated NVIDIA device root."""
        return _pem(self.ark_cert, self.gpu_root_cert)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def root_fingerprints(bundle_pem: bytes) -> list[str]:
    """SHA-256 fingerprints (hex) of the certificates in a root bundle, in order."""
    return [c.fingerprint(hashes.SHA256()).hex() for c in x509.load_pem_x509_certificates(bundle_pem)]


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _O_SIM),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ]
    if ou:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attrs)


_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: object, not_before: dt.datetime, not_after: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _ca_exts(
    b: x509.CertificateBuilder, key: object, issuer_key: object, path_length: int | None
) -> x509.CertificateBuilder:
    ski = x509.SubjectKeyIdentifier.from_public_key(key)  # type: ignore[arg-type]
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)  # type: ignore[arg-type]
    return (
        b.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _generate(state: Path, now: dt.datetime) -> None:
    """Create every key, certificate and the chip identity; write them into ``state``."""
    nb = now - dt.timedelta(days=1)
    ark_key = rsa.generate_private_key(65537, 4096)
    ask_key = rsa.generate_private_key(65537, 4096)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark_name, ask_name = (
        _name("SIMULATED ARK-Milan", "Engineering"),
        _name("SIMULATED SEV-Milan", "Engineering"),
    )
    ark = _ca_exts(
        _builder(ark_name, ark_name, ark_key.public_key(), nb, now + dt.timedelta(days=25 * 365)),
        ark_key.public_key(),
        ark_key.public_key(),
        None,
    ).sign(ark_key, hashes.SHA384(), rsa_padding=_PSS)
    ask = _ca_exts(
        _builder(ask_name, ark_name, ask_key.public_key(), nb, now + dt.timedelta(days=25 * 365)),
        ask_key.public_key(),
        ark_key.public_key(),
        0,
    ).sign(ark_key, hashes.SHA384(), rsa_padding=_PSS)

    chip_id = secrets.token_bytes(64)
    tcb = TcbVersion.from_parts(bootloader=4, tee=0, snp=22, microcode=213)
    vcek_b = _builder(
        _name("SIMULATED SEV-VCEK", "Engineering"),
        ask_name,
        vcek_key.public_key(),
        nb,
        now + dt.timedelta(days=7 * 365),
    )
    for oid, value in (
        (OID_STRUCT_VERSION, _der_int(1)),
        (OID_PRODUCT_NAME, _der(0x16, PRODUCT_NAME.encode("ascii"))),
        (OID_BL_SPL, _der_int(tcb.bootloader)),
        (OID_TEE_SPL, _der_int(tcb.tee)),
        (f"{_AMD_OID}.3.4", _der_int(0)),
        (f"{_AMD_OID}.3.5", _der_int(0)),
        (f"{_AMD_OID}.3.6", _der_int(0)),
        (f"{_AMD_OID}.3.7", _der_int(0)),
        (OID_SNP_SPL, _der_int(tcb.snp)),
        (OID_UCODE_SPL, _der_int(tcb.microcode)),
        (OID_HWID, _der(0x04, chip_id)),
    ):
        vcek_b = vcek_b.add_extension(_ext(oid, value), critical=False)
    vcek = vcek_b.sign(ask_key, hashes.SHA384(), rsa_padding=_PSS)

    gpu_root_key = ec.generate_private_key(ec.SECP384R1())
    gpu_ica_key = ec.generate_private_key(ec.SECP384R1())
    gpu_leaf_key = ec.generate_private_key(ec.SECP384R1())
    root_name = _name("SIMULATED NVIDIA Device Identity CA")
    ica_name = _name("SIMULATED NVIDIA GH100 Identity")
    gpu_root = _ca_exts(
        _builder(root_name, root_name, gpu_root_key.public_key(), nb, _FOREVER),
        gpu_root_key.public_key(),
        gpu_root_key.public_key(),
        None,
    ).sign(gpu_root_key, hashes.SHA384())
    gpu_ica = _ca_exts(
        _builder(ica_name, root_name, gpu_ica_key.public_key(), nb, _FOREVER),
        gpu_ica_key.public_key(),
        gpu_root_key.public_key(),
        1,
    ).sign(gpu_root_key, hashes.SHA384())
    fwid = hashlib.sha384(b"veil/simulated-gpu/fwid/v1" + chip_id).digest()
    spki = gpu_leaf_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tcb_info = _der(0x30, _der_int(1) + spki + _der(0x30, _SHA384_OID_DER + _der(0x04, fwid)))
    gpu_leaf = (
        _builder(_name("SIMULATED GH100 A01 GSP FMC LF"), ica_name, gpu_leaf_key.public_key(), nb, _FOREVER)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(gpu_leaf_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(gpu_ica_key.public_key()), critical=False
        )
        .add_extension(_ext(OID_DICE_TCB_INFO, tcb_info), critical=False)
        .sign(gpu_ica_key, hashes.SHA384())
    )

    sim = state / _SIM_DIR
    keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {
        "ark": ark_key,
        "ask": ask_key,
        "vcek": vcek_key,
        "gpu-root": gpu_root_key,
        "gpu-ica": gpu_ica_key,
        "gpu-leaf": gpu_leaf_key,
    }
    certs = {
        "ark": ark,
        "ask": ask,
        "vcek": vcek,
        "gpu-root": gpu_root,
        "gpu-ica": gpu_ica,
        "gpu-leaf": gpu_leaf,
    }
    for name in _KEY_NAMES:
        _write(
            sim / f"{name}.key.pem",
            keys[name].private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        _write(sim / f"{name}.crt.pem", certs[name].public_bytes(serialization.Encoding.PEM))
    identity = {
        "chip_id": chip_id.hex(),
        "report_id": secrets.token_bytes(32).hex(),
        "fwid": fwid.hex(),
        "tcb": {"bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp, "microcode": tcb.microcode},
        "product": PRODUCT_NAME,
    }
    _write(sim / _IDENTITY_FILE, json.dumps(identity, indent=2, sort_keys=True).encode())
    # The root bundle last: its presence marks a complete state directory.
    _write(state / SIMULATION_ROOT_FILE, _pem(ark, gpu_root), 0o644)


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    lock = state / _SIM_DIR / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def load_or_create_simulation(state_dir: Path, *, clock: Clock = _utcnow) -> SimulationAuthority:
    """Load the simulation chains from ``state_dir``, generating them on first use.

    Chains that are incomplete, inconsistent or no longer valid at ``clock()`` are
    generated afresh (which changes the root, so clients must be given the new one).
    """
    state = Path(state_dir)
    (state / _SIM_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(state):
        now = clock()
        try:
            return _load(state, now)
        except (OSError, ValueError, KeyError, TypeError, AttestationProviderError):
            pass
        _generate(state, now)
        try:
            return _load(state, now)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AttestationProviderError(f"simulation chain in {state} is unusable: {exc}") from None


def _load(state: Path, now: dt.datetime) -> SimulationAuthority:
    sim = state / _SIM_DIR
    keys = {  # our own files: skip OpenSSL's slow RSA consistency check, the public halves are compared below
        n: serialization.load_pem_private_key(
            (sim / f"{n}.key.pem").read_bytes(), None, unsafe_skip_rsa_key_validation=True
        )
        for n in _KEY_NAMES
    }
    certs = {n: x509.load_pem_x509_certificate((sim / f"{n}.crt.pem").read_bytes()) for n in _KEY_NAMES}
    for name in _KEY_NAMES:
        cert_pub = (
            certs[name]
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        key_pub = (
            keys[name]
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        if cert_pub != key_pub:
            raise AttestationProviderError(f"simulation {name} key does not match its certificate")
        if not certs[name].not_valid_before_utc <= now <= certs[name].not_valid_after_utc:
            raise AttestationProviderError(f"simulation {name} certificate is not valid now")
    root_path = state / SIMULATION_ROOT_FILE
    roots = x509.load_pem_x509_certificates(root_path.read_bytes())
    if roots != [certs["ark"], certs["gpu-root"]]:
        raise AttestationProviderError("simulation-root.pem does not hold the simulation roots")
    ident = json.loads((sim / _IDENTITY_FILE).read_text())
    tcb = TcbVersion.from_parts(**{k: int(v) for k, v in ident["tcb"].items()})
    rsa_keys = [keys["ark"], keys["ask"]]
    ec_keys = [keys[n] for n in _KEY_NAMES[2:]]
    if not all(isinstance(k, rsa.RSAPrivateKey) for k in rsa_keys) or not all(
        isinstance(k, ec.EllipticCurvePrivateKey) for k in ec_keys
    ):
        raise AttestationProviderError("simulation keys have the wrong types")
    return SimulationAuthority(
        ark_key=keys["ark"],  # type: ignore[arg-type]
        ark_cert=certs["ark"],
        ask_key=keys["ask"],  # type: ignore[arg-type]
        ask_cert=certs["ask"],
        vcek_key=keys["vcek"],  # type: ignore[arg-type]
        vcek_cert=certs["vcek"],
        gpu_root_key=keys["gpu-root"],  # type: ignore[arg-type]
        gpu_root_cert=certs["gpu-root"],
        gpu_ica_key=keys["gpu-ica"],  # type: ignore[arg-type]
        gpu_ica_cert=certs["gpu-ica"],
        gpu_leaf_key=keys["gpu-leaf"],  # type: ignore[arg-type]
        gpu_leaf_cert=certs["gpu-leaf"],
        chip_id=bytes.fromhex(ident["chip_id"]),
        report_id=bytes.fromhex(ident["report_id"]),
        fwid=bytes.fromhex(ident["fwid"]),
        tcb=tcb,
        root_path=root_path,
    )


# --- the provider -------------------------------------------------------------------------


class SimulatedTeeProvider(AttestationProvider):
    """Emits SIMULATED SEV-SNP + H100 evidence (see the module docstring)."""

    platform = evidence_pb2.PLATFORM_SIMULATED_SEV_SNP
    simulated = True
    name = "SIMULATED SEV-SNP + NVIDIA H100 (software TEE)"

    def __init__(
        self,
        authority: SimulationAuthority,
        measurement: bytes,
        *,
        gpu_count: int = 1,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if len(measurement) != 48:
            raise AttestationProviderError(f"SNP measurement must be 48 bytes, got {len(measurement)}")
        if not 0 <= gpu_count <= 8:
            raise AttestationProviderError("the simulation offers 0 to 8 GPUs")
        self._auth = authority
        self._measurement = measurement
        self._gpu_count = gpu_count
        self._random = random_bytes
        self._snp_chain = authority.snp_chain_pem()
        self._gpu_chain = authority.gpu_chain_pem()
        self._gpu_signer = p384_signer(authority.gpu_leaf_key)
        self._gpu_measurements = [
            hashlib.sha384(b"veil/simulated-gpu/measurement/v1" + bytes([i])).digest()
            for i in range(1, GPU_MEASUREMENT_COUNT + 1)
        ]

    @property
    def authority(self) -> SimulationAuthority:
        return self._auth

    def cpu_evidence(self, report_data: bytes) -> CpuEvidencePart:
        if len(report_data) != 64:
            raise AttestationProviderError(f"report_data must be 64 bytes, got {len(report_data)}")
        auth = self._auth
        unsigned = build_snp_report(
            version=3,
            product=Product.MILAN,
            policy=SNP_POLICY,
            reported_tcb=auth.tcb,
            platform_info=SNP_PLATFORM_INFO,
            report_data=report_data,
            measurement=self._measurement,
            report_id=auth.report_id,
            chip_id=auth.chip_id,
        )
        signed = sign_snp_report(unsigned, auth.vcek_key)
        return CpuEvidencePart(signed.to_bytes(), self._snp_chain)

    def gpu_evidence(self, gpu_nonce: bytes) -> Sequence[GpuEvidencePart]:
        if len(gpu_nonce) != 32:
            raise AttestationProviderError(f"GPU nonce must be 32 bytes, got {len(gpu_nonce)}")
        return [self._gpu_report(gpu_nonce, i) for i in range(self._gpu_count)]

    def _gpu_report(self, nonce: bytes, index: int) -> GpuEvidencePart:
        opaque = [
            (OpaqueFieldType.VBIOS_VERSION, GPU_VBIOS_VERSION),
            (OpaqueFieldType.PROJECT, b"VEIL-SIM\x00"),
            (OpaqueFieldType.DRIVER_VERSION, GPU_DRIVER_VERSION),
            (OpaqueFieldType.FWID, self._auth.fwid),
            (OpaqueFieldType.OPAQUE_DATA_VERSION, b"\x01\x00"),
        ]
        report = build_gpu_report(
            nonce=nonce,
            measurements=self._gpu_measurements,
            opaque=[(int(t), v) for t, v in opaque],
            responder_nonce=self._random(32),
            sign=self._gpu_signer,
        )
        return GpuEvidencePart(evidence_pb2.GpuEvidence.KIND_GPU, "HOPPER", report, self._gpu_chain, index)
