"""AMD certificates: the pinned roots, the loader, and the VCEK/VLEK extensions of real certificates."""

from __future__ import annotations

import contextlib
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.attestation.errors import MalformedInputError, VeilAttestationError
from veil.attestation.options import VerifyOptions
from veil.attestation.snp import certs as amd_certs
from veil.attestation.snp.certs import (
    PINNED_FINGERPRINTS,
    fingerprint,
    load_certificates,
    parse_amd_extensions,
    pinned_ark,
    pinned_ask,
    pinned_asvk,
)
from veil.attestation.snp.report import Product, TcbVersion
from veil.attestation.snp.verify import verify_amd_chain, verify_snp_bytes
from veil.attestation.testing.snp import INSIDE, der_ia5, der_int, ext, issue, make_fake_amd, rsa_key

ROOTS_DIR = Path(amd_certs.__file__).parent.parent / "roots"
SHARED_CHAINS = {
    Product.MILAN: ("go-sev-guest/ask_ark_milan.pem", "go-sev-guest/ask_ark_milan_vlek.pem"),
    Product.GENOA: ("go-sev-guest/ask_ark_genoa.pem", "go-sev-guest/ask_ark_genoa_vlek.pem"),
    Product.TURIN: ("go-sev-guest/ask_ark_turin_vcek.pem", "go-sev-guest/ask_ark_turin_vlek.pem"),
}


def read(evidence: Path, path: str) -> list[x509.Certificate]:
    return load_certificates((evidence / "snp" / path).read_bytes())


@pytest.mark.parametrize("product", list(Product))
def test_shipped_roots_equal_the_shared_evidence(evidence_dir: Path, product: Product) -> None:
    vcek_chain, vlek_chain = SHARED_CHAINS[product]
    ask, ark = read(evidence_dir, vcek_chain)
    asvk, ark2 = read(evidence_dir, vlek_chain)
    assert pinned_ark(product) == ark == ark2
    assert pinned_ask(product) == ask
    assert pinned_asvk(product) == asvk
    # virtee/sev's built-in copies and trustee's bundles agree byte for byte.
    low = product.value.lower()
    assert read(evidence_dir, f"virtee-sev/{low}_ark.pem") == [ark]
    assert read(evidence_dir, f"virtee-sev/{low}_ask.pem") == [ask]
    assert read(evidence_dir, f"trustee/{low}_ask_ark_asvk.pem") == [ask, ark, asvk]
    for kind, cert in (("ark", ark), ("ask", ask), ("asvk", asvk)):
        der = cert.public_bytes(Encoding.DER)
        assert PINNED_FINGERPRINTS[(product, kind)] == hashlib.sha256(der).hexdigest() == fingerprint(cert)
        assert load_certificates((ROOTS_DIR / f"amd_{low}_{kind}.pem").read_bytes()) == [cert]


@pytest.mark.parametrize("product", list(Product))
def test_pinned_vlek_chain_links(product: Product) -> None:
    # No real VLEK is public; check the ASVK → ARK link of the shipped roots directly.
    ark, asvk = pinned_ark(product), pinned_asvk(product)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    for cert in (ark, pinned_ask(product), asvk):
        key = ark.public_key()
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096
        key.verify(cert.signature, cert.tbs_certificate_bytes, pss, hashes.SHA384())
        assert cert.issuer == ark.subject


def test_shipped_fingerprints_are_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    amd_certs._pinned.cache_clear()
    monkeypatch.setitem(amd_certs.PINNED_FINGERPRINTS, (Product.GENOA, "ark"), "00" * 32)
    try:
        with pytest.raises(VeilAttestationError, match="pinned fingerprint"):
            pinned_ark(Product.GENOA)
    finally:
        amd_certs._pinned.cache_clear()


@pytest.mark.parametrize(
    ("path", "product_name", "tcb", "hwid_len"),
    [
        ("go-sev-guest/vcek.testcer", "Milan-B0", (2, 0, 5, 68, None), 64),
        ("virtee-sev/vcek_milan.der", "Milan-B0", (3, 0, 8, 115, None), 64),
        ("virtee-sev/vcek_turin.der", "Turin", (0, 0, 0, 9, 0), 8),
        ("trustee/test-vcek.der", "Milan-B0", (3, 0, 8, 115, None), 64),
        ("trustee/test-vcek-invalid-legacy.der", "Milan-B0", (3, 0, 10, 169, None), 64),
        ("trustee/test-vcek-invalid-new.der", "Milan-B0", (0, 0, 0, 30, None), 64),
        ("trustee-az-snp-vtpm/vcek-genoa.pem", "Genoa", (10, 0, 23, 84, None), 64),
    ],
)
def test_real_vcek_extensions(
    evidence_dir: Path, path: str, product_name: str, tcb: tuple[int, ...], hwid_len: int
) -> None:
    cert = read(evidence_dir, path)[0]  # serial 0: loads without the deprecation warning escaping
    exts = parse_amd_extensions(cert)
    assert exts.product_name == product_name
    assert exts.product is Product.from_name(product_name)
    bl, tee, snp, ucode, fmc = tcb
    assert exts.tcb() == TcbVersion.from_parts(bootloader=bl, tee=tee, snp=snp, microcode=ucode, fmc=fmc)
    assert exts.hwid is not None and len(exts.hwid) == hwid_len
    assert exts.csp_id is None and not exts.is_vlek


def test_hwid_encodings(evidence_dir: Path) -> None:
    # "new" KDS encoding: DER OCTET STRING 04 40 ...; "legacy": the raw 64 bytes. Same value either way.
    new = parse_amd_extensions(read(evidence_dir, "trustee/test-vcek-invalid-new.der")[0])
    legacy = parse_amd_extensions(read(evidence_dir, "trustee/test-vcek-invalid-legacy.der")[0])
    assert new.hwid == legacy.hwid == bytes(range(64))
    turin = parse_amd_extensions(read(evidence_dir, "virtee-sev/vcek_turin.der")[0])
    assert turin.fmc_spl == 0 and turin.hwid == bytes.fromhex("1e550a8ee5cf9f4d")


def test_loader_forms(evidence_dir: Path) -> None:
    three = read(evidence_dir, "trustee-az-snp-vtpm/vcek.pem")
    assert [c.subject.rfc4514_string().split(",")[0] for c in three] == [
        "CN=SEV-VCEK",
        "CN=SEV-Milan",
        "CN=ARK-Milan",
    ]
    der = (evidence_dir / "snp/virtee-sev/vcek_milan.der").read_bytes()
    assert len(load_certificates(der)) == 1
    for bad in (
        b"",
        b"garbage",
        der[:-10],
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ):
        with pytest.raises(MalformedInputError):
            load_certificates(bad)
    with pytest.raises(MalformedInputError, match="no CERTIFICATE"):
        load_certificates(b"-----BEGIN PRIVATE KEY-----\n")


def _leaf_with(*extensions: x509.ExtensionType) -> x509.Certificate:
    fake = make_fake_amd()
    return issue(
        "SEV-VCEK", fake.ask.subject, rsa_key(3).public_key(), rsa_key(1), ca=False, extensions=extensions
    )


@pytest.mark.parametrize(
    "extensions",
    [
        (ext("1.3.6.1.4.1.3704.1.3.1", b"\x02\x02\x01\x00"),),  # SPL > 255
        (ext("1.3.6.1.4.1.3704.1.3.1", b"\x02\x01\xff"),),  # negative INTEGER
        (ext("1.3.6.1.4.1.3704.1.3.1", b"\x02\x02\x00\x01"),),  # non-minimal INTEGER
        (ext("1.3.6.1.4.1.3704.1.3.1", b"\x04\x01\x01"),),  # wrong tag
        (ext("1.3.6.1.4.1.3704.1.3.1", b"\x02\x01\x01\x00"),),  # trailing byte
        (ext("1.3.6.1.4.1.3704.1.2", b"\x16\x02\xff\xfe"),),  # non-ASCII product name
        (ext("1.3.6.1.4.1.3704.1.4", b"\x01" * 20),),  # hwID of no known length
        (ext("1.3.6.1.4.1.3704.1.4", bytes(64)), ext("1.3.6.1.4.1.3704.1.5", der_ia5("csp"))),  # both
    ],
)
def test_bad_extensions(extensions: tuple[x509.ExtensionType, ...]) -> None:
    with pytest.raises(MalformedInputError):
        parse_amd_extensions(_leaf_with(*extensions))


def test_reserved_and_missing_spls() -> None:
    reserved = parse_amd_extensions(
        _leaf_with(*(ext(f"1.3.6.1.4.1.3704.1.3.{n}", der_int(1)) for n in (1, 2, 3, 4, 8)))
    )
    with pytest.raises(MalformedInputError, match="reserved"):
        reserved.tcb()
    missing = parse_amd_extensions(_leaf_with(ext("1.3.6.1.4.1.3704.1.3.1", der_int(1))))
    with pytest.raises(MalformedInputError, match="lacks"):
        missing.tcb()


def test_fake_vlek_extensions() -> None:
    fake = make_fake_amd()
    _, vlek = fake.leaf(
        TcbVersion.from_parts(bootloader=1, tee=0, snp=2, microcode=3), hwid=None, csp_id="Contoso"
    )
    exts = parse_amd_extensions(vlek)
    assert exts.is_vlek and exts.csp_id == "Contoso" and exts.hwid is None
    verdict = verify_amd_chain(
        [vlek, fake.asvk, fake.ark], VerifyOptions(now=INSIDE, trusted_roots=(fake.ark,))
    )
    assert verdict.ok, verdict.table()
    assert "VLEK" in (verdict.get("snp.chain.leaf") or pytest.fail()).detail


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(st.data())
def test_fuzz_certificate_bundles(evidence_dir: Path, data: st.DataObject) -> None:
    path = data.draw(
        st.sampled_from(
            ["trustee-az-snp-vtpm/vcek.pem", "virtee-sev/vcek_turin.der", "trustee/test-vcek.der"]
        )
    )
    raw = bytearray((evidence_dir / "snp" / path).read_bytes())
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    report = (evidence_dir / "snp/trustee/test-report.bin").read_bytes()
    for blob in (bytes(raw), bytes(raw[:cut])):
        try:
            certs = load_certificates(blob)
        except VeilAttestationError:
            continue
        for cert in certs:
            with contextlib.suppress(VeilAttestationError):
                parse_amd_extensions(cert)
        with contextlib.suppress(VeilAttestationError):
            verify_amd_chain(certs, VerifyOptions(now=datetime(2026, 1, 1, tzinfo=UTC)))
        with contextlib.suppress(VeilAttestationError):
            verify_snp_bytes(report, certs, VerifyOptions(now=datetime(2026, 1, 1, tzinfo=UTC)))
