"""TDX collateral from a real HTTP server on loopback playing Intel PCS with go-tdx-guest's files."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from veil.attestation.collateral import CollateralStore, Endpoints, quote_chain
from veil.attestation.errors import CollateralError
from veil.attestation.options import VerifyOptions
from veil.attestation.tdx.collateral import dump_collateral, load_collateral
from veil.attestation.tdx.fetch import fetch_tdx_collateral, pck_ca_of
from veil.attestation.tdx.quote import TdxQuote, parse_tdx_quote
from veil.attestation.tdx.verify import verify_tdx
from veil.attestation.verdict import CheckStatus

FMSPC = "50806f000000"


class IntelPcs:
    """Intel PCS v4 + the certificates host, serving go-tdx-guest's real PCS files."""

    def __init__(self, files: Path) -> None:
        tcb_chain = quote_chain((files / "tcb_signing_chain.pem").read_bytes())
        self.routes = {
            ("/tdx/certification/v4/tcb", f"fmspc={FMSPC}"): (
                (files / "sample_tcbInfo_response").read_bytes(),
                {"TCB-Info-Issuer-Chain": tcb_chain},
            ),
            ("/tdx/certification/v4/qe/identity", ""): (
                (files / "sample_qeIdentity_response").read_bytes(),
                {"SGX-Enclave-Identity-Issuer-Chain": tcb_chain},
            ),
            ("/sgx/certification/v4/pckcrl", "ca=platform&encoding=der"): (
                (files / "pckcrl").read_bytes(),
                {"SGX-PCK-CRL-Issuer-Chain": quote_chain((files / "pck_crl_issuer_chain.pem").read_bytes())},
            ),
            ("/IntelSGXRootCA.der", ""): ((files / "rootcrl.der").read_bytes(), {}),
        }
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                outer.hits.append(self.path)
                query = "&".join(f"{k}={v[0]}" for k, v in sorted(parse_qs(url.query).items()))
                route = outer.routes.get((url.path, query))
                if route is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body, headers = route
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def pcs(evidence_dir: Path) -> Iterator[IntelPcs]:
    server = IntelPcs(evidence_dir / "tdx" / "go-tdx-guest")
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def quote(evidence_dir: Path) -> TdxQuote:
    return parse_tdx_quote((evidence_dir / "tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat").read_bytes())


def store_for(pcs: IntelPcs, cache: Path, client: httpx.Client, *, offline: bool = False) -> CollateralStore:
    return CollateralStore(
        cache_dir=cache,
        offline=offline,
        endpoints=Endpoints(intel_pcs=pcs.url, intel_certs=pcs.url),
        client=client,
    )


def test_fetched_collateral_verifies_and_is_cached(pcs: IntelPcs, quote: TdxQuote, tmp_path: Path) -> None:
    assert pck_ca_of(quote) == "platform"
    with httpx.Client() as client:
        collateral = fetch_tdx_collateral(store_for(pcs, tmp_path, client), quote)
        assert len(pcs.hits) == 4
        again = fetch_tdx_collateral(store_for(pcs, tmp_path, client), quote)
        assert len(pcs.hits) == 4  # all four items came from the on-disk cache
    assert again.tcb_info_json == collateral.tcb_info_json
    v = verify_tdx(quote, VerifyOptions(now=datetime(2023, 7, 1, tzinfo=UTC)), collateral=collateral)
    for name in (
        "tdx.pck.crl",
        "tdx.collateral.tcb_info",
        "tdx.collateral.qe_identity",
        "tdx.collateral.fmspc",
        "tdx.tcb.dcap_qvl",
    ):
        check = v.get(name)
        assert check is not None and check.status is CheckStatus.PASS, v.table()
    # The E4 stepping's CPU SVN is below every level of the real TCB info (see test_tdx_verify).
    assert [c.name for c in v.failed] == ["tdx.tcb.status"]


def test_offline_uses_only_the_cache(pcs: IntelPcs, quote: TdxQuote, tmp_path: Path) -> None:
    with httpx.Client() as client:
        with pytest.raises(CollateralError, match="offline"):
            fetch_tdx_collateral(store_for(pcs, tmp_path / "empty", client, offline=True), quote)
        fetch_tdx_collateral(store_for(pcs, tmp_path / "warm", client), quote)
        hits = len(pcs.hits)
        offline = fetch_tdx_collateral(store_for(pcs, tmp_path / "warm", client, offline=True), quote)
    assert len(pcs.hits) == hits
    assert offline.tcb_info.fmspc.hex() == FMSPC


def test_unknown_fmspc_is_a_collateral_error(pcs: IntelPcs, quote: TdxQuote, tmp_path: Path) -> None:
    del pcs.routes[("/tdx/certification/v4/tcb", f"fmspc={FMSPC}")]
    with httpx.Client() as client, pytest.raises(CollateralError, match="404"):
        fetch_tdx_collateral(store_for(pcs, tmp_path, client), quote)


def test_fetched_collateral_saved_for_offline_use(pcs: IntelPcs, quote: TdxQuote, tmp_path: Path) -> None:
    """dump_collateral writes dcap-qvl's JSON form; loading it back verifies identically."""
    with httpx.Client() as client:
        fetched = fetch_tdx_collateral(store_for(pcs, tmp_path, client), quote)
    saved = tmp_path / "collateral.json"
    saved.write_bytes(dump_collateral(fetched))
    loaded = load_collateral(saved.read_bytes())
    assert loaded.tcb_info_json == fetched.tcb_info_json
    assert loaded.pck_crl_der == fetched.pck_crl_der
    now = datetime(2023, 7, 1, tzinfo=UTC)
    assert verify_tdx(quote, VerifyOptions(now=now), collateral=loaded) == verify_tdx(
        quote, VerifyOptions(now=now), collateral=fetched
    )
