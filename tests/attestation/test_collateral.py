"""Collateral fetching against a real HTTP server on loopback serving the real vendor files."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from veil.attestation.collateral import CollateralStore, Endpoints, quote_chain
from veil.attestation.errors import CollateralError, MalformedInputError


class VendorServer:
    """Plays AMD KDS, Intel PCS and the NVIDIA RIM service with files from shared/evidence."""

    def __init__(self, evidence: Path) -> None:
        snp = evidence / "snp" / "go-sev-guest"
        report = (snp / "attestation.bin").read_bytes()
        self.hwid = report[0x1A0:0x1E0]
        tcb = int.from_bytes(report[0x180:0x188], "little")
        self.tcb = {"bl": tcb & 0xFF, "tee": (tcb >> 8) & 0xFF, "snp": (tcb >> 48) & 0xFF, "ucode": tcb >> 56}
        tdx = evidence / "tdx" / "go-tdx-guest"
        rim = (
            evidence / "nvidia_gpu" / "nv-local-gpu-verifier-2.7.3" / "1010_0200_882_96005E0001_PROD.swidtag"
        )
        self.rim_xml = rim.read_bytes()
        self.routes: dict[str, tuple[bytes, dict[str, str]]] = {
            f"/vcek/v1/Milan/{self.hwid.hex()}": ((snp / "vcek.testcer").read_bytes(), {}),
            "/vcek/v1/Milan/cert_chain": ((snp / "milan.testcer").read_bytes(), {}),
            "/vlek/v1/Milan/cert_chain": ((snp / "milanvlek.testcer").read_bytes(), {}),
            "/tdx/certification/v4/tcb": (
                (tdx / "sample_tcbInfo_response").read_bytes(),
                {"TCB-Info-Issuer-Chain": quote_chain((tdx / "tcb_signing_chain.pem").read_bytes())},
            ),
            "/tdx/certification/v4/qe/identity": (
                (tdx / "sample_qeIdentity_response").read_bytes(),
                {
                    "SGX-Enclave-Identity-Issuer-Chain": quote_chain(
                        (tdx / "tcb_signing_chain.pem").read_bytes()
                    )
                },
            ),
            "/sgx/certification/v4/pckcrl": (
                (tdx / "pckcrl").read_bytes(),
                {"SGX-PCK-CRL-Issuer-Chain": quote_chain((tdx / "pck_crl_issuer_chain.pem").read_bytes())},
            ),
            "/IntelSGXRootCA.der": ((tdx / "rootcrl.der").read_bytes(), {}),
            "/v1/rim/NV_GPU_DRIVER_GH100_535.86.10": (
                json.dumps({"id": "x", "rim": base64.b64encode(self.rim_xml).decode()}).encode(),
                {},
            ),
        }
        self.hits: list[str] = []
        self.throttle_next = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                outer.hits.append(self.path)
                if outer.throttle_next > 0:
                    outer.throttle_next -= 1
                    self.send_response(429)
                    self.send_header("Retry-After", "7")
                    self.end_headers()
                    return
                if url.path.startswith("/vcek/v1/Milan/") and "cert_chain" not in url.path:
                    query = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
                    want = {f"{k}SPL": v for k, v in outer.tcb.items()}
                    want["blSPL"] = outer.tcb["bl"]
                    if query != want:
                        self.send_response(404)
                        self.end_headers()
                        return
                route = outer.routes.get(url.path)
                if route is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body, headers = route
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def endpoints(self) -> Endpoints:
        return Endpoints(self.base, self.base, self.base, self.base, self.base)


@pytest.fixture()
def server(evidence_dir: Path) -> Iterator[VendorServer]:
    srv = VendorServer(evidence_dir)
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def _store(server: VendorServer, tmp_path: Path, **kw: object) -> tuple[CollateralStore, list[float]]:
    sleeps: list[float] = []
    clock = [100.0]

    def sleep(seconds: float) -> None:  # a fake clock that advances when slept on
        sleeps.append(seconds)
        clock[0] += seconds

    store = CollateralStore(
        cache_dir=tmp_path,
        endpoints=server.endpoints(),
        sleep=sleep,
        monotonic=lambda: clock[0],
        **kw,  # type: ignore[arg-type]
    )
    return store, sleeps


def test_amd_vcek_and_chain_fetched_then_cached(
    server: VendorServer, tmp_path: Path, evidence_dir: Path
) -> None:
    store, sleeps = _store(server, tmp_path)
    vcek = store.amd_vcek("Milan", server.hwid, server.tcb)
    assert vcek.content == (evidence_dir / "snp/go-sev-guest/vcek.testcer").read_bytes()
    assert not vcek.from_cache
    chain = store.amd_cert_chain("Milan")
    assert chain.content.count(b"BEGIN CERTIFICATE") == 2
    assert sleeps == [2.0], "the second KDS request waits out the KDS spacing"
    again = store.amd_vcek("Milan", server.hwid, server.tcb)
    assert again.from_cache and again.content == vcek.content
    assert len(server.hits) == 2


def test_kds_rate_limit_is_honoured(server: VendorServer, tmp_path: Path) -> None:
    store, sleeps = _store(server, tmp_path)
    server.throttle_next = 2
    assert store.amd_cert_chain("Milan", "vlek").content.startswith(b"-----BEGIN")
    assert sleeps == [7.0, 7.0]
    server.throttle_next = 10
    store2, _ = _store(server, tmp_path / "other", max_retries=1)
    with pytest.raises(CollateralError, match="HTTP 429"):
        store2.amd_cert_chain("Milan")


def test_intel_collateral_with_issuer_chains(
    server: VendorServer, tmp_path: Path, evidence_dir: Path
) -> None:
    store, _ = _store(server, tmp_path)
    tcb = store.tdx_tcb_info(bytes.fromhex("50806f000000"))
    assert b"tcbInfo" in tcb.content
    assert tcb.issuer_chain == (evidence_dir / "tdx/go-tdx-guest/tcb_signing_chain.pem").read_bytes()
    assert b"enclaveIdentity" in store.tdx_qe_identity().content
    crl = store.intel_pck_crl("platform")
    assert crl.issuer_chain.startswith(b"-----BEGIN CERTIFICATE")
    assert store.intel_root_ca_crl().content == (evidence_dir / "tdx/go-tdx-guest/rootcrl.der").read_bytes()
    cached = store.tdx_tcb_info(bytes.fromhex("50806f000000"))
    assert cached.from_cache and cached.issuer_chain == tcb.issuer_chain


def test_nvidia_rim(server: VendorServer, tmp_path: Path) -> None:
    store, _ = _store(server, tmp_path)
    rim = store.nvidia_rim("NV_GPU_DRIVER_GH100_535.86.10")
    assert rim.content == server.rim_xml
    with pytest.raises(CollateralError, match="HTTP 404"):
        store.nvidia_rim("NV_GPU_DRIVER_GH100_000")


def test_offline_uses_only_given_files(server: VendorServer, tmp_path: Path, evidence_dir: Path) -> None:
    store, _ = _store(server, tmp_path, offline=True)
    with pytest.raises(CollateralError, match="offline"):
        store.amd_cert_chain("Milan")
    with pytest.raises(CollateralError, match="offline"):
        store.nvidia_ocsp(b"req")
    store.put("amd/vcek/Milan/cert_chain.pem", (evidence_dir / "snp/go-sev-guest/milan.testcer").read_bytes())
    assert store.amd_cert_chain("Milan").from_cache
    assert server.hits == []


def test_bad_arguments_are_typed(tmp_path: Path) -> None:
    store = CollateralStore(cache_dir=tmp_path, offline=True)
    with pytest.raises(MalformedInputError, match="product"):
        store.amd_cert_chain("Rome")
    with pytest.raises(MalformedInputError, match="hwID"):
        store.amd_vcek("Milan", b"short", {"bl": 1, "tee": 0, "snp": 8, "ucode": 115})
    with pytest.raises(MalformedInputError, match="TCB"):
        store.amd_vcek("Milan", bytes(64), {"bl": 1})
    with pytest.raises(MalformedInputError, match="FMSPC"):
        store.tdx_tcb_info(b"\x00")
    with pytest.raises(MalformedInputError, match="RIM id"):
        store.nvidia_rim("../../etc/passwd")


def test_network_failure_is_typed(tmp_path: Path) -> None:
    closed = Endpoints(amd_kds="http://127.0.0.1:9")
    store = CollateralStore(cache_dir=tmp_path, endpoints=closed, client=httpx.Client(timeout=2.0))
    with pytest.raises(CollateralError, match="failed"):
        store.amd_cert_chain("Milan")
