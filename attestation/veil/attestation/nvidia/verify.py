"""NVIDIA GPU / NVSwitch **verify**: the SPDM report's signature, certificate chain, FWID, RIMs.

The *verify* half (signatures, chains, collateral) of NVIDIA attestation, in the manner of
NVIDIA's local GPU verifier but stricter. :func:`verify_gpu` also runs the field checks of
:mod:`veil.attestation.nvidia.validate` (nonce, versions, measurements against the RIMs), so
one call appraises a report end to end:

* ``{p}.signature`` — ECDSA P-384 / SHA-384 over request ‖ response-without-signature, with
  the public key of the chain's leaf certificate (the device's alias key).
* ``{p}.chain`` — every certificate is issued (name and signature) by the next, issuers are
  CAs allowed to sign certificates, and the chain ends at the trusted root: the NVIDIA Device
  Identity CA pinned in this package unless the options trust others (the simulation root).
* ``{p}.chain.validity`` — every certificate, root included, is valid at the options' ``now``.
* ``{p}.chain.leaf`` — the leaf is an end-entity signing key (not a CA), EC P-384.
* ``{p}.fwid`` — the FWID in the leaf's DICE TcbInfo extension (2.23.133.5.4.1) equals the
  FWID the firmware put in the opaque data (NVSwitch reports carry none: skipped).
* ``{p}.nonce``, ``{p}.driver_version`` / ``{p}.vbios_version`` — see :mod:`.validate`.
* ``{p}.rim.driver`` / ``{p}.rim.vbios`` — the RIM for the reported version verifies
  (:func:`~veil.attestation.nvidia.rim.verify_rim`); ``{p}.measurements`` — see :mod:`.validate`.
* ``{p}.ocsp`` — the device chain's revocation status through the options' ``ocsp_post``
  (online, or stapled responses served by :func:`~veil.attestation.nvidia.ocsp.stapled_ocsp`);
  without one it fails under the default :class:`GpuPolicy` (``require_ocsp``), else is skipped.
  The RIM signing chains get ``{p}.rim.driver.ocsp`` / ``{p}.rim.vbios.ocsp`` inside the
  ``{p}.rim.*`` checks the same way. A missing RIM fails (``require_rims``) and is named.

Parsed certificates and chain results are cached, so verifying a report whose chain has been
seen before costs one ECDSA verification.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from veil.attestation.errors import MalformedInputError, UnsupportedError
from veil.attestation.nvidia.certs import (
    NVIDIA_DEVICE_ROOT_SHA256,
    TCB_INFO_OID,
    cert_name,
    chain_problem,
    encode_tcb_info_fwid,
    leaf_fwid,
    leaf_problem,
    load_cert_chain,
    nvidia_device_root,
    validity_problem,
)
from veil.attestation.nvidia.ocsp import check_ocsp
from veil.attestation.nvidia.report import (
    SIGNATURE_SIZE,
    GpuKind,
    GpuReport,
    OpaqueFieldType,
    Signer,
    parse_gpu_report,
)
from veil.attestation.nvidia.rim import (
    Rim,
    RimKind,
    RimSet,
    driver_rim_id,
    switch_bios_rim_id,
    vbios_rim_id,
    verify_rim,
)
from veil.attestation.nvidia.validate import (
    GpuPolicy,
    validate_measurements,
    validate_nonce,
    validate_versions,
)
from veil.attestation.options import VerifyOptions
from veil.attestation.verdict import Verdict, VerdictBuilder

__all__ = [
    "NVIDIA_DEVICE_ROOT_SHA256",
    "TCB_INFO_OID",
    "GpuKind",
    "GpuPolicy",
    "NvtrustEvidence",
    "encode_tcb_info_fwid",
    "gpu_rim_ids",
    "leaf_fwid",
    "load_cert_chain",
    "load_nvtrust_evidence",
    "nvidia_device_root",
    "p384_signer",
    "verify_gpu",
    "verify_gpu_cert_chain",
    "verify_gpus",
]

# --------------------------------------------------------------------------------------------
# signing (simulation) and the report signature


def p384_signer(private_key: ec.EllipticCurvePrivateKey) -> Signer:
    """A :data:`Signer` producing the raw 96-byte ``r ‖ s`` ECDSA P-384 / SHA-384 signature."""
    if private_key.curve.name != "secp384r1":
        raise MalformedInputError("the GPU report signing key must be P-384")

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(private_key.sign(data, ec.ECDSA(hashes.SHA384())))
        return r.to_bytes(48, "big") + s.to_bytes(48, "big")

    return sign


def _signature_ok(report: GpuReport, leaf: x509.Certificate) -> tuple[bool, str]:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return False, "leaf key is not EC P-384"
    if len(report.signature) != SIGNATURE_SIZE:
        return False, "signature is not 96 bytes"
    r = int.from_bytes(report.signature[:48], "big")
    s = int.from_bytes(report.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False, f"ECDSA P-384 signature does not verify with {cert_name(leaf)}"
    return True, f"ECDSA P-384/SHA-384 by {cert_name(leaf)} over {len(report.signed_bytes)} bytes"


# --------------------------------------------------------------------------------------------
# public verification


def verify_gpu_cert_chain(
    cert_chain: Sequence[x509.Certificate],
    options: VerifyOptions,
    *,
    kind: GpuKind = "gpu",
    prefix: str | None = None,
) -> Verdict:
    """Checks ``{p}.chain``, ``{p}.chain.validity``, ``{p}.chain.leaf`` and ``{p}.fwid``
    (present in the leaf) for a certificate chain alone, leaf first (e.g. Trustee's chain cases).
    """
    p = prefix or kind
    chain = tuple(cert_chain)
    root = options.anchor_for(chain, nvidia_device_root)
    v = VerdictBuilder()
    _chain_checks(v, p, chain, root, options.now)
    if chain:
        _fwid_present(v, p, chain[0], kind)
    return v.build()


def _chain_checks(
    v: VerdictBuilder, p: str, chain: tuple[x509.Certificate, ...], root: x509.Certificate, now: datetime
) -> None:
    problem = chain_problem(chain, root)
    if problem is None:
        v.passed(f"{p}.chain", f"{len(chain)} certificates to {cert_name(root)}")
    else:
        v.fail(f"{p}.chain", problem)
    certs = chain if chain and chain[-1] == root else (*chain, root)
    validity = validity_problem(certs, now)
    if validity is None:
        v.passed(f"{p}.chain.validity", f"all valid at {now.isoformat()}")
    else:
        v.fail(f"{p}.chain.validity", validity)
    if not chain:
        v.fail(f"{p}.chain.leaf", "no certificates")
    elif (problem := leaf_problem(chain[0])) is None:
        v.passed(f"{p}.chain.leaf", cert_name(chain[0]))
    else:
        v.fail(f"{p}.chain.leaf", problem)


def _fwid_present(v: VerdictBuilder, p: str, leaf: x509.Certificate, kind: GpuKind) -> bytes | None:
    try:
        fwid = leaf_fwid(leaf)
    except MalformedInputError as exc:
        v.fail(f"{p}.fwid", f"TcbInfo extension malformed: {exc}")
        return None
    if fwid is None:
        if kind == "gpu":
            v.fail(
                f"{p}.fwid",
                f"FWID (OID {TCB_INFO_OID.dotted_string}) not found in the leaf {cert_name(leaf)}",
            )
        else:
            v.skip(f"{p}.fwid", "NVSwitch leaf carries no FWID")
        return None
    v.passed(f"{p}.fwid", f"leaf FWID {fwid.hex()}")
    return fwid


def verify_gpu(
    report: GpuReport | bytes,
    cert_chain: Sequence[x509.Certificate],
    options: VerifyOptions,
    *,
    nonce: bytes | None,
    kind: GpuKind = "gpu",
    rims: RimSet | None = None,
    policy: GpuPolicy | None = None,
    prefix: str | None = None,
    rim_roots: Sequence[x509.Certificate] = (),
) -> Verdict:
    """Verify one GPU or NVSwitch report against its certificate chain (leaf first).

    ``options.trusted_roots`` default to the pinned NVIDIA Device Identity CA; the simulated
    provider trusts its simulation root. ``nonce`` is the 32-byte nonce the report must carry
    (None: the check is skipped, which a policy must not accept). ``options.now`` is the
    verification time. ``rims`` (driver / VBIOS reference manifests) enable measurement
    comparison (each RIM is verified against the pinned NVIDIA CoRIM signing Root CA, or
    ``rim_roots`` when given); ``options.ocsp_post`` (online, or a poster serving stapled
    responses) enables the revocation checks of the device chain and the RIM chains.
    ``policy`` defaults to the strict :class:`GpuPolicy`: without RIMs or OCSP the report
    fails. Every check is named
    ``{prefix}.…`` (default: kind). Raises only :class:`MalformedInputError` for unusable
    arguments; evidence problems are failed checks.
    """
    now = options.now
    p = prefix or kind
    policy = policy or GpuPolicy()
    v = VerdictBuilder()
    if not isinstance(report, GpuReport):
        try:
            report = parse_gpu_report(report)
        except MalformedInputError as exc:
            v.fail(f"{p}.report.parse", str(exc))
            return v.build()
    v.passed(
        f"{p}.report.parse",
        f"SPDM 1.1 MEASUREMENTS, {len(report.response.blocks)} blocks"
        + (f", {len(report.trailing)} trailing zero bytes ignored" if report.trailing else ""),
    )
    chain = tuple(cert_chain)
    root = options.anchor_for(chain, nvidia_device_root)

    if chain:
        ok, detail = _signature_ok(report, chain[0])
        v.check(f"{p}.signature", ok, detail)
    else:
        v.fail(f"{p}.signature", "no leaf certificate to verify with")
    _chain_checks(v, p, chain, root, now)
    _fwid_check(v, p, report, chain, kind)
    validate_nonce(v, p, report, nonce)
    validate_versions(v, p, report, kind, policy)
    # RIMs chain to the pinned CoRIM root (or the caller's rim_roots), not to the device roots.
    _rim_checks(
        v,
        p=p,
        report=report,
        kind=kind,
        rims=rims,
        policy=policy,
        options=replace(options, trusted_roots=tuple(rim_roots)),
    )
    if options.ocsp_post is None:
        if policy.require_ocsp:
            v.fail(f"{p}.ocsp", "no OCSP response for the device chain (none stapled, not online)")
        else:
            v.skip(f"{p}.ocsp", "offline: revocation not checked (policy does not require OCSP)")
    else:
        v.extend(check_ocsp(chain, replace(options, trusted_roots=(root,)), prefix=p).checks)
    return v.build()


def _fwid_check(
    v: VerdictBuilder, p: str, report: GpuReport, chain: tuple[x509.Certificate, ...], kind: GpuKind
) -> None:
    reported = report.opaque.fwid
    if not chain:
        v.fail(f"{p}.fwid", "no leaf certificate")
        return
    if reported is None and kind == "nvswitch":
        v.skip(f"{p}.fwid", "NVSwitch reports carry no FWID in their opaque data")
        return
    if reported is None:
        v.fail(f"{p}.fwid", "report opaque data carries no FWID")
        return
    try:
        in_leaf = leaf_fwid(chain[0])
    except MalformedInputError as exc:
        v.fail(f"{p}.fwid", f"TcbInfo extension malformed: {exc}")
        return
    if in_leaf is None:
        v.fail(
            f"{p}.fwid",
            f"FWID (OID {TCB_INFO_OID.dotted_string}) not found in the leaf {cert_name(chain[0])}",
        )
    elif hmac.compare_digest(in_leaf, reported):
        v.passed(f"{p}.fwid", f"leaf FWID = reported FWID {reported.hex()}")
    else:
        v.fail(f"{p}.fwid", f"leaf FWID {in_leaf.hex()} != reported {reported.hex()}")


def _rim_checks(
    v: VerdictBuilder,
    *,
    p: str,
    report: GpuReport,
    kind: GpuKind,
    rims: RimSet | None,
    policy: GpuPolicy,
    options: VerifyOptions,
) -> None:
    missing = v.fail if policy.require_rims else v.skip
    try:
        driver_version = report.opaque.driver_version
        vbios_version = report.opaque.vbios_version
    except MalformedInputError as exc:
        v.fail(f"{p}.measurements", f"versions unreadable: {exc}")
        return
    rims = rims or RimSet()
    chosen: dict[str, Rim | None] = {}
    absent: list[str] = []
    pairs: tuple[tuple[RimKind, str | None], ...] = (("driver", driver_version), ("vbios", vbios_version))
    for which, version in pairs:
        name = f"{p}.rim.{which}"
        label = "driver" if which == "driver" else "VBIOS"
        chosen[which] = None
        if which == "driver" and kind == "nvswitch":
            v.skip(name, "NVSwitches have no driver RIM")
            continue
        found = () if version is None else rims.candidates(which, version)
        absent.append(label)
        if len(found) > 1:
            v.fail(name, f"{len(found)} different {label} RIMs for version {version}: give exactly one")
            continue
        if not found:
            missing(
                name, f"no {label} RIM for version {version}" if version else f"no {label} version reported"
            )
            continue
        rim = found[0]
        rim_verdict = verify_rim(rim, options, prefix=name, require_ocsp=policy.require_ocsp)
        if rim_verdict.ok:
            ocsp = ", OCSP" if options.ocsp_post is not None else ""
            v.passed(name, f"{rim.tag_id[:16]}… version {rim.version}: signature, chain, validity{ocsp} good")
            chosen[which] = rim
            absent.remove(label)
        else:
            v.fail(name, "; ".join(f"{c.name}: {c.detail}" for c in rim_verdict.failed))
    validate_measurements(
        v,
        p,
        report,
        driver=chosen.get("driver"),
        vbios=chosen.get("vbios"),
        missing=tuple(absent),
        require_all=policy.require_rims,
    )


def gpu_rim_ids(report: GpuReport, kind: GpuKind = "gpu") -> dict[RimKind, str]:
    """The RIM service ids for a report's driver and VBIOS (what to fetch before verifying)."""
    opaque = report.opaque
    vbios = opaque.vbios_version
    ids: dict[RimKind, str] = {}
    if kind == "nvswitch":
        if vbios is not None:
            ids["vbios"] = switch_bios_rim_id(vbios)
        return ids
    if opaque.driver_version is not None:
        ids["driver"] = driver_rim_id(opaque.driver_version)
    project = opaque.text(OpaqueFieldType.PROJECT)
    project_sku = opaque.text(OpaqueFieldType.PROJECT_SKU)
    chip_sku = opaque.text(OpaqueFieldType.CHIP_SKU)
    if vbios is not None and project and project_sku and chip_sku:
        ids["vbios"] = vbios_rim_id(project, project_sku, chip_sku, vbios)
    return ids


@dataclass(frozen=True, slots=True)
class NvtrustEvidence:
    """One entry of NVIDIA's evidence-list JSON (``gpu_evidence.json`` / ``switch_evidence.json``)."""

    kind: GpuKind
    arch: str
    nonce: bytes  # the nonce the entry says it was requested with (the report's own is checked)
    report: bytes
    cert_chain: tuple[x509.Certificate, ...]


_ARCH_KIND: dict[str, GpuKind] = {"HOPPER": "gpu", "BLACKWELL": "gpu", "LS10": "nvswitch"}


def load_nvtrust_evidence(data: bytes) -> tuple[NvtrustEvidence, ...]:
    """Parse NVIDIA's evidence list: ``[{"arch", "nonce" (hex), "evidence" (base64 SPDM),
    "certificate" (base64 PEM chain), …}, …]``."""
    try:
        entries = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedInputError(f"NVIDIA evidence list is not JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise MalformedInputError("NVIDIA evidence list must be a non-empty JSON array")
    out: list[NvtrustEvidence] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise MalformedInputError(f"evidence entry {i} is not an object")
        arch = entry.get("arch")
        kind = _ARCH_KIND.get(arch) if isinstance(arch, str) else None
        if kind is None:
            raise UnsupportedError(f"evidence entry {i}: architecture {arch!r} not supported")
        try:
            nonce = bytes.fromhex(entry["nonce"])
            report = base64.b64decode(entry["evidence"], validate=True)
            chain = load_cert_chain(base64.b64decode(entry["certificate"], validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise MalformedInputError(f"evidence entry {i}: {type(exc).__name__} in its fields") from None
        out.append(NvtrustEvidence(kind, str(arch), nonce, report, chain))
    return tuple(out)


def verify_gpus(
    devices: Sequence[tuple[bytes | GpuReport, Sequence[x509.Certificate], GpuKind]],
    options: VerifyOptions,
    *,
    nonce: bytes | None,
    rims: RimSet | None = None,
    policy: GpuPolicy | None = None,
    rim_roots: Sequence[x509.Certificate] = (),
) -> Verdict:
    """Verify several GPUs and NVSwitches of one system; checks are named ``gpu[i].…`` and
    ``nvswitch[j].…`` (numbered per kind, in order)."""
    v = VerdictBuilder()
    counters: dict[str, int] = {"gpu": 0, "nvswitch": 0}
    for report, chain, kind in devices:
        prefix = f"{kind}[{counters[kind]}]"
        counters[kind] += 1
        verdict = verify_gpu(
            report,
            chain,
            options,
            nonce=nonce,
            kind=kind,
            rims=rims,
            policy=policy,
            prefix=prefix,
            rim_roots=rim_roots,
        )
        v.extend(verdict.checks)
    if not devices:
        v.fail("gpu.count", "no GPU evidence")
    return v.build()
