"""TDX quote parser: every real quote in shared/evidence, by structure; fuzzed inputs raise typed errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.attestation.errors import MalformedInputError, UnsupportedError, VeilAttestationError
from veil.attestation.tdx.pck import SGX_EXTENSION_OID, parse_pck_extensions, parse_sgx_extension
from veil.attestation.tdx.quote import (
    BODY_TYPE_TD_REPORT_15,
    INTEL_QE_VENDOR_ID,
    TD_REPORT_10_SIZE,
    TdxQuote,
    describe_tdx_quote,
    parse_enclave_report,
    parse_td_report,
    parse_tdx_quote,
)


def read_quote(path: Path) -> bytes:
    """Binary quotes as they are; hex text (optionally ``0x``-prefixed) decoded."""
    data = path.read_bytes()
    if path.suffix in (".hex", ".txt"):
        return bytes.fromhex(data.decode().strip().removeprefix("0x"))
    return data


# name -> (file, version, TD report version, FMSPC, unsigned trailing bytes)
VECTORS = {
    "spr_e4_v4": ("go-tdx-guest/tdx_prod_quote_SPR_E4.dat", 4, "1.0", "50806f000000", 39),
    "v5_sample": ("go-tdx-guest/quote_v5_sample.dat", 5, "1.5", "90c06f000000", 0),
    "cos113_padded": ("go-tdx-guest/ccel_cos-113-tdx-quote.dat", 4, "1.0", "00806f050000", 3065),
    "dcap_tdx_quote": ("dcap-qvl/tdx_quote", 4, "1.0", "b0c06f000000", 70),
    "dcap_outdated_v5": ("dcap-qvl/tdx_quote_outdated", 5, "1.5", "90c06f000000", 0),
    "dcap_hex": ("dcap-qvl/tdx-quote.hex", 4, "1.0", "b0c06f000000", 70),
    "tappd_hex": ("dcap-qvl/quote-from-tappd.hex", 4, "1.0", "b0c06f000000", 70),
    "near_hex": ("dcap-qvl/near_quote_hex.txt", 4, "1.0", "20a06f000000", 70),
    "azure_td": ("trustee-az-tdx-vtpm/td-quote.bin", 4, "1.0", "00806f050000", 70),
}


@pytest.fixture(scope="module")
def quotes(evidence_dir: Path) -> dict[str, bytes]:
    return {name: read_quote(evidence_dir / "tdx" / v[0]) for name, v in VECTORS.items()}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_real_quotes_parse_by_structure(quotes: dict[str, bytes], name: str) -> None:
    _, version, td_version, fmspc, trailing = VECTORS[name]
    q = parse_tdx_quote(quotes[name])
    assert q.version == version
    assert q.header.tee_type == 0x81 and q.header.attestation_key_type == 2
    assert q.header.qe_vendor_id == INTEL_QE_VENDOR_ID
    assert q.td_report.version == td_version
    assert len(q.trailing) == trailing
    assert q.raw + q.trailing == quotes[name]
    assert (q.body_descriptor is None) == (version == 4)
    assert q.signed_length == (48 + 584 if version == 4 else 48 + 6 + 648)
    assert q.signature_data_length == len(q.raw) - q.signed_length - 4
    qe = q.signature_data.qe_certification
    assert len(qe.qe_auth_data) == 32
    assert len(q.pck_chain.certificates) == 3
    assert parse_pck_extensions(q.pck_chain.leaf).fmspc.hex() == fmspc


def test_td_report_fields_at_readme_offsets(quotes: dict[str, bytes]) -> None:
    raw = quotes["spr_e4_v4"]
    body = raw[48 : 48 + TD_REPORT_10_SIZE]
    td = parse_tdx_quote(raw).td_report
    offsets = {
        "tee_tcb_svn": (0, 16),
        "mr_seam": (16, 48),
        "mr_signer_seam": (64, 48),
        "seam_attributes": (112, 8),
        "td_attributes": (120, 8),
        "xfam": (128, 8),
        "mr_td": (136, 48),
        "mr_config_id": (184, 48),
        "mr_owner": (232, 48),
        "mr_owner_config": (280, 48),
        "rtmr0": (328, 48),
        "rtmr1": (376, 48),
        "rtmr2": (424, 48),
        "rtmr3": (472, 48),
        "report_data": (520, 64),
    }
    for field, (off, size) in offsets.items():
        assert getattr(td, field) == body[off : off + size], field
    assert td.tee_tcb_svn2 is None and td.mr_service_td is None
    assert td.rtmrs == (td.rtmr0, td.rtmr1, td.rtmr2, td.rtmr3)
    assert not td.debug


def test_v5_body_descriptor_and_td15_fields(quotes: dict[str, bytes]) -> None:
    raw = quotes["v5_sample"]
    q = parse_tdx_quote(raw)
    assert q.body_descriptor is not None
    assert q.body_descriptor.body_type == BODY_TYPE_TD_REPORT_15
    assert q.body_descriptor.body_size == 648
    body = raw[54 : 54 + 648]
    assert q.td_report.tee_tcb_svn2 == body[584:600]
    assert q.td_report.mr_service_td == body[600:648]
    assert q.td_report.tee_tcb_svn.hex() == "0b010400000000000000000000000000"


def test_qe_report_and_binding_inputs(quotes: dict[str, bytes]) -> None:
    q = parse_tdx_quote(quotes["dcap_tdx_quote"])
    sig = q.signature_data
    qe = sig.qe_certification.qe_report
    assert sig.certification_data_type == 6
    assert sig.qe_certification.pck_cert_chain_type == 5
    assert qe.isv_prod_id == 2 and qe.isv_svn == 6
    assert qe.mr_signer.hex() == "dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"
    bound = hashlib.sha256(sig.attestation_key + sig.qe_certification.qe_auth_data).digest()
    assert qe.report_data[:32] == bound
    assert parse_enclave_report(qe.raw) == qe


def test_cos113_quote_zero_padding_is_kept_apart(quotes: dict[str, bytes]) -> None:
    q = parse_tdx_quote(quotes["cos113_padded"])
    assert len(quotes["cos113_padded"]) == 8000
    assert q.trailing == bytes(len(q.trailing))
    assert q.td_report.report_data == bytes(64)  # the CCEL nonce was all zero


def test_go_tdx_guest_text_trailer_is_unsigned(quotes: dict[str, bytes]) -> None:
    q = parse_tdx_quote(quotes["spr_e4_v4"])
    assert q.trailing == b"\nextra bytes(only for testing purpose)\n"


def test_errors_are_typed(quotes: dict[str, bytes]) -> None:
    raw = quotes["dcap_tdx_quote"]
    with pytest.raises(UnsupportedError, match="version 3"):
        parse_tdx_quote(struct.pack("<H", 3) + raw[2:])
    with pytest.raises(UnsupportedError, match="TEE type"):
        parse_tdx_quote(raw[:4] + struct.pack("<I", 0) + raw[8:])
    with pytest.raises(UnsupportedError, match="key type"):
        parse_tdx_quote(raw[:2] + struct.pack("<H", 3) + raw[4:])
    v5 = quotes["v5_sample"]
    with pytest.raises(UnsupportedError, match="body type 1"):
        parse_tdx_quote(v5[:48] + struct.pack("<H", 1) + v5[50:])
    with pytest.raises(MalformedInputError, match="must be 648"):
        parse_tdx_quote(v5[:50] + struct.pack("<I", 584) + v5[54:])
    with pytest.raises(MalformedInputError, match="truncated"):
        parse_tdx_quote(raw[:700])
    with pytest.raises(MalformedInputError):
        parse_tdx_quote(b"")
    with pytest.raises(MalformedInputError):
        parse_td_report(bytes(100), td15=False)
    with pytest.raises(MalformedInputError):
        parse_enclave_report(bytes(383))


def test_every_truncation_is_typed(quotes: dict[str, bytes]) -> None:
    raw = parse_tdx_quote(quotes["v5_sample"]).raw
    for n in range(0, len(raw), 7):
        with pytest.raises(MalformedInputError):
            parse_tdx_quote(raw[:n])


def _mutate(raw: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(raw)
    for pos, val in edits:
        buf[pos % len(buf)] = val
    return bytes(buf)


def _parse_or_typed(data: bytes) -> TdxQuote | None:
    try:
        return parse_tdx_quote(data)
    except VeilAttestationError:
        return None


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(data=st.data())
def test_fuzz_mutations_raise_only_typed_errors(quotes: dict[str, bytes], data: st.DataObject) -> None:
    raw = quotes[data.draw(st.sampled_from(["spr_e4_v4", "v5_sample", "dcap_tdx_quote"]))]
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=8))
    cut = data.draw(st.integers(0, len(raw)))
    _parse_or_typed(_mutate(raw, edits)[:cut])


@_FUZZ
@given(data=st.data())
def test_fuzz_structural_fields(quotes: dict[str, bytes], data: st.DataObject) -> None:
    """Lengths and type fields are where parsers break: hit them with arbitrary values."""
    raw = bytearray(quotes["v5_sample"])
    sig_off = 54 + 648
    fields = [
        (0, "<H"),
        (2, "<H"),
        (4, "<I"),
        (48, "<H"),
        (50, "<I"),
        (sig_off, "<I"),
        (sig_off + 4 + 128, "<H"),
    ]
    fields.append((sig_off + 4 + 128 + 2, "<I"))
    off, fmt = data.draw(st.sampled_from(fields))
    value = data.draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1))
    struct.pack_into(fmt, raw, off, value)
    _parse_or_typed(bytes(raw))


@_FUZZ
@given(blob=st.binary(max_size=2048))
def test_fuzz_random_bytes(blob: bytes) -> None:
    _parse_or_typed(blob)
    _parse_or_typed(b"\x04\x00\x02\x00\x81\x00\x00\x00" + blob)


def test_pck_chain_garbage_is_typed(quotes: dict[str, bytes]) -> None:
    raw = bytearray(parse_tdx_quote(quotes["dcap_tdx_quote"]).raw)
    start = raw.index(b"-----BEGIN CERTIFICATE-----") + 40
    raw[start : start + 20] = b"!" * 20
    with pytest.raises(MalformedInputError):
        parse_tdx_quote(bytes(raw))


@pytest.mark.parametrize("name", ["spr_e4_v4", "v5_sample"])
def test_describe_names_every_field(quotes: dict[str, bytes], name: str) -> None:
    q = parse_tdx_quote(quotes[name])
    d = describe_tdx_quote(q)
    json.dumps(d)  # JSON-ready
    td = d["td_report"]
    assert isinstance(td, dict)
    assert td["mr_td"] == q.td_report.mr_td.hex()
    assert td["td_attribute_flags"] == (["PKS"] if q.version == 4 else ["SEPT_VE_DISABLE"])
    assert ("mr_service_td" in td) == (q.version == 5)
    sig = d["signature_data"]
    assert isinstance(sig, dict)
    assert sig["pck_extensions"]["fmspc"] == VECTORS[name][3]  # type: ignore[index]
    assert len(sig["pck_cert_chain"]) == 3  # type: ignore[arg-type]
    assert d["trailing_unsigned_bytes"] == len(q.trailing)


@_FUZZ
@given(data=st.data())
def test_fuzz_sgx_extension_der(quotes: dict[str, bytes], data: st.DataObject) -> None:
    leaf = parse_tdx_quote(quotes["dcap_tdx_quote"]).pck_chain.leaf
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID)).value
    assert isinstance(ext, x509.UnrecognizedExtension)
    der = bytearray(ext.value)
    assert parse_sgx_extension(bytes(der)) == parse_pck_extensions(leaf)
    for _ in range(data.draw(st.integers(1, 4))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(der)))
    with contextlib.suppress(MalformedInputError):
        parse_sgx_extension(bytes(der[:cut]))
