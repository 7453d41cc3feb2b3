"""``veil attest``: fetch from a real server, show every field, verify the real vectors in shared/evidence.

Times passed as ``--at`` sit inside each vector's validity window (SOURCES.tsv):
go-sev-guest VCEK 2022-09-24..2029-09-24 (go-sev-guest pins 2022-09-24T01:00Z); virtee VCEK
2023-04-03..2030-04-03; trustee VCEK 2023-01-24..2030-01-24; Azure VCEKs 2025-01-24..2030-05-02
overlap; dcap-qvl tdx_quote collateral 2025-06-19..2025-07-19, outdated 2026-02-18..2026-03-20,
near 2025-09-02..2025-10-02; NVIDIA HGX chains valid on 2025-10-01.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.attestation.snp.report import SigningKey, TcbVersion, parse_snp_report
from veil.attestation.tdx.quote import parse_tdx_quote
from veil.attestation.testing.snp import make_fake_amd, signed_report
from veil.cli import main

GSG_AT = "2022-09-24T01:00:00Z"
VIRTEE_AT = "2024-01-01"
TRUSTEE_AT = "2024-01-01"
AZURE_AT = "2026-01-01T00:00:00+00:00"
TDX_AT = "2025-07-01T00:00:00Z"
TDX_OUTDATED_AT = "2026-03-01"
NEAR_AT = "2025-09-15"
GPU_AT = "2025-10-01"
GPU_NONCE = "4760e30534a0621357d458b1a7936551b5dc4cd1e69718adf7ed9fb0252a537e"
STATUSES = {"pass", "fail", "skip"}
# Issue #11: the default policy pins the code identity and a dated TCB floor. No release names
# these public vectors and they predate the floor, so they verify under this explicit exploring
# policy unless a test gives its own (the default's refusals: test_default_policy_refuses_...).
EXPLORE = (
    "allow_any_measurement = true\n"
    "tcb_floor = { Milan = { bootloader = 2, tee = 0, snp = 5, microcode = 68 }, "
    "Genoa = { bootloader = 10, tee = 0, snp = 23, microcode = 84 } }\n"
)
_explore_file: list[Path] = []


def _explore() -> Path:
    if not _explore_file:
        path = Path(tempfile.mkdtemp(prefix="veil-explore-")) / "explore.toml"
        path.write_text(EXPLORE)
        _explore_file.append(path)
    return _explore_file[0]


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A private collateral cache, and vendor URLs that refuse at once: never the internet."""
    monkeypatch.setenv("VEIL_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("AMD_KDS", "INTEL_PCS", "INTEL_CERTS", "NVIDIA_RIM", "NVIDIA_OCSP"):
        monkeypatch.setenv(f"VEIL_{name}_URL", "http://127.0.0.1:9")


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    args = list(map(str, argv))
    if args[:1] == ["verify"] and not {"--policy", "--release", "--any-measurement"} & set(args):
        args += ["--policy", str(_explore())]
    code = main(["attest", *args])
    out, err = capsys.readouterr()
    return code, out, err


def verdict(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, dict[str, Any]]:
    code, out, err = run(capsys, "verify", *argv, "--json")
    assert "Traceback" not in err
    doc = json.loads(out)
    assert doc["ok"] is (code == 0)
    return code, doc


def failed(doc: dict[str, Any]) -> set[str]:
    return {c["name"] for c in doc["checks"] if c["status"] == "fail"}


def check(doc: dict[str, Any], name: str) -> dict[str, str]:
    found: list[dict[str, str]] = [c for c in doc["checks"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def pem_bundle(tmp_path: Path, *files: Path) -> Path:
    """Concatenate DER or PEM certificate files into one PEM bundle, in order."""
    out = b""
    for f in files:
        data = f.read_bytes()
        if b"-----BEGIN" in data:
            out += data if data.endswith(b"\n") else data + b"\n"
        else:
            out += ssl.DER_cert_to_PEM_cert(data).encode()
    path = tmp_path / "bundle.pem"
    path.write_bytes(out)
    return path


# ---------------------------------------------------------------------------------- SEV-SNP


def test_go_sev_guest_fails_only_on_debug(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = evidence_dir / "snp/go-sev-guest"
    certs = pem_bundle(tmp_path, d / "vcek.testcer", d / "milan.testcer")
    code, doc = verdict(capsys, d / "attestation.bin", "--certs", certs, "--at", GSG_AT, "--offline")
    assert code == 1
    assert failed(doc) == {"policy.debug"}
    assert check(doc, "snp.signature")["status"] == "pass"
    assert check(doc, "snp.chain.ark")["status"] == "pass"
    assert doc["kind"] == "snp"

    # The policy file can allow debug (never in production): then the same evidence is good.
    policy = tmp_path / "debug.toml"
    policy.write_text(EXPLORE + "allow_debug = true\n")
    code, doc = verdict(capsys, d / "attestation.bin", "--certs", certs, "--at", GSG_AT, "--policy", policy)
    assert code == 0, failed(doc)

    # report_data is 0102030405 followed by zeros; a short --report-data is zero-padded.
    args = (d / "attestation.bin", "--certs", certs, "--at", GSG_AT, "--policy", policy)
    code, doc = verdict(capsys, *args, "--report-data", "0102030405")
    assert code == 0 and check(doc, "policy.report_data")["status"] == "pass"
    code, doc = verdict(capsys, *args, "--report-data", "0102030406")
    assert code == 1 and failed(doc) == {"policy.report_data"}


def test_virtee_hex_report_with_a_single_der_vcek(
    evidence_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = evidence_dir / "snp/virtee-sev"
    code, out, _err = run(
        capsys,
        "verify",
        d / "report_milan.hex",
        "--certs",
        d / "vcek_milan.der",
        "--at",
        VIRTEE_AT,
        "--offline",
    )
    assert code == 0, out
    assert "kind:   snp (hex, detected)" in out
    assert "snp.signature" in out and "verdict: GOOD" in out
    assert "policy.measurement           skip    UNPINNED" in out  # the exploring policy (issue #11)


def test_snp_rejected_after_the_vcek_expired(evidence_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = evidence_dir / "snp/virtee-sev"
    code, doc = verdict(capsys, d / "report_milan.hex", "--certs", d / "vcek_milan.der", "--at", "2030-04-04")
    assert code == 1
    assert failed(doc) == {"snp.chain.validity"}
    assert (
        "VCEK" in check(doc, "snp.chain.validity")["detail"]
        or "2030-04-03" in check(doc, "snp.chain.validity")["detail"]
    )


@pytest.mark.parametrize("foreign", ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"])
def test_foreign_vcek_fails_the_signature(
    evidence_dir: Path, foreign: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = evidence_dir / "snp/trustee"
    code, doc = verdict(
        capsys, d / "test-report.bin", "--certs", d / foreign, "--at", TRUSTEE_AT, "--offline"
    )
    assert code == 1
    assert "snp.signature" in failed(doc)
    assert "does not verify" in check(doc, "snp.signature")["detail"]


def test_measurement_allow_list_from_a_policy_file(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = evidence_dir / "snp/virtee-sev"
    raw = bytes.fromhex("".join((d / "report_milan.hex").read_text().split()))
    measurement = parse_snp_report(raw).measurement.hex()
    args = (d / "report_milan.hex", "--certs", d / "vcek_milan.der", "--at", VIRTEE_AT)
    good = tmp_path / "good.toml"
    good.write_text(EXPLORE + f'measurements = ["{measurement}"]\n[snp]\nvmpls = [0, 1, 2, 3]\n')
    code, doc = verdict(capsys, *args, "--policy", good)
    assert code == 0 and check(doc, "policy.measurement")["status"] == "pass"
    assert doc["policy"] == str(good)
    bad = tmp_path / "bad.toml"
    bad.write_text(EXPLORE + f'measurements = ["{"00" * 48}"]\n')
    code, doc = verdict(capsys, *args, "--policy", bad)
    assert code == 1 and failed(doc) == {"policy.measurement"}


def test_vcek_fetched_from_kds_then_cached_for_offline_use(
    evidence_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --certs: the VCEK comes from (a loopback) AMD KDS, keyed by chip ID and reported TCB."""
    d = evidence_dir / "snp/virtee-sev"
    vcek = (d / "vcek_milan.der").read_bytes()
    requests: list[str] = []

    class Kds(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            ok = self.path.startswith("/vcek/v1/Milan/")
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(vcek) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(vcek)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Kds)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("VEIL_AMD_KDS_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
        report = d / "report_milan.hex"
        # A version-2 report names no product: the auditor must say which (or give --certs).
        code, _, err = run(capsys, "verify", report, "--at", VIRTEE_AT)
        assert code == 2 and "--product" in err and requests == []
        code, doc = verdict(capsys, report, "--at", VIRTEE_AT, "--product", "Milan")
        assert code == 0, failed(doc)
        chip_id = parse_snp_report(bytes.fromhex("".join(report.read_text().split()))).chip_id.hex()
        assert len(requests) == 1 and requests[0].startswith(f"/vcek/v1/Milan/{chip_id}?")
        assert "blSPL=3" in requests[0] and "ucodeSPL=115" in requests[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
    # The KDS is gone now (its URL refuses): the cached VCEK serves; nothing is asked for.
    code, doc = verdict(capsys, report, "--at", VIRTEE_AT, "--product", "Milan")
    assert code == 0 and len(requests) == 1
    # Offline means only the files given, not the cache: a clear usage error, not a verdict.
    code, out, err = run(capsys, "verify", report, "--at", VIRTEE_AT, "--product", "Milan", "--offline")
    assert code == 2 and out == ""
    assert "offline, and no VCEK given: give --certs" in err and "Traceback" not in err
    # Online with an empty cache and no KDS: a usage error naming the failure.
    monkeypatch.setenv("VEIL_CACHE_DIR", str(tmp_path / "empty"))
    code, out, err = run(capsys, "verify", report, "--at", VIRTEE_AT, "--product", "Milan")
    assert code == 2 and out == "" and "no VCEK for this report" in err and "give --certs" in err


# ---------------------------------------------------------------------------------- Azure


@pytest.mark.parametrize(
    ("name", "nonce"),
    [
        ("evidence-v0.json", b"challenge".hex()),
        ("evidence-v1.json", b"challenge".hex()),
        (
            "evidence-v2.json",
            "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9aa398f647caa2338748cd0fd9f5f819ef",
        ),
        (
            "evidence-genoa.json",
            "0218488bae25d2509232bf676f1a66a30d7372add909109b36016ef136f2938ca05475f8b46094de6b64270ea35d950f",
        ),
    ],
)
def test_azure_evidence_json(
    evidence_dir: Path, name: str, nonce: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = evidence_dir / "snp/trustee-az-snp-vtpm" / name
    code, doc = verdict(capsys, path, "--nonce", nonce, "--at", AZURE_AT, "--offline")
    assert code == 0, failed(doc)
    assert doc["kind"] == "azure-snp"
    for name_ in (
        "azure.hcl.binding",
        "azure.tpm.signature",
        "azure.tpm.nonce",
        "snp.signature",
        "policy.debug",
    ):
        assert check(doc, name_)["status"] == "pass", name_
    code, doc = verdict(capsys, path, "--nonce", b"another".hex(), "--at", AZURE_AT, "--offline")
    assert code == 1 and failed(doc) == {"azure.tpm.nonce"}


def test_raw_hcl_report_cannot_be_verified_alone(
    evidence_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = run(
        capsys, "verify", evidence_dir / "snp/trustee-az-snp-vtpm/hcl-report.bin", "--offline"
    )
    assert code == 2 and "evidence JSON" in err


# ---------------------------------------------------------------------------------- TDX


def test_tdx_quote_with_dcap_qvl_collateral(evidence_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = evidence_dir / "tdx/dcap-qvl"
    code, doc = verdict(
        capsys, d / "tdx_quote", "--collateral", d / "tdx_quote_collateral.json", "--at", TDX_AT, "--offline"
    )
    assert code == 0, failed(doc)
    assert "status=UpToDate" in check(doc, "tdx.tcb.status")["detail"]
    assert check(doc, "policy.tcb_status")["status"] == "pass"
    assert check(doc, "policy.mrtd")["status"] == "skip" and "UNPINNED" in check(doc, "policy.mrtd")["detail"]
    # After the collateral's nextUpdate the same quote is rejected.
    code, doc = verdict(
        capsys,
        d / "tdx_quote",
        "--collateral",
        d / "tdx_quote_collateral.json",
        "--at",
        "2025-08-01",
        "--offline",
    )
    assert code == 1 and "tdx.collateral.tcb_info" in failed(doc)


def test_tdx_outdated_quote_has_no_matching_tcb_level(
    evidence_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = evidence_dir / "tdx/dcap-qvl"
    code, doc = verdict(
        capsys,
        d / "tdx_quote_outdated",
        "--collateral",
        d / "tdx_quote_outdated_collateral.json",
        "--at",
        TDX_OUTDATED_AT,
        "--offline",
    )
    assert code == 1
    assert "tdx.tcb.status" in failed(doc)
    assert "no matching TCB level" in check(doc, "tdx.tcb.status")["detail"]


def test_tdx_hex_quote_and_policy_tables(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = evidence_dir / "tdx/dcap-qvl"
    args = (
        d / "near_quote_hex.txt",
        "--collateral",
        d / "near_quote_collateral.json",
        "--at",
        NEAR_AT,
        "--offline",
    )
    code, doc = verdict(capsys, *args)
    assert code == 0, failed(doc)
    quote = parse_tdx_quote(
        bytes.fromhex("".join(((d / "near_quote_hex.txt").read_text()).split()).removeprefix("0x"))
    )
    policy = tmp_path / "tdx.toml"
    policy.write_text(
        f'measurements = ["{quote.td_report.mr_td.hex()}"]\n'
        f'[tdx]\nrtmr0 = ["{quote.td_report.rtmr0.hex()}"]\nrtmr3 = ["{"11" * 48}"]\n'
    )
    code, doc = verdict(capsys, *args, "--policy", policy)
    # issue #11: one check per RTMR, and an unpinned one fails
    assert code == 1 and failed(doc) == {"policy.rtmr1", "policy.rtmr2", "policy.rtmr3"}
    assert check(doc, "policy.mrtd")["status"] == "pass"
    code, doc = verdict(capsys, *args, "--report-data", quote.td_report.report_data.hex())
    assert code == 0 and check(doc, "policy.report_data")["status"] == "pass"


def test_tdx_without_collateral_offline_fails_the_tcb_policy(
    evidence_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = verdict(capsys, evidence_dir / "tdx/dcap-qvl/tdx-quote.hex", "--at", TDX_AT, "--offline")
    assert code == 1 and failed(doc) == {"policy.tcb_status"}
    assert check(doc, "tdx.tcb.status")["status"] == "skip"
    assert check(doc, "tdx.ak.signature")["status"] == "pass"


def test_tdx_collateral_fetched_from_pcs_then_cached(
    evidence_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --collateral, not offline: TCB info, QE identity and CRLs come from (a loopback) Intel PCS
    serving go-tdx-guest's real PCS files; the second run is served from the cache."""
    from urllib.parse import quote as urlquote

    d = evidence_dir / "tdx/go-tdx-guest"
    tcb_chain = urlquote((d / "tcb_signing_chain.pem").read_text())
    routes = {
        "/tdx/certification/v4/tcb?fmspc=50806f000000": (
            (d / "sample_tcbInfo_response").read_bytes(),
            {"TCB-Info-Issuer-Chain": tcb_chain},
        ),
        "/tdx/certification/v4/qe/identity": (
            (d / "sample_qeIdentity_response").read_bytes(),
            {"SGX-Enclave-Identity-Issuer-Chain": tcb_chain},
        ),
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der": (
            (d / "pckcrl").read_bytes(),
            {"SGX-PCK-CRL-Issuer-Chain": urlquote((d / "pck_crl_issuer_chain.pem").read_text())},
        ),
        "/IntelSGXRootCA.der": ((d / "rootcrl.der").read_bytes(), {}),
    }
    hits: list[str] = []

    class Pcs(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body, headers = routes.get(self.path, (b"", {}))
            self.send_response(200 if self.path in routes else 404)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Pcs)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("VEIL_INTEL_PCS_URL", url)
    monkeypatch.setenv("VEIL_INTEL_CERTS_URL", url)
    quote = d / "tdx_prod_quote_SPR_E4.dat"
    try:
        code, doc = verdict(capsys, quote, "--at", "2023-07-01")
        assert sorted(hits) == sorted(routes)
        code_again, again = verdict(capsys, quote, "--at", "2023-07-01")
        assert len(hits) == len(routes)  # the second run came from the cache
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert doc["checks"] == again["checks"]
    for name in ("tdx.pck.crl", "tdx.collateral.tcb_info", "tdx.collateral.qe_identity", "tdx.tcb.dcap_qvl"):
        assert check(doc, name)["status"] == "pass", name
    # The E4 stepping's CPU SVN is below every level of this TCB info (as go-tdx-guest's own tests find).
    assert code == code_again == 1 and failed(doc) == {"tdx.tcb.status"}
    # issue #11: with collateral given, the policy check names the failed appraisal (skip), never
    # "verify with collateral" (it was a second failure saying so).
    assert check(doc, "policy.tcb_status") == {
        "name": "policy.tcb_status",
        "status": "skip",
        "detail": "not checked: tdx.tcb.status failed",
    }
    assert not any("with collateral" in c["detail"] for c in doc["checks"])


# ---------------------------------------------------------------------------------- NVIDIA


def _exploring_gpu_policy(tmp_path: Path, extra: str = "") -> Path:
    """Issue #11: the default policy fails a GPU without RIMs and OCSP; these tests pin the other
    checks under the explicit opt-out."""
    policy = tmp_path / "explore-gpu.toml"
    policy.write_text(extra + "[gpu]\nrequire_rims = false\nrequire_ocsp = false\n")
    return policy


def test_gpu_report_with_chain_and_nonce(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = evidence_dir / "nvidia_gpu/nvtrust/decoded"
    args = (d / "gpu0_evidence.bin", "--certs", d / "gpu0_certchain.pem", "--at", GPU_AT, "--offline")
    code, doc = verdict(capsys, *args, "--nonce", GPU_NONCE)
    assert code == 1 and failed(doc) == {
        "gpu[0].rim.driver",
        "gpu[0].rim.vbios",
        "gpu[0].measurements",
        "gpu[0].ocsp",
    }
    args = (*args, "--policy", _exploring_gpu_policy(tmp_path))
    code, doc = verdict(capsys, *args, "--nonce", GPU_NONCE)
    assert code == 0, failed(doc)
    assert check(doc, "gpu[0].nonce")["status"] == "pass"
    assert check(doc, "gpu[0].signature")["status"] == "pass"
    code, doc = verdict(capsys, *args, "--nonce", "00" * 32)
    assert code == 1 and failed(doc) == {"gpu[0].nonce"}


def test_gpu_evidence_list_and_gpu_policy(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = evidence_dir / "nvidia_gpu/nvtrust/gpu_evidence.json"
    explore = _exploring_gpu_policy(tmp_path)
    code, doc = verdict(capsys, path, "--nonce", GPU_NONCE, "--at", GPU_AT, "--offline", "--policy", explore)
    assert code == 0, failed(doc)
    assert {f"gpu[{i}].signature" for i in range(8)} <= {c["name"] for c in doc["checks"]}
    policy = tmp_path / "gpu.toml"
    policy.write_text(
        'gpu_count = 8\n[gpu]\ndriver_versions = ["535.104.05"]\nrequire_rims = false\nrequire_ocsp = false\n'
    )
    code, doc = verdict(capsys, path, "--nonce", GPU_NONCE, "--at", GPU_AT, "--offline", "--policy", policy)
    assert code == 1 and failed(doc) == {f"gpu[{i}].driver_version" for i in range(8)}
    assert check(doc, "policy.gpu_count")["status"] == "pass"


def test_gpu_rims_given_as_collateral(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """shared/evidence has no RIM for driver 590.12 / VBIOS 96.00.A5.00.01: a RIM for other
    versions is no match (skipped), and a policy that requires RIMs then fails."""
    d = evidence_dir / "nvidia_gpu"
    rim = d / "nv-local-gpu-verifier-2.7.3/1010_0200_882_96005E0001_PROD.swidtag"
    args = (
        d / "nvtrust/decoded/gpu0_evidence.bin",
        "--certs",
        d / "nvtrust/decoded/gpu0_certchain.pem",
        "--nonce",
        GPU_NONCE,
        "--collateral",
        rim,
        "--at",
        GPU_AT,
        "--offline",
    )
    code, doc = verdict(capsys, *args, "--policy", _exploring_gpu_policy(tmp_path))
    assert code == 0, failed(doc)
    assert check(doc, "gpu[0].rim.driver") == {
        "name": "gpu[0].rim.driver",
        "status": "skip",
        "detail": "no driver RIM for version 590.12",
    }
    strict = tmp_path / "rims.toml"
    strict.write_text("[gpu]\nrequire_rims = true\nrequire_ocsp = false\n")
    code, doc = verdict(capsys, *args, "--policy", strict)
    assert code == 1 and {"gpu[0].rim.driver", "gpu[0].rim.vbios"} <= failed(doc)
    not_a_rim = tmp_path / "rim.xml"
    not_a_rim.write_text("<nope/>")
    code, _, err = run(capsys, "verify", *args[:5], "--collateral", not_a_rim, "--offline")
    assert code == 2 and "not an NVIDIA RIM" in err


# ---------------------------------------------------------------------------------- errors, schema


def test_garbage_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not attestation evidence\n" * 3)
    code, out, err = run(capsys, "verify", garbage)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "cannot tell what this file holds" in err
    # Forcing a kind on garbage: still a one-line error, naming what failed.
    # issue #11: a parse failure is unusable input (exit 2, was 1); the table still names the check.
    code, out, err = run(capsys, "verify", garbage, "--kind", "tdx", "--offline")
    assert code == 2 and "tdx.quote.parse" in out and err.count("\n") == 1
    code, out, err = run(capsys, "show", garbage, "--kind", "snp")
    assert code == 2 and "not a valid snp artifact" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nonce", "xyz"], "--nonce is not hex"),
        (["--at", "yesterday"], "is not an ISO-8601"),
        (["--certs", "/nonexistent/vcek.pem"], "cannot read --certs"),
        (["--collateral", "/nonexistent/c.json"], "cannot read --collateral"),
    ],
)
def test_usage_errors(
    evidence_dir: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "verify", evidence_dir / "tdx/dcap-qvl/tdx_quote", *extra)
    assert code == 2 and out == "" and message in err and "Traceback" not in err


def test_misapplied_options(evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tdx = evidence_dir / "tdx/dcap-qvl/tdx_quote"
    gpu = evidence_dir / "nvidia_gpu/nvtrust/decoded/gpu0_evidence.bin"
    vcek = evidence_dir / "snp/virtee-sev/vcek_milan.der"
    assert run(capsys, "verify", tdx, "--certs", vcek)[2].count("PCK chain") == 1
    assert "needs --certs" in run(capsys, "verify", gpu, "--offline")[2]
    chain = gpu.parent / "gpu0_certchain.pem"
    assert "32 bytes" in run(capsys, "verify", gpu, "--certs", chain, "--nonce", "00")[2]
    policy = tmp_path / "p.toml"
    policy.write_text("allow_debugging = true\n")
    code, _, err = run(capsys, "verify", tdx, "--policy", policy)
    assert code == 2 and "allow_debugging" in err
    with pytest.raises(SystemExit) as exc:
        main(["attest", "verify", str(tdx), "--nonce", "00", "--report-data", "00"])
    assert exc.value.code == 2


def test_json_schema(evidence_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = evidence_dir / "snp/virtee-sev"
    code, doc = verdict(capsys, d / "report_milan.hex", "--certs", d / "vcek_milan.der", "--at", VIRTEE_AT)
    assert code == 0
    assert {"ok", "checks", "kind", "file", "at", "policy", "offline", "failed"} <= set(doc)
    assert doc["at"] == "2024-01-01T00:00:00+00:00" and doc["failed"] == []
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "detail"}
        assert c["status"] in STATUSES and isinstance(c["detail"], str) and c["name"]
    skipped = {c["name"]: c["detail"] for c in doc["checks"] if c["status"] == "skip"}
    assert skipped["policy.measurement"].startswith("UNPINNED")  # the exploring policy (issue #11)


def test_exit_codes_in_a_subprocess(evidence_dir: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    env_cmd = [sys.executable, "-m", "veil", "attest", "verify"]
    bad = subprocess.run([*env_cmd, str(garbage)], check=False, capture_output=True, text=True, timeout=120)
    assert (
        bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("veil attest verify:")
    )
    d = evidence_dir / "snp/go-sev-guest"
    debug = subprocess.run(
        [
            *env_cmd,
            str(d / "attestation.bin"),
            "--certs",
            str(d / "vcek.testcer"),
            "--at",
            GSG_AT,
            "--offline",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert debug.returncode == 1 and "Traceback" not in debug.stderr
    assert "policy.debug" in debug.stdout and "verdict: BAD" in debug.stdout


# ---------------------------------------------------------------------------------- show


def test_show_snp_names_every_field(evidence_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = evidence_dir / "snp/go-sev-guest/attestation.bin"
    report = parse_snp_report(path.read_bytes())
    code, out, _ = run(capsys, "show", path)
    assert code == 0
    for line in (
        f"measurement: {report.measurement.hex()}",
        f"report_data: {report.report_data.hex()}",
        f"chip_id: {report.chip_id.hex()}",
        "debug: yes",
        "signing_key: VCEK",
        "version: 2",
    ):
        assert line in out, line
    code, out, _ = run(capsys, "show", path, "--json")
    doc = json.loads(out)
    assert doc["kind"] == "snp" and doc["policy"]["debug"] is True
    assert doc["reported_tcb"]["microcode"] == report.reported_tcb.microcode


def test_show_azure_tdx_and_gpu(evidence_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    az = evidence_dir / "snp/trustee-az-snp-vtpm"
    code, out, _ = run(capsys, "show", az / "evidence-v1.json")
    assert code == 0 and "kind: azure-snp (json, detected)" in out
    assert "signature: HCLA" in out and "attestation_key: HCLAkPub RSA-2048" in out and "tpm_quote:" in out
    code, out, _ = run(capsys, "show", az / "hcl-report.bin", "--json")
    doc = json.loads(out)
    assert doc["form"] == "hcl" and doc["hardware_report"]["format"] == "AMD SEV-SNP ATTESTATION_REPORT"

    hexquote = evidence_dir / "tdx/dcap-qvl/tdx-quote.hex"
    quote = parse_tdx_quote(bytes.fromhex(hexquote.read_text().strip().removeprefix("0x")))
    code, out, _ = run(capsys, "show", hexquote)
    assert code == 0 and "kind: tdx (hex, detected)" in out
    assert f"mr_td: {quote.td_report.mr_td.hex()}" in out and "fmspc: b0c06f000000" in out

    gpu = evidence_dir / "nvidia_gpu/nvtrust"
    code, out, _ = run(capsys, "show", gpu / "decoded/gpu0_evidence.bin")
    assert code == 0 and "value: 590.12" in out and f"nonce: {GPU_NONCE}" in out
    code, out, _ = run(capsys, "show", gpu / "switch_evidence.json", "--json")
    doc = json.loads(out)
    assert len(doc["devices"]) == 4 and doc["devices"][0]["arch"] == "LS10"


# ---------------------------------------------------------------------------------- fetch (real server)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from veil.enclave.local_server import LocalServer

    base = tmp_path_factory.mktemp("attest-server")
    with LocalServer(base / "state", log_dir=base / "logs") as srv:
        yield srv


def test_fetch_show_verify_a_live_server(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "evidence.bin"
    nonce = "ab" * 32
    code, out, err = run(capsys, "fetch", server.address, "-o", out_file, "--nonce", nonce)
    assert code == 0, err
    assert f"nonce: {nonce}" in out and out_file.stat().st_size > 1000

    code, out, _ = run(capsys, "show", out_file)
    assert code == 0 and "kind: bundle (binary, detected)" in out
    assert "platform: PLATFORM_SIMULATED_SEV_SNP" in out and f"nonce: {nonce}" in out

    # The default policy never trusts the simulator.
    code, doc = verdict(capsys, out_file, "--nonce", nonce, "--offline")
    assert code == 1 and {"policy.platform", "policy.simulated"} <= failed(doc)

    policy = tmp_path / "sim.toml"
    policy.write_text(f'platforms = ["SIMULATED_SEV_SNP"]\n[roots]\nsimulation = "{server.root_pem}"\n')
    # issue #11: the identity comes from the manifest the simulated server signed beside its root
    state = server.root_pem.parent
    release = (
        "--release",
        state / "simulation-release.json",
        "--publisher-key",
        state / "simulation-publisher.pub",
    )
    code, doc = verdict(capsys, out_file, "--nonce", nonce, "--policy", policy)
    assert code == 1 and "policy.measurement" in failed(doc)
    code, doc = verdict(capsys, out_file, "--nonce", nonce, "--policy", policy, *release)
    assert code == 0, failed(doc)
    assert check(doc, "policy.release")["status"] == "pass"
    assert check(doc, "binding.nonce")["status"] == "pass"
    assert check(doc, "binding.report_data")["status"] == "pass"
    code, doc = verdict(capsys, out_file, "--nonce", "cd" * 32, "--policy", policy, *release)
    assert code == 1 and "binding.nonce" in failed(doc)


def test_fetch_with_a_fresh_nonce_and_errors(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "e.bin"
    code, out, _ = run(capsys, "fetch", server.address, "-o", out_file)
    assert code == 0
    nonce = out.splitlines()[0].removeprefix("nonce: ")
    assert len(bytes.fromhex(nonce)) == 32
    code, _, err = run(capsys, "fetch", server.address, "-o", out_file, "--nonce", "00")
    assert code == 2 and "32 bytes" in err
    code, _, err = run(capsys, "fetch", "127.0.0.1:9", "-o", tmp_path / "x.bin", "--timeout", "3")
    assert code == 2 and "GetEvidence from 127.0.0.1:9 failed" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- fuzz

FUZZ_VECTORS = (
    "snp/go-sev-guest/attestation.bin",
    "snp/virtee-sev/report_milan.hex",
    "snp/trustee-az-snp-vtpm/evidence-v1.json",
    "snp/trustee-az-snp-vtpm/hcl-report.bin",
    "tdx/dcap-qvl/tdx_quote",
    "tdx/dcap-qvl/tdx-quote.hex",
    "nvidia_gpu/nvtrust/decoded/gpu0_evidence.bin",
    "nvidia_gpu/nvtrust/gpu_evidence.json",
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vector=st.sampled_from(FUZZ_VECTORS),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4),
    command=st.sampled_from(
        [("show",), ("show", "--json"), ("verify", "--offline"), ("verify", "--offline", "--kind", "snp")]
    ),
)
def test_mangled_evidence_never_crashes(
    evidence_dir: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    vector: str,
    cut: float,
    flips: list[tuple[float, int]],
    command: tuple[str, ...],
) -> None:
    data = bytearray((evidence_dir / vector).read_bytes())
    data = data[: max(1, int(len(data) * cut))] if cut < 0.9 else data
    for where, value in flips:
        data[min(len(data) - 1, int(len(data) * where))] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mangled"
        path.write_bytes(bytes(data))
        when = ("--at", GPU_AT) if command[0] == "verify" else ()
        code, out, err = run(capsys, command[0], path, *command[1:], *when)
    assert code in (0, 1, 2)
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1
        if "--json" in command:  # issue #11: unusable input still prints one JSON document
            doc = json.loads(out)
            assert doc["ok"] is False and doc["error"]
        elif command[0] == "show":
            assert out == ""
        else:  # an artifact that does not parse: exit 2, its table still shows the parse check
            assert out == "" or ".parse " in out


# ---------------------------------------------------------------------------------- exact output (issue #11)

VERDICT_KEYS = {"ok", "checks", "kind", "file", "at", "policy", "offline", "failed"}


def unusable(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> dict[str, Any]:
    """``verify --json`` on input that cannot be used: exit 2, one stderr line, still a JSON verdict."""
    code, out, err = run(capsys, "verify", *argv, "--json")
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, (code, err)
    doc = json.loads(out)
    assert set(doc) == VERDICT_KEYS | {"error"}
    assert doc["ok"] is False and doc["error"] and doc["error"] in err
    assert doc["failed"] == [c["name"] for c in doc["checks"] if c["status"] == "fail"] and doc["failed"]
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "detail"} and c["status"] in STATUSES
    return doc


def test_unusable_input_exits_2_with_a_json_verdict(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not attestation evidence\n" * 3)
    doc = unusable(capsys, garbage)
    assert doc["checks"] == [{"name": "input", "status": "fail", "detail": doc["error"]}]
    assert doc["kind"] is None and doc["file"] == str(garbage) and doc["at"] is None
    assert "cannot tell what this file holds" in doc["error"]
    # a real SNP report cut short, read as what it claims to be: it does not parse
    cut = tmp_path / "cut.bin"
    cut.write_bytes((evidence_dir / "snp/go-sev-guest/attestation.bin").read_bytes()[:0x300])
    doc = unusable(
        capsys,
        cut,
        "--kind",
        "snp",
        "--certs",
        evidence_dir / "snp/go-sev-guest/vcek.testcer",
        "--at",
        GSG_AT,
    )
    assert "snp.report.parse" in doc["failed"] and doc["kind"] == "snp" and doc["at"].startswith("2022-09-24")
    assert doc["error"].startswith(f"{cut}: snp.report.parse: ")
    # a real TDX quote with an option that does not apply, and one with an unreadable file
    quote = evidence_dir / "tdx/dcap-qvl/tdx_quote"
    doc = unusable(capsys, quote, "--certs", evidence_dir / "snp/virtee-sev/vcek_milan.der", "--offline")
    assert doc["kind"] == "tdx" and "PCK chain" in doc["error"]
    doc = unusable(capsys, quote, "--collateral", tmp_path / "missing.json")
    assert "cannot read --collateral" in doc["error"]
    # show --json too: one JSON document saying why
    code, out, err = run(capsys, "show", garbage, "--kind", "snp", "--json")
    assert code == 2 and err.count("\n") == 1
    shown = json.loads(out)
    assert shown["ok"] is False and shown["kind"] == "snp" and "not a valid snp artifact" in shown["error"]


def test_provisional_firmware_names_the_component(
    evidence_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """trustee's real Milan report: committed microcode 115, running 206 (SOURCES.tsv)."""
    d = evidence_dir / "snp/trustee"
    _, doc = verdict(
        capsys, d / "test-report.bin", "--certs", d / "test-vcek.der", "--at", TRUSTEE_AT, "--offline"
    )
    assert check(doc, "policy.provisional_firmware") == {
        "name": "policy.provisional_firmware",
        "status": "fail",
        "detail": "running uncommitted firmware: microcode committed 115 vs current 206",
    }


def test_tdx_tcb_check_with_collateral_never_says_verify_with_collateral(
    evidence_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = evidence_dir / "tdx/dcap-qvl"
    args = (d / "tdx_quote_outdated", "--collateral", d / "tdx_quote_outdated_collateral.json", "--offline")
    code, doc = verdict(capsys, *args, "--at", TDX_OUTDATED_AT)
    assert code == 1 and check(doc, "tdx.tcb.status")["status"] == "fail"
    assert check(doc, "policy.tcb_status")["detail"] == "not checked: tdx.tcb.status failed"
    assert not any("with collateral" in c["detail"] for c in doc["checks"]), doc["checks"]
    # a current quote with its own collateral, its TD report tampered with: nothing is appraised on it
    raw = bytearray((d / "tdx_quote").read_bytes())
    raw[parse_tdx_quote(bytes(raw)).signed_length - 10] ^= 1
    tampered = tmp_path / "tampered_quote"
    tampered.write_bytes(bytes(raw))
    code, doc = verdict(
        capsys, tampered, "--collateral", d / "tdx_quote_collateral.json", "--offline", "--at", TDX_AT
    )
    assert code == 1 and doc["failed"] == ["tdx.ak.signature"], doc["failed"]
    for name in ("tdx.tdx_module", "tdx.tcb.status", "policy.tcb_status"):
        assert check(doc, name)["detail"] == "not checked: tdx.ak.signature failed", name
    assert not any("with collateral" in c["detail"] for c in doc["checks"])


def test_vlek_results_are_named_vlek_and_asvk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A VLEK-signed report (fake AMD authority, trusted through the policy's roots) through the CLI."""
    fake = make_fake_amd()
    tcb = TcbVersion.from_parts(bootloader=4, tee=0, snp=22, microcode=213)
    key, vlek = fake.leaf(tcb, hwid=None, csp_id="Contoso")
    assert fake.asvk is not None
    report = signed_report(
        key, version=3, reported_tcb=tcb, committed_tcb=tcb, current_tcb=tcb, signing_key=SigningKey.VLEK
    )
    (tmp_path / "report.bin").write_bytes(report.raw)
    pem = b"".join(c.public_bytes(Encoding.PEM) for c in (vlek, fake.asvk, fake.ark))
    (tmp_path / "chain.pem").write_bytes(pem)
    (tmp_path / "ark.pem").write_bytes(fake.ark.public_bytes(Encoding.PEM))
    (tmp_path / "policy.toml").write_text('[roots]\namd = ["ark.pem"]\n')
    _, doc = verdict(
        capsys,
        tmp_path / "report.bin",
        "--certs",
        tmp_path / "chain.pem",
        "--policy",
        tmp_path / "policy.toml",
        "--at",
        "2025-06-01",
        "--offline",
    )
    names = [c["name"] for c in doc["checks"]]
    for name in (
        "snp.chain.asvk",
        "snp.vlek.signing_key",
        "snp.vlek.product",
        "snp.vlek.tcb",
        "snp.vlek.hwid",
    ):
        assert name in names, names
    assert (
        check(doc, "snp.chain.asvk")["status"] == "pass" and "ASVK" in check(doc, "snp.chain.asvk")["detail"]
    )
    snp = [c for c in doc["checks"] if c["name"].startswith("snp.")]
    assert not any(c["name"].startswith("snp.vcek") or c["name"] == "snp.chain.ask" for c in snp)
    assert not any("VCEK" in c["detail"] or "ASK " in c["detail"] for c in snp), snp
    assert (
        "VLEK" in check(doc, "snp.chain.leaf")["detail"] and "VLEK" in check(doc, "snp.signature")["detail"]
    )
