"""Verification of a whole Veil ``Evidence`` bundle against a client :class:`Policy`.

One function, :func:`verify_evidence`, composes the per-format verifiers: it
parses the bundle, dispatches the CPU report by platform (simulated and real
SEV-SNP go through the same :func:`~veil.attestation.snp.verify.verify_snp`; only
the trusted root differs), verifies every GPU report with
:func:`~veil.attestation.nvidia.verify.verify_gpu` for the GPU nonce bound to the
client's nonce and the enclave key, checks the binding of claims, key, nonce and
GPU reports into ``report_data``, and appraises the result against the policy.

Every check is named; the bundle-level ones are:

* ``evidence.parse``, ``evidence.format_version``
* ``binding.nonce`` — the bundle echoes the client's nonce
* ``binding.claims`` — the claims parse (canonical JSON)
* ``binding.enclave_key`` — the claims name exactly the key in ``Evidence.enclave_key``
* ``binding.simulated`` — platform, ``Evidence.simulated`` and the claims agree
* ``binding.report_data`` — the CPU report's REPORT_DATA equals
  ``binding.report_data(client nonce, claims bytes, GPUs)`` (each GPU's kind, index and report)
* ``binding.gpu_nonce`` — every GPU report was requested with
  ``binding.gpu_nonce(client nonce, enclave public key)``
* ``collateral.nvidia`` — the stapled RIMs parse (GPU evidence only)
* ``snp.chain.crl`` — with ``policy.require_crl`` (default) the stapled ARK-signed CRL must be
  there, verify and be current (:mod:`veil.attestation.stapled`); else it fails
* ``policy.release`` — the policy's signed release manifest names this platform (skip when
  the pins come from an allow-list rather than a manifest)
* ``policy.platform``, ``policy.simulated``, ``policy.build_digest``, ``policy.model_digest``,
  ``policy.data_policy_digest``, ``policy.gpu_count`` — the digests in the claims must be
  pinned (a release manifest or an allow-list) and equal a pinned value; unpinned fails
  unless the policy's loud ``allow_any_measurement`` opt-out skips them

* ``collateral.intel`` — the stapled Intel collateral parses (TDX platforms only)
* ``policy.azure_pcrs`` — Azure platforms: the vTPM PCRs the release names (empty fails)

Per platform the CPU report is verified by: SEV-SNP (real and simulated) —
:func:`~veil.attestation.snp.verify.verify_snp` and :func:`~veil.attestation.snp.validate.validate_snp`
over REPORT_DATA; TDX — :func:`~veil.attestation.tdx.verify.verify_tdx` with the stapled Intel
collateral and :func:`~veil.attestation.tdx.validate.validate_tdx` (MRTD, RTMRs, TCB status);
Azure SEV-SNP / TDX — the hardware report inside the HCL report
(:func:`~veil.attestation.snp.azure_verify.verify_azure_snp`,
:func:`~veil.attestation.tdx.azure_verify.verify_azure_tdx`), where the hardware signs
H(var_data) and Veil's 64 bytes are the HCL ``user-data`` (``azure.user_data``), and the vTPM quote
carries ``binding.tpm_nonce(report_data)`` (``azure.tpm.nonce``).

* ``simulated.measurement`` — simulated evidence only: the simulator reports the server
  build digest (zero-padded to 48 bytes) as its launch measurement, so it must equal
  ``claims.server_build_digest ‖ 0¹⁶``

Platform verifiers add theirs (``snp.*``, ``gpu[i].*``) and the SNP field appraisal of
:func:`~veil.attestation.snp.validate.validate_snp` adds ``policy.debug``,
``policy.min_tcb``, ``policy.measurement``, ``policy.report_data`` and the rest. Nothing here does I/O:
time (a :class:`~veil.attestation.options.VerifyOptions`) and the roots (in the policy) are
parameters.

What the GPU binding proves, and what it does not: each GPU report carries the GPU nonce
derived from the client's nonce and the enclave key, and ``report_data`` commits to the
hash of every GPU report, so the CPU TEE vouches that these fresh GPU reports belong to
this exchange and this key. Hopper GPUs are not bound to the CPU TEE by hardware: nothing
here proves the attested GPU is the one physically attached to this confidential VM.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError

from veil.attestation.binding import (
    EVIDENCE_FORMAT_VERSION,
    NONCE_SIZE,
    Claims,
    gpu_nonce,
    report_data,
)
from veil.attestation.channel.hpke import HpkeSuite, PublicKey
from veil.attestation.cpu_evidence import CpuResult, azure_tpm_quote, verify_cpu
from veil.attestation.errors import MalformedInputError
from veil.attestation.nvidia.report import parse_gpu_report
from veil.attestation.nvidia.verify import GpuKind, load_cert_chain, verify_gpu
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import PlatformName, Policy
from veil.attestation.snp.validate import ANY_MEASUREMENT, validate_azure_pcrs
from veil.attestation.stapled import stapled_nvidia
from veil.attestation.verdict import Verdict, VerdictBuilder
from veil.proto.v1 import evidence_pb2

__all__ = ["VerifiedEvidence", "parse_evidence", "verify_evidence"]

SUPPORTED_FORMAT_VERSION = EVIDENCE_FORMAT_VERSION
MAX_EVIDENCE_BYTES = 8 * 1024 * 1024
_AZURE_PLATFORMS = (PlatformName.AZURE_SEV_SNP, PlatformName.AZURE_TDX)


@dataclass(frozen=True, slots=True)
class VerifiedEvidence:
    """The outcome of :func:`verify_evidence`.

    ``claims`` and ``public_key`` are set whenever they parsed, but are trustworthy
    only when ``ok``: never seal to ``public_key`` of a bad verdict.
    """

    verdict: Verdict
    evidence: evidence_pb2.Evidence | None
    claims: Claims | None
    public_key: PublicKey | None

    @property
    def ok(self) -> bool:
        """True when no check failed (and at least one passed)."""
        return self.verdict.ok


def parse_evidence(data: bytes) -> evidence_pb2.Evidence:
    """Parse serialized ``Evidence``; raises :class:`MalformedInputError`."""
    if len(data) > MAX_EVIDENCE_BYTES:
        raise MalformedInputError(f"evidence of {len(data)} bytes exceeds {MAX_EVIDENCE_BYTES}")
    msg = evidence_pb2.Evidence()
    try:
        msg.ParseFromString(bytes(data))
    except DecodeError:
        raise MalformedInputError("bytes are not a Veil Evidence message") from None
    return msg


def _platform(value: int) -> PlatformName | None:
    try:
        name = evidence_pb2.Platform.Name(value)
    except ValueError:
        return None
    if name == "PLATFORM_UNSPECIFIED":
        return None
    return PlatformName(name.removeprefix("PLATFORM_"))


def verify_evidence(
    evidence: bytes | evidence_pb2.Evidence,
    options: VerifyOptions,
    *,
    policy: Policy,
    nonce: bytes | None,
) -> VerifiedEvidence:
    """Verify an ``Evidence`` bundle (bytes or message) for ``nonce`` under ``policy`` at ``options.now``.

    ``nonce`` is the 32-byte nonce the client sent; ``None`` (offline audit of a
    saved bundle) recomputes the binding with the echoed nonce and marks freshness
    as skipped. The trust anchors are the policy's, so ``options.trusted_roots`` must
    be empty. The collateral stapled in ``Evidence.collateral`` (AMD CRL, NVIDIA RIMs and
    OCSP responses) is verified offline against the vendor roots; ``options.ocsp_post``,
    when set (auditors' ``--online``), asks NVIDIA's responder instead of the stapled answers. Never
    raises for bad evidence: every problem is a failed check in the returned verdict.
    Raises :class:`MalformedInputError` only for unusable arguments (a nonce of the
    wrong size, roots in the options).
    """
    if nonce is not None and len(nonce) != NONCE_SIZE:
        raise MalformedInputError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    if options.trusted_roots:
        raise MalformedInputError("verify_evidence takes its trusted roots from the policy, not the options")
    v = VerdictBuilder()

    # ---- parse
    if isinstance(evidence, evidence_pb2.Evidence):
        msg = evidence
        v.passed("evidence.parse", "Evidence message")
    else:
        try:
            msg = parse_evidence(evidence)
        except MalformedInputError as exc:
            v.fail("evidence.parse", str(exc))
            return VerifiedEvidence(v.build(), None, None, None)
        v.passed("evidence.parse", f"{len(evidence)} bytes")
    v.check(
        "evidence.format_version",
        msg.format_version == SUPPORTED_FORMAT_VERSION,
        f"version {msg.format_version} (supported: {SUPPORTED_FORMAT_VERSION})",
    )
    platform = _platform(msg.platform)

    # ---- freshness
    if nonce is None:
        v.skip("binding.nonce", "no expected nonce given: freshness not checked (offline audit)")
        bound_nonce = bytes(msg.nonce)
    else:
        v.check(
            "binding.nonce",
            hmac.compare_digest(bytes(msg.nonce), nonce),
            "evidence echoes this request's nonce" if msg.nonce == nonce else "evidence is for another nonce",
        )
        bound_nonce = nonce

    # ---- claims and key
    claims: Claims | None = None
    try:
        claims = Claims.from_bytes(bytes(msg.claims))
        v.passed("binding.claims", f"engine {claims.engine_version}, suite {claims.hpke_suite}")
    except MalformedInputError as exc:
        v.fail("binding.claims", str(exc))
    public_key: PublicKey | None = None
    try:
        public_key = PublicKey.from_proto(msg.enclave_key)
    except MalformedInputError as exc:
        v.fail("binding.enclave_key", f"Evidence.enclave_key unusable: {exc}")
    if public_key is not None and claims is not None:
        _check_key(v, claims, public_key)
    elif public_key is not None:
        v.fail("binding.enclave_key", "claims did not parse, so nothing names this key")
    simulated_claims = claims.simulated if claims is not None else None
    consistent = (
        platform is not None
        and msg.simulated == platform.simulated
        and (simulated_claims is None or simulated_claims == platform.simulated)
    )
    v.check(
        "binding.simulated",
        consistent,
        f"platform {platform.value if platform else 'unknown'}, Evidence.simulated={msg.simulated}, "
        f"claims.simulated={simulated_claims}",
    )

    # ---- what REPORT_DATA must be: H(nonce, claims, GPU reports)
    expected: bytes | None = None
    problem = ""
    if len(bound_nonce) != NONCE_SIZE:
        problem = f"nonce is {len(bound_nonce)} bytes, not {NONCE_SIZE}"
    else:
        try:
            expected = report_data(bound_nonce, bytes(msg.claims), msg.gpus)
        except MalformedInputError as exc:
            problem = str(exc)

    # ---- CPU report
    cpu = verify_cpu(v, msg, platform=platform, policy=policy, options=options, expected=expected)

    # ---- binding of nonce, claims and GPU reports into report_data
    if expected is None:
        v.fail("binding.report_data", problem)
    elif cpu is None:
        v.fail("binding.report_data", "no parsed CPU report to compare with")
    else:
        ok = hmac.compare_digest(expected, cpu.report_data)
        v.check(
            "binding.report_data",
            ok,
            "H(nonce, claims, GPU kinds, indices and reports) = signed REPORT_DATA"
            if ok
            else "signed REPORT_DATA does not match H(nonce, claims, GPU kinds, indices and reports)",
        )

    if cpu is not None and claims is not None and platform is PlatformName.SIMULATED_SEV_SNP:
        expected_measurement = claims.server_build_digest.ljust(len(cpu.measurement), b"\0")
        ok = hmac.compare_digest(cpu.measurement, expected_measurement)
        v.check(
            "simulated.measurement",
            ok,
            "measurement = claims.server_build_digest (zero-padded)"
            if ok
            else "measurement is not the claimed server build digest",
        )

    # ---- GPUs
    _verify_gpus(
        v,
        msg,
        platform=platform,
        policy=policy,
        options=options,
        bound_nonce=bound_nonce,
        public_key=public_key,
    )

    # ---- policy
    _appraise(
        v,
        msg,
        platform=platform,
        policy=policy,
        cpu=cpu,
        claims=claims,
        expected_report_data=expected,
    )
    return VerifiedEvidence(v.build(), msg, claims, public_key)


def _check_key(v: VerdictBuilder, claims: Claims, public_key: PublicKey) -> None:
    key_bytes = public_key.to_bytes()
    if not hmac.compare_digest(claims.enclave_public_key, key_bytes):
        v.fail("binding.enclave_key", "the claims name a different key than Evidence.enclave_key")
        return
    try:
        suite = HpkeSuite.from_name(claims.hpke_suite)
    except MalformedInputError as exc:
        v.fail("binding.enclave_key", str(exc))
        return
    v.check(
        "binding.enclave_key",
        suite is public_key.suite,
        f"claims name this key (key_id {public_key.key_id.hex()}, {suite.name})"
        if suite is public_key.suite
        else f"claims say suite {suite.name}, key is {public_key.suite.name}",
    )


def _verify_gpus(
    v: VerdictBuilder,
    msg: evidence_pb2.Evidence,
    *,
    platform: PlatformName | None,
    policy: Policy,
    options: VerifyOptions,
    bound_nonce: bytes,
    public_key: PublicKey | None,
) -> None:
    if not msg.gpus:
        v.skip("binding.gpu_nonce", "no GPU reports")
        return
    simulated = platform is not None and platform.simulated
    _, sim_device, sim_rim = policy.trusted_roots.simulation_roles()
    roots = sim_device if simulated else policy.trusted_roots.nvidia
    # RIMs chain to the NVIDIA RIM root pinned in the package (no rim_roots), or, for simulated
    # evidence, to the simulation's RIM root; OCSP answers come stapled (or online for auditors).
    rim_roots = sim_rim if simulated else ()
    stapled = stapled_nvidia(msg.collateral)
    if stapled.problems:
        v.fail("collateral.nvidia", "; ".join(stapled.problems))
    else:
        v.passed("collateral.nvidia", stapled.describe())
    gpu_options = replace(options, ocsp_post=options.ocsp_post or stapled.ocsp_post)
    expected = None
    if public_key is not None and len(bound_nonce) == NONCE_SIZE:
        expected = gpu_nonce(bound_nonce, public_key.to_bytes())
    mismatched: list[str] = []
    for i, gpu in enumerate(msg.gpus):
        prefix = f"gpu[{i}]"
        kind: GpuKind = "nvswitch" if gpu.kind == evidence_pb2.GpuEvidence.KIND_NVSWITCH else "gpu"
        try:
            chain = load_cert_chain(bytes(gpu.cert_chain)) if gpu.cert_chain else ()
        except MalformedInputError as exc:
            v.fail(f"{prefix}.chain", str(exc))
            chain = ()
        if not roots:
            v.fail(f"{prefix}.chain", "the policy trusts no root for this GPU evidence")
        try:
            nonce_in_report = parse_gpu_report(bytes(gpu.report)).nonce
        except MalformedInputError:
            nonce_in_report = None
        if expected is None or nonce_in_report is None or not hmac.compare_digest(nonce_in_report, expected):
            mismatched.append(str(i))
        if roots:
            # verify_gpu anchors the chain at the trusted root it ends at (else the first).
            anchored = replace(gpu_options, trusted_roots=roots)
            verdict = verify_gpu(
                bytes(gpu.report),
                chain,
                anchored,
                nonce=expected,
                kind=kind,
                prefix=prefix,
                rims=stapled.rims,
                policy=policy.gpu,
                rim_roots=rim_roots,
            )
            v.extend(verdict.checks)
    if expected is None:
        v.fail("binding.gpu_nonce", "no usable enclave key to derive the GPU nonce from")
    else:
        v.check(
            "binding.gpu_nonce",
            not mismatched,
            f"all {len(msg.gpus)} GPU report(s) requested with H(nonce, enclave key)"
            if not mismatched
            else f"GPU report(s) {', '.join(mismatched)} not requested with H(nonce, enclave key)",
        )


def _appraise(
    v: VerdictBuilder,
    msg: evidence_pb2.Evidence,
    *,
    platform: PlatformName | None,
    policy: Policy,
    cpu: CpuResult | None,
    claims: Claims | None,
    expected_report_data: bytes | None,
) -> None:
    _appraise_release(v, platform, policy)
    allowed = ", ".join(sorted(p.value for p in policy.platforms))
    if platform is None:
        v.fail("policy.platform", f"unknown platform {msg.platform}")
    else:
        v.check(
            "policy.platform",
            platform in policy.platforms,
            f"{platform.value} {'is' if platform in policy.platforms else 'is not'} allowed ({allowed})",
        )
    if platform is not None and platform.simulated:
        v.check(
            "policy.simulated",
            policy.allows_simulated,
            "SIMULATED TEE, accepted only because the policy explicitly trusts the simulator"
            if policy.allows_simulated
            else "simulated evidence: the policy does not trust the simulator",
        )
    else:
        v.passed("policy.simulated", "hardware evidence (not simulated)")

    if cpu is None:
        for name in ("policy.debug", "policy.min_tcb", "policy.measurement"):
            v.fail(name, "no verified CPU report to appraise")
    else:
        v.extend(cpu.appraise(policy, expected_report_data).checks)
    if platform in _AZURE_PLATFORMS:
        pcrs = validate_azure_pcrs(
            azure_tpm_quote(msg), policy.azure_pcrs, allow_any=policy.allow_any_measurement
        )
        v.extend(pcrs.checks)

    if claims is None:
        for name in ("policy.build_digest", "policy.model_digest", "policy.data_policy_digest"):
            v.fail(name, "no claims")
    else:
        required = frozenset({policy.data_policy_digest}) if policy.data_policy_digest else frozenset()
        for name, what, value, pinned, key in (
            (
                "policy.build_digest",
                "server build",
                claims.server_build_digest,
                policy.build_digests,
                "build_digests",
            ),
            ("policy.model_digest", "model", claims.model_digest, policy.model_digests, "model_digests"),
            (
                "policy.data_policy_digest",
                "data policy",
                claims.data_policy_digest,
                required,
                "data_policy_digest",
            ),
        ):
            _pinned_digest(v, name, what, value, pinned, key=key, any_ok=policy.allow_any_measurement)

    gpus = sum(1 for g in msg.gpus if g.kind != evidence_pb2.GpuEvidence.KIND_NVSWITCH)
    if policy.gpu_count is None:
        v.skip("policy.gpu_count", f"any number allowed ({gpus} GPU report(s))")
    else:
        v.check(
            "policy.gpu_count",
            gpus == policy.gpu_count,
            f"{gpus} GPU report(s), policy requires {policy.gpu_count}",
        )


def _pinned_digest(
    v: VerdictBuilder, name: str, what: str, value: bytes, pinned: frozenset[bytes], *, key: str, any_ok: bool
) -> None:
    if pinned:
        ok = any(hmac.compare_digest(value, p) for p in pinned)
        v.check(name, ok, f"{what} sha256:{value.hex()} " + ("is pinned" if ok else "is not the pinned one"))
    elif any_ok:
        v.skip(name, f"{ANY_MEASUREMENT}; {what} sha256:{value.hex()}")
    else:
        v.fail(
            name,
            f"no {what} digest pinned: pin it with a signed release manifest (Policy.from_release, "
            f"--release) or {key} in the policy; opt out only to explore evidence "
            f"(allow_any_measurement) — enclave states sha256:{value.hex()}",
        )


def _appraise_release(v: VerdictBuilder, platform: PlatformName | None, policy: Policy) -> None:
    release = policy.release
    if release is None:
        v.skip("policy.release", "no release manifest: pins come from the policy's allow-lists")
    elif platform is None:
        v.fail("policy.release", f"unknown platform: release {release.name} cannot name it")
    else:
        named = platform in release.platforms
        v.check(
            "policy.release",
            named,
            f"release {release.name} (publisher key id {str(release.publisher_key_id)[:16]}…) "
            + (f"names {platform.value}" if named else f"does not name platform {platform.value}"),
        )
