"""The online OCSP option of GPU verification, against a fake device CA's responder on loopback."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from veil.attestation.collateral import CollateralStore, Endpoints
from veil.attestation.errors import CollateralError
from veil.attestation.nvidia.ocsp import check_ocsp
from veil.attestation.nvidia.rim import parse_rim, verify_rim
from veil.attestation.nvidia.validate import GpuPolicy
from veil.attestation.nvidia.verify import verify_gpu as _verify_gpu
from veil.attestation.options import VerifyOptions
from veil.attestation.testing.nvidia import FakeGpuCa, later, make_fake_ca
from veil.attestation.verdict import CheckStatus

# Issue #11: the default GpuPolicy fails a report without RIMs and OCSP. The tests here pin the
# other checks, so they verify under the explicit opt-out unless they pass a policy themselves;
# tests/attestation/test_gpu_defaults.py pins the strict default.
EXPLORING = GpuPolicy.exploring()
verify_gpu = functools.partial(_verify_gpu, policy=EXPLORING)


NOW = later(400)
RIM_NOW = datetime(2024, 6, 1, tzinfo=UTC)
NONCE = bytes(range(32))


@dataclass
class Responder:
    """Answers OCSP requests for the fake CA: signs with the issuer's key, good unless told otherwise."""

    ca: FakeGpuCa
    revoked: set[int] = field(default_factory=set)
    echo_nonce: bool = True
    wrong_key: bool = False
    next_update_days: int = 7
    seen: list[x509.Certificate] = field(default_factory=list)

    def __call__(self, request_der: bytes) -> bytes:
        req = ocsp.load_der_ocsp_request(request_der)
        by_serial = {c.serial_number: (c, i) for i, c in enumerate(self.ca.chain)}
        cert, i = by_serial[req.serial_number]
        issuer = self.ca.chain[i + 1]
        issuer_key = {
            self.ca.brom: self.ca.brom_key,
            self.ca.ica: self.ca.ica_key,
            self.ca.root: self.ca.root_key,
        }[issuer]
        self.seen.append(cert)
        status = (
            ocsp.OCSPCertStatus.REVOKED if cert.serial_number in self.revoked else ocsp.OCSPCertStatus.GOOD
        )
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert,
            issuer=issuer,
            algorithm=hashes.SHA384(),
            cert_status=status,
            this_update=NOW - timedelta(hours=1),
            next_update=NOW + timedelta(days=self.next_update_days),
            revocation_time=NOW - timedelta(days=1) if status is ocsp.OCSPCertStatus.REVOKED else None,
            revocation_reason=x509.ReasonFlags.key_compromise
            if status is ocsp.OCSPCertStatus.REVOKED
            else None,
        )
        if self.echo_nonce:
            for ext in req.extensions:
                builder = builder.add_extension(ext.value, critical=False)
        if self.wrong_key:  # a responder the issuer never delegated to
            rogue_key = ec.generate_private_key(ec.SECP384R1())
            rogue = make_fake_ca().ica
            rogue = x509.CertificateBuilder(
                issuer_name=rogue.subject,
                subject_name=rogue.subject,
                public_key=rogue_key.public_key(),
                serial_number=1,
                not_valid_before=rogue.not_valid_before_utc,
                not_valid_after=rogue.not_valid_after_utc,
            ).sign(rogue_key, hashes.SHA384())
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, rogue).certificates([rogue])
            return builder.sign(rogue_key, hashes.SHA384()).public_bytes(Encoding.DER)
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
        return builder.sign(issuer_key, hashes.SHA384()).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def ca() -> FakeGpuCa:
    return make_fake_ca()


def test_good_chain(ca: FakeGpuCa) -> None:
    responder = Responder(ca)
    v = check_ocsp(ca.chain, VerifyOptions(now=NOW, ocsp_post=responder), nonce=b"n" * 16)
    assert v.ok, v.table()
    assert responder.seen == [ca.brom, ca.ica]  # the device-made leaf and the root are not asked about


def test_chain_without_root_and_leaf_included(ca: FakeGpuCa) -> None:
    responder = Responder(ca)
    assert check_ocsp(ca.chain[:-1], VerifyOptions(now=NOW, ocsp_post=responder, trusted_roots=(ca.root,))).ok
    assert responder.seen == [ca.brom, ca.ica]
    responder.seen.clear()
    assert check_ocsp(ca.chain, VerifyOptions(now=NOW, ocsp_post=responder), skip_leaf=False).ok
    assert responder.seen == [ca.leaf, ca.brom, ca.ica]
    assert not check_ocsp(ca.chain[:1], VerifyOptions(now=NOW, ocsp_post=responder)).ok


def test_rim_chain_ocsp_is_wired(evidence_dir: Path) -> None:
    """RIM signing chains are asked about from the signer up; a junk answer fails ``….ocsp``."""
    rim = parse_rim(
        (evidence_dir / "nvidia_gpu/nv-local-gpu-verifier-2.7.3/Driver_RIM_test_no_gpu.swidtag").read_bytes()
    )
    asked: list[bytes] = []

    def junk(request: bytes) -> bytes:
        asked.append(request)
        return b"junk"

    v = verify_rim(rim, VerifyOptions(now=RIM_NOW, ocsp_post=junk), prefix="rim.driver")
    assert [c.name for c in v.failed] == ["rim.driver.ocsp"]
    assert "HCC RIM L4 Signer" in v.failed[0].detail
    assert ocsp.load_der_ocsp_request(asked[0]).serial_number == rim.certificates[0].serial_number
    assert (
        verify_rim(rim, VerifyOptions(now=RIM_NOW)).get("rim.ocsp") is None
    )  # offline: no OCSP check at all


def test_revoked_intermediate(ca: FakeGpuCa) -> None:
    v = check_ocsp(ca.chain, VerifyOptions(now=NOW, ocsp_post=Responder(ca, revoked={ca.ica.serial_number})))
    assert [c.detail for c in v.failed] == ["Fake GH100 ICA: revoked (key_compromise)"]


@pytest.mark.parametrize(
    ("responder_kw", "now", "phrase"),
    [
        ({"wrong_key": True}, NOW, "not signed by the issuer"),
        ({"echo_nonce": False}, NOW, "does not echo the nonce"),
        ({"next_update_days": 7}, NOW + timedelta(days=8), "not current"),
    ],
)
def test_bad_responses(ca: FakeGpuCa, responder_kw: dict[str, object], now: object, phrase: str) -> None:
    v = check_ocsp(ca.chain, VerifyOptions(now=now, ocsp_post=Responder(ca, **responder_kw)), nonce=b"n" * 16)  # type: ignore[arg-type]
    assert len(v.failed) == 1 and phrase in v.failed[0].detail, v.table()


def test_transport_failure_and_garbage(ca: FakeGpuCa) -> None:
    def down(_: bytes) -> bytes:
        raise CollateralError("offline")

    assert (
        "OCSP request failed" in check_ocsp(ca.chain, VerifyOptions(now=NOW, ocsp_post=down)).failed[0].detail
    )
    assert (
        "does not parse"
        in check_ocsp(ca.chain, VerifyOptions(now=NOW, ocsp_post=lambda _: b"junk")).failed[0].detail
    )


def test_verify_gpu_offline_skips_online_checks(ca: FakeGpuCa) -> None:
    data = ca.report(NONCE)
    offline = verify_gpu(data, ca.chain, VerifyOptions(now=NOW, trusted_roots=(ca.root,)), nonce=NONCE)
    assert offline.ok and offline.get("gpu.ocsp").status is CheckStatus.SKIP  # type: ignore[union-attr]
    online = verify_gpu(
        data, ca.chain, VerifyOptions(now=NOW, trusted_roots=(ca.root,), ocsp_post=Responder(ca)), nonce=NONCE
    )
    assert online.ok and online.get("gpu.ocsp").status is CheckStatus.PASS  # type: ignore[union-attr]
    revoked = Responder(ca, revoked={ca.brom.serial_number})
    bad = verify_gpu(
        data, ca.chain, VerifyOptions(now=NOW, trusted_roots=(ca.root,), ocsp_post=revoked), nonce=NONCE
    )
    assert [c.name for c in bad.failed] == ["gpu.ocsp"]


@pytest.fixture
def ocsp_server(ca: FakeGpuCa) -> Iterator[str]:
    responder = Responder(ca)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = responder(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/ocsp-response")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_ocsp_over_http_through_the_collateral_store(ca: FakeGpuCa, ocsp_server: str, tmp_path: Path) -> None:
    store = CollateralStore(cache_dir=tmp_path, endpoints=Endpoints(nvidia_ocsp=ocsp_server))
    post: Callable[[bytes], bytes] = store.nvidia_ocsp
    data = ca.report(NONCE)
    v = verify_gpu(
        data, ca.chain, VerifyOptions(now=NOW, trusted_roots=(ca.root,), ocsp_post=post), nonce=NONCE
    )
    assert v.ok and v.get("gpu.ocsp").status is CheckStatus.PASS  # type: ignore[union-attr]
    offline = CollateralStore(cache_dir=tmp_path, offline=True)
    refused = verify_gpu(
        data,
        ca.chain,
        VerifyOptions(now=NOW, trusted_roots=(ca.root,), ocsp_post=offline.nvidia_ocsp),
        nonce=NONCE,
    )
    assert [c.name for c in refused.failed] == ["gpu.ocsp"]
