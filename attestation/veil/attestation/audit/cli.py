"""``veil attest``: the auditor's tool — fetch evidence, show every field, verify offline.

* ``veil attest fetch TARGET -o FILE [--nonce HEX]`` — ``GetEvidence`` from a live
  Veil server with a fresh 32-byte nonce; writes the serialized ``Evidence``.
* ``veil attest show FILE [--kind K] [--json]`` — every field, decoded and named.
* ``veil attest verify FILE [...]`` — a table of every check (pass / fail / skip and
  why); exit 0 when the verdict is good, 1 when not, 2 when the input cannot be used.

Kinds: ``bundle`` (Veil Evidence), ``snp`` (ATTESTATION_REPORT, raw or hex text),
``azure-snp`` (Azure CVM evidence JSON, or a raw HCL report for ``show``), ``tdx``
(quote v4/v5, raw or hex with or without ``0x``), ``nvidia-gpu`` (an SPDM report with
``--certs``, or NVIDIA's evidence-list JSON). The kind is detected from the bytes
unless ``--kind`` says otherwise. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "POLICY_HELP",
    "Artifact",
    "add_arguments",
    "describe",
    "detect_artifact",
    "parse_hex",
    "parse_time",
    "run",
]

KINDS = ("bundle", "snp", "azure-snp", "tdx", "nvidia-gpu")
_MAX_INPUT = 16 * 1024 * 1024
_HEX = frozenset(string.hexdigits.encode())
_SNP_REPORT_SIZE = 0x4A0


POLICY_HELP = """\
policy file (TOML; every key optional; absent = production-strict defaults):
  allow_debug = false                 # SNP DEBUG / TD DEBUG attribute (never in production)
  min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }   # SNP (fmc on Turin)
  measurements = ["<96 hex>"]         # SNP launch measurement / TDX MRTD allow-list
  platforms, gpu_count, model_digests, data_policy_digest   # Veil bundles (see veil.attestation.policy)
  [snp]   vmpls, require_smt_disabled, tcb_rule = "reported|committed|current",
          permit_provisional_firmware, minimum_firmware, host_data, id_key_digests, ...
  [tdx]   rtmr0..rtmr3 = ["<96 hex>"], mrseam = [...],
          allowed_tcb_statuses = ["UpToDate"], allow_missing_tcb_status = false,
          rejected_advisories = ["INTEL-SA-..."]
  [gpu]   driver_versions = ["590.12"], vbios_versions = [...], require_rims = false
  [roots] amd = ["ark.pem"], nvidia = ["root.pem"], simulation = "sim-root.pem"
Empty allow-lists show as "skip: no allow-list"."""


class _UsageError(Exception):
    """Exit status 2 with this one-line message."""


# ---------------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="attest_command", required=True, metavar="ACTION")

    fetch = sub.add_parser(
        "fetch",
        help="fetch evidence from a live Veil server",
        description="Call GetEvidence on TARGET (host:port, grpc:// or grpcs://) and save the Evidence.",
    )
    fetch.add_argument("target", metavar="TARGET", help="the server, e.g. 127.0.0.1:50051")
    fetch.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="where to write it")
    fetch.add_argument(
        "--nonce", metavar="HEX", help="32-byte nonce to send (default: 32 fresh random bytes)"
    )
    fetch.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")

    show = sub.add_parser(
        "show",
        help="print every field of an evidence file, decoded and named",
        description="Print every field of a Veil evidence bundle or a raw vendor artifact.",
    )
    show.add_argument("file", type=Path, metavar="FILE")
    show.add_argument("--kind", choices=KINDS, help="what FILE holds (default: detected)")
    show.add_argument("--json", action="store_true", help="print JSON")

    verify = sub.add_parser(
        "verify",
        help="verify evidence offline against a policy",
        description=(
            "Verify FILE and print every check. Exit status: 0 good, 1 bad, 2 unusable input. "
            "--nonce: for a bundle the 32-byte GetEvidence nonce, for GPU evidence the SPDM nonce, "
            "for Azure the vTPM quote nonce, for SNP/TDX the expected REPORT_DATA (like --report-data). "
            "--report-data: SNP/TDX REPORT_DATA (zero-padded to 64 bytes); Azure: the HCL user-data."
        ),
        epilog=POLICY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--kind", choices=KINDS, help="what FILE holds (default: detected)")
    verify.add_argument(
        "--certs",
        type=Path,
        metavar="FILE",
        help="PEM bundle, leaf first (VCEK/VLEK or GPU leaf, then intermediates, root), or one DER cert",
    )
    verify.add_argument(
        "--collateral",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="TDX: dcap-qvl collateral JSON; NVIDIA: a RIM swidtag (repeatable)",
    )
    data = verify.add_mutually_exclusive_group()
    data.add_argument("--nonce", metavar="HEX", help="the nonce the evidence must carry")
    data.add_argument("--report-data", metavar="HEX", help="the REPORT_DATA the evidence must carry")
    verify.add_argument(
        "--policy", type=Path, metavar="FILE", help="policy TOML (default: production-strict)"
    )
    verify.add_argument("--at", metavar="ISO-8601", help="verify as of this time (default: now, UTC)")
    verify.add_argument(
        "--offline",
        action="store_true",
        help="use only the files given: no network, no collateral cache (default: missing collateral "
        "comes from the cache in $VEIL_CACHE_DIR or ~/.cache/veil, else from AMD KDS / Intel PCS / NVIDIA)",
    )
    verify.add_argument("--product", choices=["Milan", "Genoa", "Turin"], help="SEV-SNP product (v2 reports)")
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")


def run(args: argparse.Namespace) -> int:
    command = {"fetch": _fetch, "show": _show, "verify": _verify}[args.attest_command]
    try:
        return command(args)
    except _UsageError as exc:
        print(f"veil attest {args.attest_command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # ``veil attest show FILE | head``: the reader left; silence the rest of the output.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0 if args.attest_command == "show" else 1


# ---------------------------------------------------------------------------------- input


@dataclass(frozen=True, slots=True)
class Artifact:
    """An input file: its kind, its bytes (hex text already decoded) and its form."""

    kind: str
    data: bytes
    form: str  # "binary", "hex", "json", "hcl"
    detected: bool


def parse_hex(text: str, what: str) -> bytes:
    """Hex with optional ``0x`` and white space; raises the CLI's usage error."""
    cleaned = "".join(text.split()).removeprefix("0x").removeprefix("0X")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise _UsageError(f"{what} is not hex: {text[:40]!r}") from None


def parse_time(text: str | None) -> datetime:
    """``--at``: ISO-8601 (``2024-01-01``, ``2024-01-01T12:00:00Z``, …); naive means UTC."""
    if text is None:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _UsageError(f"--at {text!r} is not an ISO-8601 date or time") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _read(path: Path, what: str = "") -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_INPUT + 1)
    except OSError as exc:
        raise _UsageError(f"cannot read {what}{path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > _MAX_INPUT:
        raise _UsageError(f"{what}{path} is larger than {_MAX_INPUT >> 20} MiB")
    return data


def _unhex(data: bytes) -> bytes | None:
    cleaned = b"".join(data.split())
    if cleaned[:2] in (b"0x", b"0X"):
        cleaned = cleaned[2:]
    if not cleaned or len(cleaned) % 2 or not set(cleaned) <= _HEX:
        return None
    return bytes.fromhex(cleaned.decode("ascii"))


def _json_kind(data: bytes) -> str | None:
    head = data.lstrip()[:1]
    if head not in (b"{", b"["):
        return None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if (
        isinstance(doc, dict)
        and ("tpm_quote" in doc or "quote" in doc)
        and ("hcl_report" in doc or "report" in doc)
    ):
        return "azure-snp"
    if isinstance(doc, list) and doc and all(isinstance(e, dict) and "evidence" in e for e in doc):
        return "nvidia-gpu"
    return None


def _binary_kind(data: bytes) -> tuple[str, str] | None:
    if data[:4] == b"HCLA":
        return "azure-snp", "hcl"
    if len(data) >= 48:
        version = int.from_bytes(data[0:2], "little")
        key_type = int.from_bytes(data[2:4], "little")
        tee = int.from_bytes(data[4:8], "little")
        if version in (4, 5) and key_type == 2 and tee == 0x81:
            return "tdx", "binary"
    if len(data) == _SNP_REPORT_SIZE and int.from_bytes(data[0:4], "little") in (2, 3, 4, 5):
        return "snp", "binary"
    if len(data) > 37 and data[0] in (0x10, 0x11, 0x12) and data[1] == 0xE0:
        return "nvidia-gpu", "binary"
    if _looks_like_bundle(data):
        return "bundle", "binary"
    return None


def _looks_like_bundle(data: bytes) -> bool:
    from veil.attestation.bundle import parse_evidence
    from veil.attestation.errors import MalformedInputError

    try:
        msg = parse_evidence(data)
    except MalformedInputError:
        return False
    return msg.format_version > 0 and msg.platform != 0 and len(msg.cpu_report) > 0


def detect_artifact(data: bytes, kind: str | None = None) -> Artifact:
    """Decode hex text and tell what ``data`` is; ``kind`` forces the kind."""
    json_kind = _json_kind(data)
    if json_kind is not None and kind in (None, json_kind):
        return Artifact(json_kind, data, "json", kind is None)
    form = "binary"
    decoded = _unhex(data)
    if decoded is not None:
        data, form = decoded, "hex"
    found = _binary_kind(data)
    if kind is not None:
        sub = "hcl" if kind == "azure-snp" and found == ("azure-snp", "hcl") else form
        return Artifact(kind, data, sub, False)
    if found is None:
        raise _UsageError(
            "cannot tell what this file holds (not a Veil bundle, SNP report, Azure evidence, "
            "TDX quote or NVIDIA report); give --kind if it is one of those"
        )
    return Artifact(found[0], data, found[1] if found[1] == "hcl" else form, True)


def _load(path: Path, kind: str | None) -> Artifact:
    data = _read(path)
    if not data.strip():
        raise _UsageError(f"{path} is empty")
    try:
        return detect_artifact(data, kind)
    except _UsageError as exc:
        raise _UsageError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------- fetch


def _fetch(args: argparse.Namespace) -> int:
    import os

    from veil.attestation.bundle import parse_evidence
    from veil.attestation.errors import MalformedInputError
    from veil.client import GrpcTransport
    from veil.client.errors import VeilClientError

    nonce = parse_hex(args.nonce, "--nonce") if args.nonce is not None else os.urandom(32)
    if len(nonce) != 32:
        raise _UsageError(f"--nonce must be 32 bytes, got {len(nonce)}")
    try:
        transport = GrpcTransport(args.target)
        try:
            data = transport.get_evidence(nonce, args.timeout)
        finally:
            transport.close()
    except VeilClientError as exc:
        raise _UsageError(f"GetEvidence from {args.target} failed: {exc}") from None
    try:
        msg = parse_evidence(data)
    except MalformedInputError as exc:
        raise _UsageError(f"{args.target} answered with something that is not Evidence: {exc}") from None
    try:
        args.output.write_bytes(data)
    except OSError as exc:
        raise _UsageError(f"cannot write {args.output}: {exc.strerror or type(exc).__name__}") from None
    from veil.proto.v1 import evidence_pb2

    platform = (
        evidence_pb2.Platform.Name(msg.platform) if msg.platform in evidence_pb2.Platform.values() else "?"
    )
    print(f"nonce: {nonce.hex()}")
    print(f"wrote {len(data)} bytes ({platform}, {len(msg.gpus)} GPU report(s)) to {args.output}")
    if bytes(msg.nonce) != nonce:
        print("warning: the evidence does not echo this nonce", file=sys.stderr)
    print(f"verify with: veil attest verify {args.output} --nonce {nonce.hex()}")
    return 0


# ---------------------------------------------------------------------------------- show


def describe(artifact: Artifact) -> dict[str, Any]:
    """Every field of ``artifact``, JSON-ready; raises ``VeilAttestationError`` when it does not parse."""
    from veil.attestation.audit import show

    data = artifact.data
    if artifact.kind == "snp":
        return show.describe_snp_report(data)
    if artifact.kind == "azure-snp":
        return (
            show.describe_azure_evidence(data) if artifact.form == "json" else show.describe_hcl_report(data)
        )
    if artifact.kind == "tdx":
        from veil.attestation.tdx.quote import describe_tdx_quote, parse_tdx_quote

        return describe_tdx_quote(parse_tdx_quote(data))
    if artifact.kind == "nvidia-gpu":
        if artifact.form == "json":
            from veil.attestation.nvidia.verify import load_nvtrust_evidence

            entries = [(e.arch, e.report, e.cert_chain, e.nonce) for e in load_nvtrust_evidence(data)]
            return show.describe_gpu_list(entries)
        from veil.attestation.nvidia.report import describe_gpu_report, parse_gpu_report

        return {
            "format": "NVIDIA SPDM 1.1 GET_MEASUREMENTS report",
            **describe_gpu_report(parse_gpu_report(data)),
        }
    return show.describe_bundle(data)


def _show(args: argparse.Namespace) -> int:
    from veil.attestation.audit import show as attest_show
    from veil.attestation.errors import VeilAttestationError

    artifact = _load(args.file, args.kind)
    try:
        fields = describe(artifact)
    except VeilAttestationError as exc:
        raise _UsageError(f"{args.file}: not a valid {artifact.kind} artifact: {exc}") from None
    if args.json:
        print(json.dumps({"kind": artifact.kind, "form": artifact.form, **fields}, indent=2))
    else:
        print(f"file: {args.file}")
        print(f"kind: {artifact.kind} ({artifact.form}{', detected' if artifact.detected else ''})")
        print("\n".join(attest_show.render(fields)))
    return 0


# ---------------------------------------------------------------------------------- verify


def _gpu_devices(artifact: Artifact, certs_bytes: bytes | None) -> list[Any]:
    from veil.attestation.audit.verify import GpuDevice
    from veil.attestation.nvidia.verify import load_cert_chain, load_nvtrust_evidence

    if artifact.form == "json":
        if certs_bytes is not None:
            raise _UsageError("the evidence list carries each device's chain: drop --certs")
        return [
            GpuDevice(e.report, e.cert_chain, e.kind, e.arch) for e in load_nvtrust_evidence(artifact.data)
        ]
    if certs_bytes is None:
        raise _UsageError("a raw GPU report needs --certs FILE (the device chain, leaf first)")
    return [GpuDevice(artifact.data, load_cert_chain(certs_bytes), "gpu", "raw")]


def _verdict(artifact: Artifact, args: argparse.Namespace, now: datetime) -> Any:
    from veil.attestation.audit import verify as av
    from veil.attestation.snp.certs import load_certificates
    from veil.attestation.snp.report import Product

    policy = av.load_audit_policy(args.policy) if args.policy else av.default_audit_policy()
    nonce = parse_hex(args.nonce, "--nonce") if args.nonce is not None else None
    report_data = parse_hex(args.report_data, "--report-data") if args.report_data is not None else None
    certs_bytes = _read(args.certs, "--certs ") if args.certs is not None else None
    collateral = [(str(p), _read(p, "--collateral ")) for p in args.collateral]
    req = av.AuditRequest(
        now=now,
        policy=policy,
        store=av.collateral_store(offline=args.offline),
        nonce=nonce,
        report_data=report_data,
        collateral=collateral,
        product=Product.from_name(args.product) if args.product else None,
    )
    kind = artifact.kind
    if kind in ("snp", "azure-snp") and certs_bytes is not None:
        req.certs = load_certificates(certs_bytes)
    if kind in ("snp", "azure-snp", "bundle") and collateral:
        raise _UsageError(f"--collateral does not apply to {kind} evidence")
    if kind == "snp":
        return av.verify_snp_artifact(artifact.data, req)
    if kind == "azure-snp":
        if artifact.form != "json":
            raise _UsageError("Azure verification needs the evidence JSON (HCL report + vTPM quote + VCEK)")
        from veil.attestation.snp.azure import parse_azure_evidence_json

        return av.verify_azure_artifact(parse_azure_evidence_json(artifact.data), req)
    if kind == "tdx":
        if certs_bytes is not None:
            raise _UsageError("--certs does not apply to TDX: the quote carries its PCK chain")
        return av.verify_tdx_artifact(artifact.data, req)
    if kind == "nvidia-gpu":
        return av.verify_gpu_artifact(_gpu_devices(artifact, certs_bytes), req)
    if certs_bytes is not None:
        raise _UsageError("a Veil evidence bundle carries its certificates: drop --certs")
    return av.verify_bundle_artifact(artifact.data, req)


def _verify(args: argparse.Namespace) -> int:
    from veil.attestation.audit.verify import AuditUsageError
    from veil.attestation.errors import VeilAttestationError

    artifact = _load(args.file, args.kind)
    now = parse_time(args.at)
    try:
        verdict = _verdict(artifact, args, now)
    except AuditUsageError as exc:
        raise _UsageError(str(exc)) from None
    except VeilAttestationError as exc:
        raise _UsageError(f"{type(exc).__name__}: {exc}") from None
    at = now.isoformat()
    source = str(args.policy) if args.policy else "default (production-strict)"
    if args.json:
        doc = {
            **verdict.to_json(),
            "kind": artifact.kind,
            "file": str(args.file),
            "at": at,
            "policy": source,
            "offline": bool(args.offline),
            "failed": [c.name for c in verdict.failed],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"file:   {args.file}")
        print(f"kind:   {artifact.kind} ({artifact.form}{', detected' if artifact.detected else ''})")
        print(f"at:     {at}{' (offline)' if args.offline else ''}")
        print(f"policy: {source}")
        print(verdict.table())
    return 0 if verdict.ok else 1
