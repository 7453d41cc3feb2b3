"""Offline verification speed on the real vectors in ../shared/evidence, with peers and floors.

Cases (each: median and p90 over ``--runs`` after ``--warmup`` untimed runs; every timed
run must return a GOOD verdict, so the success path is what is measured):

* **SNP, cached certs** — the ``veil attest verify`` path without ``--certs``: the VCEK
  read from the on-disk collateral cache (seeded once through :class:`CollateralStore`
  from a mock KDS, whose URL then refuses), parsed, chain + signature + extensions
  verified, then the production policy. virtee's Milan report. Target ≤ 5 ms median.
  Also with the certificates already parsed in memory.
* **TDX, with collateral** — dcap-qvl JSON collateral parsed, quote parsed, signatures,
  PCK chain, CRLs, collateral signatures, TCB appraisal (which includes one run of
  dcap-qvl as an independent cross-check), then the TDX policy. dcap-qvl's sample quote.
  Target ≤ 30 ms. Peer in the same run: ``dcap_qvl.verify`` on the same quote and collateral.
* **GPU report** — one H100 SPDM report (gpu0 of the HGX vector): signature, chain to the
  pinned root (cached after the first run), FWID, nonce, versions. Target ≤ 10 ms.
  Also with the chain parsed and verified every run (no cache). Peer in the same run, when
  ``--nv-peer-python`` names a venv holding ``nv-local-gpu-verifier==2.7.3`` (NVIDIA's own
  verifier; it pins cryptography 43, so it cannot share this venv): the same steps per report.

Floors: the ``cryptography`` primitive each case cannot avoid, timed the same way —
ECDSA P-384 verify (the SNP and GPU report signatures), RSASSA-PSS-4096 verify (each
AMD chain link), ECDSA P-256 verify (each TDX signature) — and the ratio to them.

Run: ``python bench/verify.py [--runs 300] [--warmup 30] [--nv-peer-python VENV/bin/python]``.
Peer set-up: ``python -m venv /tmp/nvpeer && /tmp/nvpeer/bin/pip install nv-local-gpu-verifier==2.7.3``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EVIDENCE = Path(os.environ.get("VEIL_EVIDENCE_DIR", ROOT.parent / "shared" / "evidence"))
SNP_AT = datetime(2024, 1, 1, tzinfo=UTC)  # virtee VCEK 2023-04-03..2030-04-03
TDX_AT = datetime(2025, 7, 1, tzinfo=UTC)  # collateral 2025-06-19..2025-07-19
GPU_AT = datetime(2025, 10, 1, tzinfo=UTC)
GPU_NONCE = bytes.fromhex("4760e30534a0621357d458b1a7936551b5dc4cd1e69718adf7ed9fb0252a537e")


def measure(fn: Callable[[], object], runs: int, warmup: int) -> tuple[float, float, float]:
    """(median, p90, median CPU time) in milliseconds; CPU time is steadier on a busy machine."""
    for _ in range(warmup):
        fn()
    samples, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return statistics.median(samples), statistics.quantiles(samples, n=10)[-1], statistics.median(cpu)


def _good(verdict: Any) -> None:
    if not verdict.ok:
        failed = ", ".join(c.name for c in verdict.failed)
        raise SystemExit(f"bench/verify.py: a timed verification was not GOOD (failed: {failed})")


# ---------------------------------------------------------------------------------- SEV-SNP


def snp_cases(cache: Path) -> dict[str, Callable[[], object]]:
    import httpx

    from veil.attestation.audit.verify import (
        AuditRequest,
        collateral_store,
        verify_snp_artifact,
    )
    from veil.attestation.options import VerifyOptions
    from veil.attestation.policy import Policy
    from veil.attestation.snp.certs import load_certificates
    from veil.attestation.snp.report import Product, parse_snp_report
    from veil.attestation.snp.validate import validate_snp
    from veil.attestation.snp.verify import verify_snp_bytes

    d = EVIDENCE / "snp/virtee-sev"
    raw = bytes.fromhex("".join((d / "report_milan.hex").read_text().split()))
    vcek = (d / "vcek_milan.der").read_bytes()
    env = {"VEIL_CACHE_DIR": str(cache)}

    # Seed the cache the way the CLI does when online: one KDS request (answered by a mock).
    seeder = collateral_store(offline=False, environ=env)
    seeder.client = httpx.Client(
        transport=httpx.MockTransport(lambda _req: httpx.Response(200, content=vcek))
    )
    # The report's own identity and TCB, pinned explicitly: the default policy (issue #11) pins
    # nothing, and this 2023 report predates the shipped TCB floor.
    policy = Policy(
        measurements=[parse_snp_report(raw).measurement],
        min_tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
    )
    _good(verify_snp_artifact(raw, AuditRequest(SNP_AT, policy, seeder, product=Product.MILAN)))
    seeder.client.close()

    # From here on the KDS refuses: every VCEK comes from the cache.
    cached_store = collateral_store(offline=False, environ={**env, "VEIL_AMD_KDS_URL": "http://127.0.0.1:9"})
    request = AuditRequest(SNP_AT, policy, cached_store, product=Product.MILAN)
    certs = load_certificates(vcek)

    def cached() -> None:
        _good(verify_snp_artifact(raw, request))

    def in_memory() -> None:
        report, verdict = verify_snp_bytes(raw, certs, VerifyOptions(now=SNP_AT))
        assert report is not None
        _good(verdict + validate_snp(report, policy.snp_policy(report, None), product=Product.MILAN))

    return {"snp: cached certs (CLI path)": cached, "snp: certs in memory": in_memory}


def snp_floor() -> tuple[Callable[[], object], Callable[[], object]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from veil.attestation.snp.certs import load_certificates, pinned_ask
    from veil.attestation.snp.report import Product

    d = EVIDENCE / "snp/virtee-sev"
    raw = bytes.fromhex("".join((d / "report_milan.hex").read_text().split()))
    (vcek,) = load_certificates((d / "vcek_milan.der").read_bytes())
    key = vcek.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = encode_dss_signature(
        int.from_bytes(raw[0x2A0:0x2E8], "little"), int.from_bytes(raw[0x2E8:0x330], "little")
    )
    ask: x509.Certificate = pinned_ask(Product.MILAN)
    ask_key: Any = ask.public_key()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)

    def ecdsa_p384() -> None:
        key.verify(sig, raw[:0x2A0], ec.ECDSA(hashes.SHA384()))

    def rsa_pss_4096() -> None:
        ask_key.verify(vcek.signature, vcek.tbs_certificate_bytes, pss, hashes.SHA384())

    return ecdsa_p384, rsa_pss_4096


# ---------------------------------------------------------------------------------- TDX


def tdx_cases() -> tuple[dict[str, Callable[[], object]], Callable[[], object]]:
    import dcap_qvl

    from veil.attestation.audit.verify import (
        AuditRequest,
        collateral_store,
        verify_tdx_artifact,
    )
    from veil.attestation.options import VerifyOptions
    from veil.attestation.policy import Policy
    from veil.attestation.tdx.collateral import load_collateral
    from veil.attestation.tdx.quote import parse_tdx_quote
    from veil.attestation.tdx.validate import TdxPolicy, validate_tdx
    from veil.attestation.tdx.verify import tcb_advisories_of, tcb_status_of, verify_tdx

    d = EVIDENCE / "tdx/dcap-qvl"
    raw = (d / "tdx_quote").read_bytes()
    coll_json = (d / "tdx_quote_collateral.json").read_bytes()
    q = parse_tdx_quote(raw).td_report
    r0, r1, r2, r3 = (frozenset({r}) for r in q.rtmrs)
    policy = Policy(measurements=[q.mr_td], tdx=TdxPolicy(rtmr=(r0, r1, r2, r3)))  # pinned (issue #11)
    with tempfile.TemporaryDirectory() as tmp:
        store = collateral_store(offline=True, environ={"VEIL_CACHE_DIR": tmp})
    request = AuditRequest(TDX_AT, policy, store, collateral=[("collateral.json", coll_json)])
    quote = parse_tdx_quote(raw)
    collateral = load_collateral(coll_json)
    peer_coll = dcap_qvl.QuoteCollateralV3.from_json(coll_json.decode())
    now_s = int(TDX_AT.timestamp())

    def cli_path() -> None:
        _good(verify_tdx_artifact(raw, request))

    def parsed() -> None:
        v = verify_tdx(quote, VerifyOptions(now=TDX_AT), collateral=collateral)
        _good(
            v
            + validate_tdx(
                quote, policy.tdx_policy(None), tcb_status=tcb_status_of(v), advisory_ids=tcb_advisories_of(v)
            )
        )

    def peer() -> None:
        report = dcap_qvl.verify(raw, peer_coll, now_s)
        if str(report.status) != "UpToDate":
            raise SystemExit(f"dcap-qvl says {report.status}")

    return {"tdx: quote + collateral JSON (CLI path)": cli_path, "tdx: collateral pre-parsed": parsed}, peer


def p256_floor() -> Callable[[], object]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from veil.attestation.tdx.quote import parse_tdx_quote

    quote = parse_tdx_quote((EVIDENCE / "tdx/dcap-qvl/tdx_quote").read_bytes())
    sig_data = quote.signature_data
    ak = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sig_data.attestation_key)
    raw_sig = sig_data.signature
    sig = encode_dss_signature(int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big"))
    signed = quote.signed_region

    def ecdsa_p256() -> None:
        ak.verify(sig, signed, ec.ECDSA(hashes.SHA256()))

    return ecdsa_p256


# ---------------------------------------------------------------------------------- NVIDIA


def gpu_cases() -> tuple[dict[str, Callable[[], object]], Callable[[], object]]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from veil.attestation.nvidia.certs import chain_problem
    from veil.attestation.nvidia.report import parse_gpu_report
    from veil.attestation.nvidia.verify import load_cert_chain, verify_gpu
    from veil.attestation.options import VerifyOptions

    d = EVIDENCE / "nvidia_gpu/nvtrust/decoded"
    report = (d / "gpu0_evidence.bin").read_bytes()
    chain_pem = (d / "gpu0_certchain.pem").read_bytes()

    def one() -> None:
        _good(verify_gpu(report, load_cert_chain(chain_pem), VerifyOptions(now=GPU_AT), nonce=GPU_NONCE))

    def cold() -> None:
        load_cert_chain.cache_clear()
        chain_problem.cache_clear()
        _good(verify_gpu(report, load_cert_chain(chain_pem), VerifyOptions(now=GPU_AT), nonce=GPU_NONCE))

    parsed = parse_gpu_report(report)
    key = load_cert_chain(chain_pem)[0].public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = encode_dss_signature(
        int.from_bytes(parsed.signature[:48], "big"), int.from_bytes(parsed.signature[48:], "big")
    )

    def floor() -> None:
        key.verify(sig, parsed.signed_bytes, ec.ECDSA(hashes.SHA384()))

    return {"gpu: one H100 report": one, "gpu: same, chain parsed + verified each run": cold}, floor


# NVIDIA's own verifier (nv-local-gpu-verifier) as a peer: it pins cryptography 43, so it runs in
# its own virtual environment; the same steps per report as its cc_admin: chain (pyOpenSSL
# store), SPDM parse, signature (python-ecdsa), nonce, FWID.
NV_PEER_SCRIPT = """
import json, statistics, sys, time
from OpenSSL import crypto
from verifier.attestation import AttestationReport
from verifier.config import BaseSettings, HopperSettings
from verifier.cc_admin_utils import CcAdminUtils
report_path, chain_path, nonce_hex, runs, warmup = sys.argv[1:4] + [int(a) for a in sys.argv[4:6]]
data, pem = open(report_path, "rb").read(), open(chain_path, "rb").read()
settings = HopperSettings()
mode = BaseSettings.Certificate_Chain_Verification_Mode.GPU_ATTESTATION
blocks = [b"-----BEGIN CERTIFICATE-----" + p for p in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
def once():
    chain = [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks]
    chain_ok = CcAdminUtils.verify_certificate_chain(chain, settings, mode)[0]
    report = AttestationReport(data, settings)
    leaf = chain[0].to_cryptography()
    sig_ok = report.verify_signature(leaf, settings.signature_length, settings.HashFunction)
    nonce_ok = report.get_request_message().get_nonce().hex() == nonce_hex
    fwid = report.get_response_message().get_opaque_data().get_data("OPAQUE_FIELD_ID_FWID").hex()
    fwid_ok = CcAdminUtils.extract_fwid(chain[0], settings).lower() == fwid.lower()
    return [chain_ok, sig_ok, nonce_ok, fwid_ok]
ok = once()
for _ in range(warmup):
    once()
samples = []
for _ in range(runs):
    t0 = time.perf_counter()
    once()
    samples.append((time.perf_counter() - t0) * 1e3)
p90 = statistics.quantiles(samples, n=10)[-1]
print(json.dumps({"ok": ok, "median": statistics.median(samples), "p90": p90}))
"""


def nv_peer(python: str, runs: int, warmup: int) -> tuple[float, float] | str:
    """(median, p90) ms of NVIDIA's verifier on gpu0, or why it could not run."""
    import json
    import subprocess

    d = EVIDENCE / "nvidia_gpu/nvtrust/decoded"
    args = [
        str(d / "gpu0_evidence.bin"),
        str(d / "gpu0_certchain.pem"),
        GPU_NONCE.hex(),
        str(runs),
        str(warmup),
    ]
    try:
        done = subprocess.run(
            [python, "-c", NV_PEER_SCRIPT, *args], check=False, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run {python}: {exc}"
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return f"{python} failed: {last}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not all(result["ok"]):
        return f"NVIDIA's verifier did not accept the report: chain/sig/nonce/fwid = {result['ok']}"
    return result["median"], result["p90"]


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="timed runs per case (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed runs first (default 30)")
    parser.add_argument(
        "--nv-peer-python",
        default=os.environ.get("NV_VERIFIER_PYTHON"),
        metavar="PYTHON",
        help="interpreter of a venv with nv-local-gpu-verifier==2.7.3 (it pins cryptography 43, so "
        "not this one); default $NV_VERIFIER_PYTHON; without it the NVIDIA peer is skipped",
    )
    args = parser.parse_args(argv)
    if not EVIDENCE.is_dir():
        print(f"bench/verify.py: evidence not found at {EVIDENCE}", file=sys.stderr)
        return 2

    import cryptography
    import dcap_qvl

    print(
        f"python {sys.version.split()[0]}, cryptography {cryptography.__version__}, "
        f"dcap-qvl {getattr(dcap_qvl, '__version__', '?')}, {os.cpu_count()} CPUs, "
        f"runs {args.runs} after {args.warmup} warm-up"
    )
    results: dict[str, tuple[float, float, float]] = {}

    def time_it(name: str, fn: Callable[[], object]) -> None:
        results[name] = measure(fn, args.runs, args.warmup)

    with tempfile.TemporaryDirectory() as cache:
        for name, fn in snp_cases(Path(cache)).items():
            time_it(name, fn)
    p384, pss = snp_floor()
    time_it("floor: ECDSA P-384 verify", p384)
    time_it("floor: RSASSA-PSS-4096 verify", pss)
    tdx, dcap_peer = tdx_cases()
    for name, fn in tdx.items():
        time_it(name, fn)
    time_it("peer: dcap_qvl.verify (same quote)", dcap_peer)
    time_it("floor: ECDSA P-256 verify", p256_floor())
    gpu, _ = gpu_cases()
    for name, fn in gpu.items():
        time_it(name, fn)
    nv_note = "skipped: no --nv-peer-python (a venv with nv-local-gpu-verifier==2.7.3)"
    if args.nv_peer_python:
        peer_result = nv_peer(args.nv_peer_python, args.runs, args.warmup)
        if isinstance(peer_result, str):
            nv_note = peer_result
        else:
            results["peer: nv-local-gpu-verifier 2.7.3"] = (*peer_result, float("nan"))
            nv_note = ""

    targets = {
        "snp: cached certs (CLI path)": 5.0,
        "tdx: quote + collateral JSON (CLI path)": 30.0,
        "gpu: one H100 report": 10.0,
    }
    width = max(map(len, results))
    print(f"\n{'case'.ljust(width)}  median ms     p90 ms  cpu ms (median)  target (median)")
    for name, (median, p90, cpu) in results.items():
        target = targets.get(name)
        mark = "" if target is None else f"<= {target:g} ms {'ok' if median <= target else 'MISSED'}"
        print(f"{name.ljust(width)}  {median:9.3f}  {p90:9.3f}  {cpu:15.3f}  {mark}")

    med = {k: v[0] for k, v in results.items()}
    snp_floor_ms = med["floor: ECDSA P-384 verify"] + 3 * med["floor: RSASSA-PSS-4096 verify"]
    tdx_sigs = 9  # AK, QE report, PCK leaf + CA, TCB info, QE identity, TCB signing cert, 2 CRLs
    print("\nratios (median):")
    print(
        f"  snp cached / crypto floor (1 P-384 + 3 RSA-PSS = {snp_floor_ms:.3f} ms): "
        f"{med['snp: cached certs (CLI path)'] / snp_floor_ms:.2f}x"
    )
    print(
        f"  snp cached / certs in memory: "
        f"{med['snp: cached certs (CLI path)'] / med['snp: certs in memory']:.2f}x"
    )
    peer = med["peer: dcap_qvl.verify (same quote)"]
    print(
        f"  tdx CLI path / dcap-qvl verify: {med['tdx: quote + collateral JSON (CLI path)'] / peer:.2f}x "
        f"(Veil's figure includes one dcap-qvl run as its cross-check)"
    )
    print(f"  tdx pre-parsed / dcap-qvl verify: {med['tdx: collateral pre-parsed'] / peer:.2f}x")
    p256 = tdx_sigs * med["floor: ECDSA P-256 verify"]
    print(
        f"  tdx pre-parsed / crypto floor ({tdx_sigs} P-256 = {p256:.3f} ms): "
        f"{med['tdx: collateral pre-parsed'] / p256:.2f}x"
    )
    gpu_ratio = med["gpu: one H100 report"] / med["floor: ECDSA P-384 verify"]
    print(f"  gpu / crypto floor (1 P-384): {gpu_ratio:.2f}x")
    cold = med["gpu: same, chain parsed + verified each run"]
    if "peer: nv-local-gpu-verifier 2.7.3" in med:
        nv = med["peer: nv-local-gpu-verifier 2.7.3"]
        print(f"  nv-local-gpu-verifier / gpu (chain cached): {nv / med['gpu: one H100 report']:.1f}x slower")
        print(f"  nv-local-gpu-verifier / gpu (chain verified each run): {nv / cold:.1f}x slower")
    else:
        print(f"  NVIDIA peer: {nv_note}")
    missed = [n for n, t in targets.items() if med[n] > t]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
