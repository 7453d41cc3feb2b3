"""``veil attest show``: every field of an evidence artifact, decoded and named.

The parsers live in :mod:`veil.attestation`; this module only turns what they
parsed into a nested, JSON-ready mapping (bytes as lowercase hex) and renders it
as indented ``name: value`` lines, the way ``snpguest display report`` does.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = [
    "describe_azure_evidence",
    "describe_bundle",
    "describe_certificates",
    "describe_gpu_list",
    "describe_hcl_report",
    "describe_snp_report",
    "jsonable",
    "render",
]


def jsonable(value: Any) -> Any:
    """Bytes as hex, enums by name, dataclasses and tuples as dicts and lists."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return value.name if not isinstance(value.value, str) else value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return value


# -------------------------------------------------------------------------------- certificates


def _cert_summary(cert: x509.Certificate) -> dict[str, Any]:
    from veil.attestation.errors import MalformedInputError
    from veil.attestation.nvidia.certs import leaf_fwid
    from veil.attestation.snp.certs import parse_amd_extensions

    out: dict[str, Any] = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(_serial_number(cert), "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "signature_algorithm": cert.signature_algorithm_oid.dotted_string,
        "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    }
    try:
        amd = parse_amd_extensions(cert)
    except MalformedInputError as exc:
        out["amd_extensions"] = f"<malformed: {exc}>"
    else:
        if any(getattr(amd, f.name) is not None for f in dataclasses.fields(amd)):
            out["amd_extensions"] = jsonable(amd)
    try:
        fwid = leaf_fwid(cert)
    except MalformedInputError:
        fwid = None
    if fwid is not None:
        out["dice_fwid"] = fwid.hex()
    return out


def _serial_number(cert: x509.Certificate) -> int:
    # AMD VCEKs carry serial 0, which cryptography warns about; reading it is harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cert.serial_number


def describe_certificates(certs: Sequence[x509.Certificate]) -> list[dict[str, Any]]:
    """Subject, issuer, validity, fingerprint and vendor extensions of each certificate."""
    return [_cert_summary(c) for c in certs]


# -------------------------------------------------------------------------------- SEV-SNP


def describe_snp_report(raw: bytes) -> dict[str, Any]:
    """Every field of an SEV-SNP ATTESTATION_REPORT (ABI spec Table 23), decoded."""
    from veil.attestation.snp.report import SigningKey, parse_snp_report

    r = parse_snp_report(raw)
    try:
        signing_key: str = SigningKey(r.signing_key).name
    except ValueError:
        signing_key = f"reserved ({r.signing_key})"
    policy = {"raw": f"0x{r.policy:x}", **jsonable(r.guest_policy)}
    platform = {"raw": f"0x{r.platform_info:x}", **jsonable(r.platform)}

    def tcb(t: Any) -> dict[str, Any]:
        return {"raw": f"0x{t.raw:016x}", **t.components()}

    return {
        "format": "AMD SEV-SNP ATTESTATION_REPORT",
        "version": r.version,
        "guest_svn": r.guest_svn,
        "policy": policy,
        "family_id": r.family_id.hex(),
        "image_id": r.image_id.hex(),
        "vmpl": r.vmpl,
        "signature_algo": r.signature_algo,
        "current_tcb": tcb(r.current_tcb),
        "platform_info": platform,
        "author_key_en": r.author_key_en,
        "mask_chip_key": r.mask_chip_key,
        "signing_key": signing_key,
        "report_data": r.report_data.hex(),
        "measurement": r.measurement.hex(),
        "host_data": r.host_data.hex(),
        "id_key_digest": r.id_key_digest.hex(),
        "author_key_digest": r.author_key_digest.hex(),
        "report_id": r.report_id.hex(),
        "report_id_ma": r.report_id_ma.hex(),
        "reported_tcb": tcb(r.reported_tcb),
        "cpuid_fam_id": None if r.cpuid_fam_id is None else f"0x{r.cpuid_fam_id:02x}",
        "cpuid_mod_id": None if r.cpuid_mod_id is None else f"0x{r.cpuid_mod_id:02x}",
        "cpuid_step": None if r.cpuid_step is None else f"0x{r.cpuid_step:02x}",
        "product": r.product.value if r.product else None,
        "chip_id": r.chip_id.hex(),
        "committed_tcb": tcb(r.committed_tcb),
        "current_firmware": ".".join(map(str, r.firmware_current)),
        "committed_firmware": ".".join(map(str, r.firmware_committed)),
        "launch_tcb": tcb(r.launch_tcb),
        "launch_mit_vector": r.launch_mit_vector,
        "current_mit_vector": r.current_mit_vector,
        "signature": {
            "r_le": r.signature_r.hex(),
            "s_le": r.signature_s.hex(),
            "r": f"{int.from_bytes(r.signature_r, 'little'):096x}",
            "s": f"{int.from_bytes(r.signature_s, 'little'):096x}",
        },
    }


# -------------------------------------------------------------------------------- Azure


def describe_hcl_report(raw: bytes) -> dict[str, Any]:
    """An Azure HCL report: header, IGVM request data, variable data and the hardware report."""
    from veil.attestation.errors import MalformedInputError
    from veil.attestation.snp.azure import REPORT_TYPE_SNP, parse_hcl_report, parse_runtime_data

    hcl = parse_hcl_report(raw)
    var: Any
    try:
        var = json.loads(hcl.variable_data)
    except (UnicodeDecodeError, ValueError):
        var = hcl.variable_data.hex()
    runtime: dict[str, Any]
    try:
        rd = parse_runtime_data(hcl.variable_data)
        runtime = {
            "attestation_key": f"HCLAkPub RSA-{rd.attestation_key.key_size}",
            "attestation_key_modulus_sha256": hashlib.sha256(
                rd.attestation_key.public_numbers().n.to_bytes(rd.attestation_key.key_size // 8, "big")
            ).hexdigest(),
            "user_data": rd.user_data.hex() if rd.user_data is not None else None,
            "vm_configuration": rd.vm_configuration,
        }
    except MalformedInputError as exc:
        runtime = {"error": str(exc)}
    hw: dict[str, Any]
    if hcl.report_type == REPORT_TYPE_SNP:
        try:
            hw = describe_snp_report(hcl.snp_report_bytes)
        except MalformedInputError as exc:
            hw = {"error": str(exc)}
    else:
        hw = {"format": "TDX TDREPORT (MAC-protected; not publicly verifiable)", "raw": hcl.hw_report.hex()}
    return {
        "format": "Azure CVM HCL report",
        "header": {
            "signature": "HCLA",
            "version": hcl.version,
            "report_size": hcl.report_size,
            "request_type": hcl.request_type,
            "status": hcl.status,
        },
        "igvm_request_data": {
            "version": hcl.igvm_version,
            "report_type": {2: "SEV-SNP", 4: "TDX"}.get(hcl.report_type, str(hcl.report_type)),
            "report_data_hash_type": {1: "SHA-256", 2: "SHA-384", 3: "SHA-512"}[hcl.report_data_hash_type],
            "variable_data_size": len(hcl.variable_data),
            "variable_data_digest": hcl.variable_data_digest().hex(),
        },
        "variable_data": var,
        "runtime_data": runtime,
        "hardware_report": hw,
    }


def describe_azure_evidence(data: bytes) -> dict[str, Any]:
    """Azure SNP vTPM evidence JSON: HCL report, the decoded TPM2_Quote, PCRs and the VCEK."""
    from veil.attestation.errors import MalformedInputError
    from veil.attestation.snp.azure import parse_azure_evidence_json, parse_tpms_attest

    ev = parse_azure_evidence_json(data)
    quote: Any
    try:
        quote = jsonable(parse_tpms_attest(ev.quote.message))
    except MalformedInputError as exc:
        quote = {"error": str(exc)}
    return {
        "format": "Azure SEV-SNP vTPM evidence (JSON)",
        "hcl_report": describe_hcl_report(ev.hcl_report),
        "tpm_quote": {
            "attest": quote,
            "signature": ev.quote.signature.hex(),
            "pcrs": {str(i): p.hex() for i, p in enumerate(ev.quote.pcrs)},
        },
        "certificates": describe_certificates(ev.certs),
    }


# -------------------------------------------------------------------------------- NVIDIA


def describe_gpu_list(
    entries: Sequence[tuple[str, bytes, Sequence[x509.Certificate], bytes | None]],
) -> dict[str, Any]:
    """GPU / NVSwitch reports: (arch or kind, SPDM report, chain, the list's stated nonce)."""
    from veil.attestation.errors import MalformedInputError
    from veil.attestation.nvidia.report import describe_gpu_report, parse_gpu_report

    devices: list[dict[str, Any]] = []
    for arch, report, chain, stated_nonce in entries:
        entry: dict[str, Any] = {"arch": arch}
        if stated_nonce is not None:
            entry["stated_nonce"] = stated_nonce.hex()
        try:
            entry["report"] = describe_gpu_report(parse_gpu_report(report))
        except MalformedInputError as exc:
            entry["report"] = {"error": str(exc)}
        entry["certificates"] = describe_certificates(chain)
        devices.append(entry)
    return {"format": "NVIDIA SPDM 1.1 GET_MEASUREMENTS evidence", "devices": devices}


# -------------------------------------------------------------------------------- Veil bundle


def describe_bundle(data: bytes) -> dict[str, Any]:
    """A Veil ``Evidence`` bundle: platform, nonce, claims, key, CPU report, chain, GPUs."""
    from veil.attestation.binding import Claims
    from veil.attestation.bundle import parse_evidence
    from veil.attestation.channel.hpke import PublicKey
    from veil.attestation.errors import MalformedInputError
    from veil.attestation.snp.certs import load_certificates
    from veil.attestation.tdx.quote import describe_tdx_quote, parse_tdx_quote
    from veil.proto.v1 import evidence_pb2

    msg = parse_evidence(data)
    platform = (
        evidence_pb2.Platform.Name(msg.platform)
        if msg.platform in evidence_pb2.Platform.values()
        else str(msg.platform)
    )
    out: dict[str, Any] = {
        "format": "Veil Evidence bundle",
        "format_version": msg.format_version,
        "platform": platform,
        "simulated": msg.simulated,
        "nonce": bytes(msg.nonce).hex(),
    }
    try:
        out["claims"] = Claims.from_bytes(bytes(msg.claims)).to_json_obj()
    except MalformedInputError as exc:
        out["claims"] = {"error": str(exc), "raw": bytes(msg.claims).decode("utf-8", "replace")}
    out["claims_sha256"] = hashlib.sha256(bytes(msg.claims)).hexdigest()
    try:
        key = PublicKey.from_proto(msg.enclave_key)
        out["enclave_key"] = {
            "suite": key.suite.name,
            "key_id": key.key_id.hex(),
            "size": len(key.to_bytes()),
            "sha256": hashlib.sha256(key.to_bytes()).hexdigest(),
        }
    except MalformedInputError as exc:
        out["enclave_key"] = {"error": str(exc)}
    cpu = bytes(msg.cpu_report)
    try:
        if platform.endswith("TDX"):
            out["cpu_report"] = describe_tdx_quote(parse_tdx_quote(cpu))
        elif platform == "PLATFORM_AZURE_SEV_SNP":
            out["cpu_report"] = describe_hcl_report(bytes(msg.azure.hcl_report) or cpu)
        else:
            out["cpu_report"] = describe_snp_report(cpu)
    except MalformedInputError as exc:
        out["cpu_report"] = {"error": str(exc), "size": len(cpu)}
    try:
        certs = load_certificates(bytes(msg.cpu_cert_chain)) if msg.cpu_cert_chain else []
        out["cpu_cert_chain"] = describe_certificates(certs)
    except MalformedInputError as exc:
        out["cpu_cert_chain"] = {"error": str(exc)}
    gpus = []
    for g in msg.gpus:
        kind = evidence_pb2.GpuEvidence.Kind.Name(g.kind) if g.kind in (0, 1, 2) else str(g.kind)
        gpus.append(
            (
                f"{g.arch or '?'} ({kind}, index {g.index})",
                bytes(g.report),
                _gpu_chain(bytes(g.cert_chain)),
                None,
            )
        )
    out["gpus"] = describe_gpu_list(gpus)["devices"]
    return out


def _gpu_chain(pem: bytes) -> list[x509.Certificate]:
    from veil.attestation.errors import MalformedInputError
    from veil.attestation.nvidia.certs import load_cert_chain

    if not pem:
        return []
    try:
        return list(load_cert_chain(pem))
    except MalformedInputError:
        return []


# -------------------------------------------------------------------------------- text output


def render(value: Any, indent: int = 0) -> list[str]:
    """Indented ``name: value`` lines of a nested mapping (lists numbered ``[i]``)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines += render(item, indent + 1)
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}[{i}]")
                lines += render(item, indent + 1)
            else:
                lines.append(f"{pad}[{i}] {_scalar(item)}")
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return lines


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return "(none)"
    return str(value)
