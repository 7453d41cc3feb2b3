"""The simulated TEE: real-layout SEV-SNP and NVIDIA H100 evidence signed by a software root.

For development and CI only; it is loud about itself (``Evidence.simulated``, the claims'
``simulated: true``, platform ``PLATFORM_SIMULATED_SEV_SNP``, "SIMULATED" in every
certificate subject and in every log line of ``veil serve``). The evidence is
byte-for-byte in the real formats, so the same verifiers that check AMD and NVIDIA
evidence check it; only the trust anchor differs, and no default policy trusts it.
The chains are made and the reports signed by the fake authorities the tests use
(:mod:`veil.attestation.testing.snp` and :mod:`~veil.attestation.testing.nvidia`); this
module adds RSA-4096 keys, "SIMULATED" names, validity from ``clock()`` and the state dir.

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

* RIMs, shaped like NVIDIA's RIM signing chain (EC P-384): ``Reference Value Root CA`` →
  ``RIM Signing`` leaf, which XMLDSig-signs the RIMs of the simulated GPU's driver and VBIOS.

``STATE_DIR/simulation-root.pem`` is the trust anchor a client is told to trust
(``veil chat --trust-simulated PEM``, ``Policy.simulated(PEM)``): a PEM bundle of
exactly three certificates, first the simulated ARK (root of the SNP chain), then the
simulated NVIDIA device root (root of the GPU chain), then the simulated NVIDIA RIM root
(root of the RIM signing chain). A state dir holding an older two-certificate bundle is
generated afresh.

Collateral: the provider staples what a client needs to verify offline
(:mod:`veil.enclave.tee.simulated_collateral`, cached in ``STATE_DIR/collateral/`` by
:class:`veil.enclave.collateral.CollateralCache`): a CRL signed by the simulated ARK, the
driver and VBIOS RIMs of the simulated GPU, and OCSP responses (signed by each issuer) for
the GPU device chain and the RIM signing chain. Private keys of the simulation
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
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from veil.attestation.nvidia.report import parse_gpu_report
from veil.attestation.snp.report import Product, TcbVersion
from veil.attestation.testing.nvidia import FakeGpuCa, make_fake_ca, nvidia_tcb_info
from veil.attestation.testing.pki import PrivateKey, load_private_key, pem, private_key_pem, spki_der
from veil.attestation.testing.rim import FakeRimCa, make_fake_rim_ca
from veil.attestation.testing.snp import FakeAmd, make_fake_amd, signed_report
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
PRODUCT = "Milan"
PRODUCT_NAME = "Milan-B0"
SNP_POLICY = 0x30000
SNP_PLATFORM_INFO = 0x3
GPU_MEASUREMENT_COUNT = 8
GPU_DRIVER_VERSION = "590.12"
GPU_VBIOS_VERSION = bytes.fromhex("00a5009601000000")
GPU_SUBJECTS = (
    "SIMULATED NVIDIA Device Identity CA",
    "SIMULATED NVIDIA GH100 Identity",
    "SIMULATED GH100 A01 GSP FMC LF",
)
_KEY_NAMES = ("ark", "ask", "vcek", "gpu-root", "gpu-ica", "gpu-leaf", "rim-root", "rim-signer")
_FOREVER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
_O_SIM = "Veil SIMULATED TEE (not AMD, not NVIDIA)"
_PREFIX = "SIMULATED "

Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- the authority: the fake AMD and NVIDIA chains, the chip identity -------------------


@dataclass(frozen=True, slots=True)
class SimulationAuthority:
    """The simulation chains and the simulated chip's identity, loaded from the state dir."""

    amd: FakeAmd  # simulated ARK and ASK (no ASVK)
    vcek_key: ec.EllipticCurvePrivateKey
    vcek_cert: x509.Certificate
    gpu: FakeGpuCa  # simulated device root, ICA and leaf (no BROM)
    rim: FakeRimCa  # simulated RIM root and RIM signing certificate
    chip_id: bytes
    report_id: bytes
    fwid: bytes
    tcb: TcbVersion
    root_path: Path

    @property
    def ark_cert(self) -> x509.Certificate:
        return self.amd.ark

    @property
    def gpu_root_cert(self) -> x509.Certificate:
        return self.gpu.root

    def snp_chain_pem(self) -> bytes:
        """``Evidence.cpu_cert_chain``: VCEK, ASK, ARK."""
        return pem(self.vcek_cert, self.amd.ask, self.amd.ark)

    def gpu_chain_pem(self) -> bytes:
        """``GpuEvidence.cert_chain``: leaf, ICA, root."""
        return pem(*self.gpu.chain)

    def root_bundle_pem(self) -> bytes:
        """The three trust anchors: simulated ARK, NVIDIA device root, NVIDIA RIM root."""
        return pem(self.amd.ark, self.gpu.root, self.rim.root)

    def files(self) -> dict[str, tuple[PrivateKey, x509.Certificate]]:
        """Key and certificate per file name stem (``ark`` → ``ark.key.pem``, ``ark.crt.pem``)."""
        return {
            "ark": (self.amd.ark_key, self.amd.ark),
            "ask": (self.amd.ask_key, self.amd.ask),
            "vcek": (self.vcek_key, self.vcek_cert),
            "gpu-root": (self.gpu.root_key, self.gpu.root),
            "gpu-ica": (self.gpu.ica_key, self.gpu.ica),
            "gpu-leaf": (self.gpu.leaf_key, self.gpu.leaf),
            "rim-root": (self.rim.root_key, self.rim.root),
            "rim-signer": (self.rim.signer_key, self.rim.signer),
        }


def root_fingerprints(bundle_pem: bytes) -> list[str]:
    """SHA-256 fingerprints (hex) of the certificates in a root bundle, in order."""
    return [c.fingerprint(hashes.SHA256()).hex() for c in x509.load_pem_x509_certificates(bundle_pem)]


def _generate(state: Path, now: dt.datetime) -> None:
    """Create every key, certificate and the chip identity; write them into ``state``."""
    nb = now - dt.timedelta(days=1)
    amd = make_fake_amd(
        PRODUCT,
        ark_key=rsa.generate_private_key(65537, 4096),
        ask_key=rsa.generate_private_key(65537, 4096),
        with_asvk=False,
        organization=_O_SIM,
        prefix=_PREFIX,
        not_before=nb,
        not_after=now + dt.timedelta(days=25 * 365),
        key_ids=True,
    )
    chip_id = secrets.token_bytes(64)
    tcb = TcbVersion.from_parts(bootloader=4, tee=0, snp=22, microcode=213)
    vcek_key, vcek = amd.leaf(
        tcb,
        hwid=chip_id,
        hwid_octet_string=True,  # the newer KDS encoding
        product_name=PRODUCT_NAME,
        struct_version=1,
        not_before=nb,
        not_after=now + dt.timedelta(days=7 * 365),
    )
    fwid = hashlib.sha384(b"veil/simulated-gpu/fwid/v1" + chip_id).digest()
    gpu = make_fake_ca(
        fwid=fwid,
        subjects=GPU_SUBJECTS,
        organization=_O_SIM,
        not_before=nb,
        not_after=_FOREVER,
        tcb_info=nvidia_tcb_info,
        key_ids=True,
    )
    rim = make_fake_rim_ca(
        not_before=nb, not_after=now + dt.timedelta(days=25 * 365), organization=_O_SIM, prefix=_PREFIX
    )
    authority = SimulationAuthority(
        amd,
        vcek_key,
        vcek,
        gpu,
        rim,
        chip_id,
        secrets.token_bytes(32),
        fwid,
        tcb,
        state / SIMULATION_ROOT_FILE,
    )
    sim = state / _SIM_DIR
    for stem, (key, cert) in authority.files().items():
        _write(sim / f"{stem}.key.pem", private_key_pem(key))
        _write(sim / f"{stem}.crt.pem", pem(cert))
    identity = {
        "chip_id": chip_id.hex(),
        "report_id": authority.report_id.hex(),
        "fwid": fwid.hex(),
        "tcb": {"bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp, "microcode": tcb.microcode},
        "product": PRODUCT_NAME,
    }
    _write(sim / _IDENTITY_FILE, json.dumps(identity, indent=2, sort_keys=True).encode())
    # The root bundle last: its presence marks a complete state directory.
    _write(authority.root_path, authority.root_bundle_pem(), 0o644)


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


def _rsa(key: PrivateKey, name: str) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise AttestationProviderError(f"simulation {name} key is not RSA")
    return key


def _ec(key: PrivateKey, name: str) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AttestationProviderError(f"simulation {name} key is not EC")
    return key


def _load(state: Path, now: dt.datetime) -> SimulationAuthority:
    sim = state / _SIM_DIR
    keys = {n: load_private_key((sim / f"{n}.key.pem").read_bytes()) for n in _KEY_NAMES}
    certs = {n: x509.load_pem_x509_certificate((sim / f"{n}.crt.pem").read_bytes()) for n in _KEY_NAMES}
    for name in _KEY_NAMES:
        if spki_der(certs[name].public_key()) != spki_der(keys[name].public_key()):  # type: ignore[arg-type]
            raise AttestationProviderError(f"simulation {name} key does not match its certificate")
        if not certs[name].not_valid_before_utc <= now <= certs[name].not_valid_after_utc:
            raise AttestationProviderError(f"simulation {name} certificate is not valid now")
    root_path = state / SIMULATION_ROOT_FILE
    roots = x509.load_pem_x509_certificates(root_path.read_bytes())
    if roots != [certs["ark"], certs["gpu-root"], certs["rim-root"]]:
        raise AttestationProviderError("simulation-root.pem does not hold the simulation roots")
    ident = json.loads((sim / _IDENTITY_FILE).read_text())
    amd = FakeAmd(
        PRODUCT,
        certs["ark"],
        certs["ask"],
        None,
        _rsa(keys["ark"], "ark"),
        _rsa(keys["ask"], "ask"),
        None,
        _O_SIM,
        _PREFIX,
        key_ids=True,
    )
    gpu = FakeGpuCa(
        _ec(keys["gpu-root"], "gpu-root"),
        certs["gpu-root"],
        _ec(keys["gpu-ica"], "gpu-ica"),
        certs["gpu-ica"],
        None,
        None,
        _ec(keys["gpu-leaf"], "gpu-leaf"),
        certs["gpu-leaf"],
    )
    rim = FakeRimCa(
        _ec(keys["rim-root"], "rim-root"),
        certs["rim-root"],
        _ec(keys["rim-signer"], "rim-signer"),
        certs["rim-signer"],
    )
    return SimulationAuthority(
        amd=amd,
        vcek_key=_ec(keys["vcek"], "vcek"),
        vcek_cert=certs["vcek"],
        gpu=gpu,
        rim=rim,
        chip_id=bytes.fromhex(ident["chip_id"]),
        report_id=bytes.fromhex(ident["report_id"]),
        fwid=bytes.fromhex(ident["fwid"]),
        tcb=TcbVersion.from_parts(**{k: int(v) for k, v in ident["tcb"].items()}),
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
        clock: Clock = _utcnow,
        collateral_dir: Path | None = None,
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
        self._gpu_measurements = [
            hashlib.sha384(b"veil/simulated-gpu/measurement/v1" + bytes([i])).digest()
            for i in range(1, GPU_MEASUREMENT_COUNT + 1)
        ]
        # Stapled collateral, cached beside the simulation chains unless told otherwise.
        from veil.enclave.collateral import CollateralCache
        from veil.enclave.tee.simulated_collateral import SimulatedCollateralSource

        sample = parse_gpu_report(self._gpu_report(bytes(32), 0).report).opaque
        source = SimulatedCollateralSource(
            authority,
            golden=dict(enumerate(self._gpu_measurements)),
            driver_version=GPU_DRIVER_VERSION,
            vbios_version=sample.vbios_version or "",
            clock=clock,
        )
        cache_dir = (
            collateral_dir if collateral_dir is not None else authority.root_path.parent / "collateral"
        )
        self._collateral = CollateralCache(source, cache_dir, clock=clock)

    @property
    def authority(self) -> SimulationAuthority:
        return self._auth

    def collateral(self) -> evidence_pb2.Collateral:
        """The simulated collateral to staple (refreshed before it expires)."""
        return self._collateral.current()

    def cpu_evidence(self, report_data: bytes) -> CpuEvidencePart:
        if len(report_data) != 64:
            raise AttestationProviderError(f"report_data must be 64 bytes, got {len(report_data)}")
        auth = self._auth
        signed = signed_report(
            auth.vcek_key,
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
        return CpuEvidencePart(signed.to_bytes(), self._snp_chain)

    def gpu_evidence(self, gpu_nonce: bytes) -> Sequence[GpuEvidencePart]:
        if len(gpu_nonce) != 32:
            raise AttestationProviderError(f"GPU nonce must be 32 bytes, got {len(gpu_nonce)}")
        return [self._gpu_report(gpu_nonce, i) for i in range(self._gpu_count)]

    def _gpu_report(self, nonce: bytes, index: int) -> GpuEvidencePart:
        report = self._auth.gpu.report(
            nonce,
            measurements=self._gpu_measurements,
            driver=GPU_DRIVER_VERSION,
            vbios=GPU_VBIOS_VERSION,
            fwid=self._auth.fwid,
            nvdec0=None,
            project=b"VEIL-SIM",
            project_sku=None,
            chip_sku=None,
            opaque_data_version=b"\x01\x00",
            responder_nonce=self._random(32),
        )
        return GpuEvidencePart(evidence_pb2.GpuEvidence.KIND_GPU, "HOPPER", report, self._gpu_chain, index)
