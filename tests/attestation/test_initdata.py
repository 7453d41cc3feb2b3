"""Kata initdata: the annotation, its digest and where it lands (SNP HOST_DATA, TDX MRCONFIGID)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from veil.attestation.initdata import (
    ANNOTATION,
    InitdataError,
    decode_annotation,
    encode_annotation,
    parse_initdata,
)
from veil.attestation.policy import PlatformName
from veil.attestation.release import PlatformRelease, Release, policy_from_release, sign_release
from veil.attestation.tdx.quote import parse_tdx_quote
from veil.attestation.tdx.validate import TdxPolicy, validate_tdx
from veil.attestation.verdict import CheckStatus
from veil.cli import main

# The vector of Kata Containers' own runtime test (src/runtime/pkg/oci/utils_test.go,
# TestAddRemoteHypervisorAnnotations): this annotation must give exactly this digest.
KATA_ANNOTATION = (
    "H4sIAFlC92cAAytLLSrOzM9TsFVQMtAz1DNQ4krMSc8vyizJyAWJFWckGpmaKXFFpySWJMZyKSUm6pXk5+YoAeXU1dW5"
    "QJhLKTklA4toQX5OZnKlXlFqej6yBABS/5JkcQAAAA=="
)
KATA_DIGEST = "c6694bb7a29d6f37ec72a15582e004b9f3142159682db8509a304407419a49e5"
DOC = b"version = \"0.1.0\"\nalgorithm = \"sha384\"\n\n[data]\n\"aa.toml\" = '''\n[token_configs]\n'''\n"


def test_kata_vector_and_the_annotation_key() -> None:
    assert ANNOTATION == "io.katacontainers.config.hypervisor.cc_init_data"
    initdata = decode_annotation(KATA_ANNOTATION)
    assert initdata.algorithm == "sha256"
    assert initdata.digest.hex() == KATA_DIGEST
    assert initdata.host_data.hex() == KATA_DIGEST  # 32 bytes: the whole SHA-256
    assert initdata.mr_config_id == bytes.fromhex(KATA_DIGEST) + bytes(16)  # zero-padded to 48
    assert set(initdata.data) == {"aa.toml", "cdh.toml", "policy.rego"}


def test_sha384_is_cut_for_snp_and_whole_for_tdx() -> None:
    initdata = parse_initdata(DOC)
    digest = hashlib.sha384(DOC).digest()
    assert initdata.host_data == digest[:32] and initdata.mr_config_id == digest
    # The digest is over the bytes as written: a comment changes it (Kata hashes the text).
    assert parse_initdata(b"# note\n" + DOC).digest != initdata.digest


def test_annotation_round_trip_is_deterministic() -> None:
    value = encode_annotation(DOC)
    assert value == encode_annotation(DOC)  # gzip mtime 0: the same document, the same annotation
    assert decode_annotation(value).raw == DOC
    assert gzip.decompress(base64.b64decode(value)) == DOC  # plain gzip + base64, as Kata reads it


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (DOC.replace(b"0.1.0", b"0.2.0"), "version"),
        (DOC.replace(b"sha384", b"md5"), "algorithm"),
        (DOC + b"extra = 1\n", "[data]"),
        (b"policy = 'x'\n" + DOC, "unknown top-level"),
        (b"version = \n", "TOML"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_documents_kata_would_refuse_are_refused(doc: bytes, message: str) -> None:
    with pytest.raises(InitdataError, match=message):
        parse_initdata(doc)


def test_bad_annotations_are_typed_errors() -> None:
    with pytest.raises(InitdataError, match="base64"):
        decode_annotation("not base64!")
    with pytest.raises(InitdataError, match="gzip"):
        decode_annotation(base64.b64encode(DOC).decode())
    packed = gzip.compress(DOC, mtime=0)
    with pytest.raises(InitdataError, match="truncated"):
        decode_annotation(base64.b64encode(packed[:-6]).decode())
    with pytest.raises(InitdataError, match="trailing"):
        decode_annotation(base64.b64encode(packed + b"junk").decode())
    bomb = gzip.compress(b"#" * (1 << 20), mtime=0)  # 1 MiB of comment: over the bound
    with pytest.raises(InitdataError, match="inflates beyond"):
        decode_annotation(base64.b64encode(bomb).decode())


def veil(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_release_build_pins_initdata_where_kata_puts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "initdata.toml"
    doc.write_bytes(DOC)
    initdata = parse_initdata(DOC)
    stmt = tmp_path / "stmt.json"
    common = ("--model-digest", "cd" * 32, "--data-policy-digest", "ef" * 32, "--initdata", doc)
    code, _, err = veil(
        capsys, "release", "build", "-o", stmt, "--name", "v1", "--build-digest", "ab" * 32,
        "--platform", "SEV_SNP", "--snp-measurement", "11" * 48, *common,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = veil(
        capsys, "release", "build", "-o", stmt, "--add-to", stmt, "--platform", "TDX",
        "--mrtd", "22" * 48, *common,
    )  # fmt: skip
    assert code == 0, err
    release = Release.from_statement(json.loads(stmt.read_text()))
    snp, tdx = (release.platforms[p] for p in sorted(release.platforms, key=lambda p: p.value))
    assert snp.host_data == initdata.host_data and snp.mr_config_id is None
    assert tdx.mr_config_id == initdata.mr_config_id and tdx.host_data is None

    # A contradiction, a platform Kata does not launch this way, a bad document: refused.
    code, _, err = veil(
        capsys, "release", "build", "-o", tmp_path / "x.json", "--name", "v1", "--build-digest", "ab" * 32,
        "--platform", "SEV_SNP", "--host-data", "00" * 32, "--initdata", doc,
    )  # fmt: skip
    assert code == 2 and "contradicts" in err
    code, _, err = veil(
        capsys, "release", "build", "-o", tmp_path / "x.json", "--name", "v1", "--build-digest", "ab" * 32,
        "--platform", "AZURE_SEV_SNP", "--initdata", doc,
    )  # fmt: skip
    assert code == 2 and "SEV_SNP or TDX" in err
    bad = tmp_path / "bad.toml"
    bad.write_bytes(DOC.replace(b"sha384", b"sha1"))
    code, _, err = veil(
        capsys, "release", "build", "-o", tmp_path / "x.json", "--name", "v1", "--build-digest", "ab" * 32,
        "--platform", "TDX", "--initdata", bad,
    )  # fmt: skip
    assert code == 2 and "algorithm" in err

    code, out, _ = veil(capsys, "release", "initdata", doc)
    assert code == 0 and initdata.host_data.hex() in out and initdata.mr_config_id.hex() in out
    code, out, _ = veil(capsys, "release", "initdata", doc, "--annotation")
    assert code == 0 and decode_annotation(out.strip()).raw == DOC


def test_a_release_naming_mrconfigid_pins_it_in_tdx_validation(evidence_dir: Path) -> None:
    quote = parse_tdx_quote((evidence_dir / "tdx" / "dcap-qvl" / "tdx_quote").read_bytes())
    td = quote.td_report
    key = Ed25519PrivateKey.generate()

    def tdx_policy(mr_config_id: bytes | None) -> TdxPolicy:
        pins = PlatformRelease(
            measurements=frozenset({td.mr_td}),
            rtmr=tuple(frozenset({r}) for r in td.rtmrs),
            mr_config_id=mr_config_id,
            model_digests=frozenset({bytes(32)}),
            data_policy_digest=bytes(32),
        )
        release = Release("v1", bytes(32), {PlatformName.TDX: pins})
        return policy_from_release(sign_release(release, key), publisher_key=key.public_key()).tdx

    def mrconfigid(policy: TdxPolicy) -> CheckStatus:
        check = validate_tdx(quote, policy, tcb_status="UpToDate").get("policy.mrconfigid")
        assert check is not None
        return check.status

    assert mrconfigid(tdx_policy(td.mr_config_id)) is CheckStatus.PASS
    assert mrconfigid(tdx_policy(bytes(47) + b"\x01")) is CheckStatus.FAIL
    assert mrconfigid(tdx_policy(None)) is CheckStatus.SKIP
