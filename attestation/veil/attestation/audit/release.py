"""``veil release``: make, sign, verify and show a signed release manifest.

* ``veil release keygen -o KEY`` — an Ed25519 publisher key: ``KEY`` (PKCS#8 PEM, 0600) and
  ``KEY.pub`` (SubjectPublicKeyInfo PEM, what clients pin).
* ``veil release build -o STATEMENT --name N --build-digest HEX --platform P [pins...]`` —
  the unsigned in-toto Statement; ``--add-to STATEMENT`` adds one more platform to it. The
  SNP measurement is ``veil measure snp``'s output: ``--snp-measurement HEX`` or
  ``--measurement-file FILE`` (the file ``veil measure snp > FILE`` wrote).
  ``--initdata FILE`` takes a Confidential Containers pod's initdata document (the TOML whose
  gzip+base64 form is the pod annotation ``io.katacontainers.config.hypervisor.cc_init_data``)
  and pins its digest the way Kata launches it: SNP ``host_data`` (32 bytes) or TDX
  ``mr_config_id`` (48 bytes); see :mod:`veil.attestation.initdata`.
* ``veil release initdata FILE [--annotation] [--json]`` — that document's digest and the
  HOST_DATA / MRCONFIGID it yields; ``--annotation`` prints the annotation value instead.
* ``veil release sign STATEMENT --key KEY -o MANIFEST`` — the DSSE envelope.
* ``veil release verify MANIFEST --publisher-key KEY.pub`` — exit 0 when it verifies, 1 with
  the named check (``policy.release``) when refused, 2 for unusable input.
* ``veil release show MANIFEST [--json]`` — every field (of a manifest: not verified; say
  ``verify`` for that; a plain statement is shown too).

The format is :mod:`veil.attestation.release`'s; a client pins it with
``Policy.from_release`` or ``veil attest verify --release MANIFEST --publisher-key KEY.pub``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from veil.attestation.errors import ReleaseError, VeilAttestationError

__all__ = ["add_arguments", "run"]


class _UsageError(Exception):
    """Exit status 2 with this message."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="release_command", required=True, metavar="ACTION")
    keygen = sub.add_parser("keygen", help="make an Ed25519 publisher key (KEY and KEY.pub)")
    keygen.add_argument("-o", "--output", required=True, type=Path, metavar="KEY")

    build = sub.add_parser("build", help="write an unsigned release statement (one platform per call)")
    build.add_argument("-o", "--output", required=True, type=Path, metavar="STATEMENT")
    build.add_argument("--add-to", type=Path, metavar="STATEMENT", help="add this platform to a statement")
    build.add_argument("--name", help="release name, e.g. v1.2.3 (required unless --add-to)")
    build.add_argument(
        "--build-digest", metavar="HEX", help="server build SHA-256 (required unless --add-to)"
    )
    build.add_argument(
        "--platform", required=True, help="SEV_SNP, AZURE_SEV_SNP, TDX, AZURE_TDX, SIMULATED_SEV_SNP"
    )
    build.add_argument("--snp-measurement", action="append", default=[], metavar="HEX", help="repeatable")
    build.add_argument("--measurement-file", type=Path, metavar="FILE", help="`veil measure snp` output")
    build.add_argument("--mrtd", action="append", default=[], metavar="HEX", help="TDX MRTD (repeatable)")
    build.add_argument("--rtmr", action="append", default=[], metavar="I=HEX", help="TDX RTMR I (0-3)")
    build.add_argument("--host-data", metavar="HEX", help="SNP HOST_DATA (32 bytes)")
    build.add_argument("--mr-config-id", metavar="HEX", help="TDX MRCONFIGID (48 bytes)")
    build.add_argument(
        "--initdata",
        type=Path,
        metavar="FILE",
        help="Kata initdata TOML: its digest becomes host_data (SNP) or mr_config_id (TDX)",
    )
    build.add_argument("--azure-pcr", action="append", default=[], metavar="I=HEX", help="Azure vTPM PCR")
    build.add_argument("--model-digest", action="append", default=[], metavar="HEX", help="repeatable")
    build.add_argument("--data-policy-digest", metavar="HEX")
    build.add_argument("--policy-test-report", type=Path, metavar="FILE", help="its SHA-256 is recorded")
    build.add_argument("--gpu-count", type=int)
    build.add_argument("--gpu-driver", action="append", default=[], metavar="VERSION")
    build.add_argument("--gpu-vbios", action="append", default=[], metavar="VERSION")
    build.add_argument(
        "--tcb-floor",
        action="append",
        default=[],
        metavar="PRODUCT:K=V,...",
        help="e.g. Milan:snp=22,microcode=213",
    )
    build.add_argument("--tdx-status", action="append", default=[], metavar="STATUS", help="e.g. UpToDate")

    initdata = sub.add_parser("initdata", help="digest, HOST_DATA and MRCONFIGID of a Kata initdata document")
    initdata.add_argument("file", type=Path, metavar="FILE", help="the initdata TOML")
    out = initdata.add_mutually_exclusive_group()
    out.add_argument(
        "--annotation", action="store_true", help="print the pod annotation value (gzip + base64)"
    )
    out.add_argument("--json", action="store_true")

    sign = sub.add_parser("sign", help="sign a statement with an Ed25519 key: the DSSE envelope")
    sign.add_argument("statement", type=Path, metavar="STATEMENT")
    sign.add_argument("--key", required=True, type=Path, metavar="KEY")
    sign.add_argument("-o", "--output", required=True, type=Path, metavar="MANIFEST")

    verify = sub.add_parser("verify", help="verify a manifest's signature with a publisher key")
    verify.add_argument("manifest", type=Path, metavar="MANIFEST")
    verify.add_argument("--publisher-key", required=True, type=Path, metavar="KEY.pub")

    show = sub.add_parser("show", help="print every field of a manifest or statement")
    show.add_argument("manifest", type=Path, metavar="MANIFEST")
    show.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    command = {
        "keygen": _keygen,
        "build": _build,
        "initdata": _initdata,
        "sign": _sign,
        "verify": _verify,
        "show": _show,
    }
    try:
        return command[args.release_command](args)
    except ReleaseError as exc:
        print(f"veil release {args.release_command}: {exc.check} fail: {exc}", file=sys.stderr)
        return 1
    except (_UsageError, VeilAttestationError) as exc:
        print(f"veil release {args.release_command}: {exc}", file=sys.stderr)
        return 2


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: Path, data: bytes, mode: int = 0o644, *, new: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if new else os.O_TRUNC)
    try:
        fd = os.open(path, flags, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise _UsageError(f"cannot write {path}: {exc.strerror}") from None


def _hex(text: str, what: str) -> str:
    cleaned = "".join(text.split()).removeprefix("0x").removeprefix("sha256:")
    try:
        bytes.fromhex(cleaned)
    except ValueError:
        raise _UsageError(f"{what} is not hex: {text[:40]!r}") from None
    return cleaned.lower()


def _indexed(values: list[str], what: str, top: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        index, _, digest = value.partition("=")
        if not index.isdigit() or int(index) > top or not digest:
            raise _UsageError(f"{what} {value!r}: give INDEX=HEX with INDEX 0..{top}")
        out[str(int(index))] = _hex(digest, what)
    return out


# ---------------------------------------------------------------------------------- commands


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from veil.attestation.release import key_fingerprint, public_key_pem, publisher_key_id

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = Path(str(args.output) + ".pub")
    _write(args.output, private, 0o600, new=True)  # never overwrite a key
    _write(public, public_key_pem(key.public_key()), new=True)
    print(f"wrote {args.output} (private, keep it secret) and {public} (publish it; clients pin it)")
    print(f"key id {publisher_key_id(key.public_key())}, sha256 {key_fingerprint(key.public_key())}")
    return 0


def _platform_doc(args: argparse.Namespace, platform: Any) -> dict[str, Any]:
    measurements = [_hex(m, "--snp-measurement") for m in args.snp_measurement]
    if args.measurement_file is not None:
        words = _read(args.measurement_file).decode(errors="replace").split()
        found = [w for w in words if len(w) == 96]
        if not found:
            raise _UsageError(
                f"{args.measurement_file}: no 48-byte hex measurement (`veil measure snp` output)"
            )
        measurements.append(_hex(found[-1], "--measurement-file"))
    doc: dict[str, Any] = {
        "measurements": measurements + [_hex(m, "--mrtd") for m in args.mrtd],
        "model_digests": [_hex(m, "--model-digest") for m in args.model_digest],
    }
    if args.rtmr:
        rtmr: list[list[str]] = [[], [], [], []]
        for index, digest in _indexed(args.rtmr, "--rtmr", 3).items():
            rtmr[int(index)].append(digest)
        doc["rtmr"] = rtmr
    if args.azure_pcr:
        doc["azure_pcrs"] = _indexed(args.azure_pcr, "--azure-pcr", 23)
    if args.host_data:
        doc["host_data"] = _hex(args.host_data, "--host-data")
    if args.mr_config_id:
        doc["mr_config_id"] = _hex(args.mr_config_id, "--mr-config-id")
    if args.initdata is not None:
        _pin_initdata(doc, args.initdata, platform)
    if args.data_policy_digest:
        doc["data_policy_digest"] = _hex(args.data_policy_digest, "--data-policy-digest")
    if args.policy_test_report is not None:
        doc["policy_test_report_digest"] = hashlib.sha256(_read(args.policy_test_report)).hexdigest()
    if args.gpu_count is not None:
        doc["gpu_count"] = args.gpu_count
    if args.gpu_driver or args.gpu_vbios:
        doc["gpu_firmware"] = {"driver": args.gpu_driver, "vbios": args.gpu_vbios}
    floor: dict[str, Any] = {}
    for spec in args.tcb_floor:
        product, _, parts = spec.partition(":")
        try:
            floor[product] = {k: int(v) for k, v in (p.split("=", 1) for p in parts.split(",") if p)}
        except ValueError:
            raise _UsageError(f"--tcb-floor {spec!r}: give PRODUCT:component=level,...") from None
    if args.tdx_status:
        floor["tdx_statuses"] = args.tdx_status
    if floor:
        doc["tcb_floor"] = floor
    return doc


def _pin_initdata(doc: dict[str, Any], path: Path, platform: Any) -> None:
    """Pin the initdata digest where Kata puts it for ``platform`` (refusing a contradiction)."""
    from veil.attestation.initdata import parse_initdata
    from veil.attestation.policy import PlatformName

    initdata = parse_initdata(_read(path))
    if platform is PlatformName.SEV_SNP:
        field, value = "host_data", initdata.host_data.hex()
    elif platform is PlatformName.TDX:
        field, value = "mr_config_id", initdata.mr_config_id.hex()
    else:
        raise _UsageError(
            f"--initdata applies to Confidential Containers pods on SEV_SNP or TDX, not {platform.value}"
        )
    if doc.get(field, value) != value:
        raise _UsageError(f"--initdata gives {field} {value}, which contradicts the {field} given")
    doc[field] = value


def _initdata(args: argparse.Namespace) -> int:
    from veil.attestation.initdata import ANNOTATION, encode_annotation, parse_initdata

    raw = _read(args.file)
    initdata = parse_initdata(raw)
    if args.annotation:
        print(encode_annotation(raw))
        return 0
    fields = {
        "annotation": ANNOTATION,
        "algorithm": initdata.algorithm,
        "digest": initdata.digest.hex(),
        "host_data": initdata.host_data.hex(),
        "mr_config_id": initdata.mr_config_id.hex(),
        "files": sorted(initdata.data),
    }
    if args.json:
        print(json.dumps(fields, indent=2))
        return 0
    print(f"file: {args.file} (initdata {initdata.algorithm}; files: {', '.join(fields['files'])})")
    print(f"digest: {fields['digest']}")
    print(f"SEV-SNP host_data: {fields['host_data']}  (veil release build --platform SEV_SNP --initdata)")
    print(f"TDX mr_config_id: {fields['mr_config_id']}  (veil release build --platform TDX --initdata)")
    print(f"pod annotation: {ANNOTATION}: `veil release initdata {args.file} --annotation`")
    return 0


def _build(args: argparse.Namespace) -> int:
    from veil.attestation.policy import PlatformName
    from veil.attestation.release import Release

    platform = PlatformName.parse(args.platform)
    if args.add_to is not None:
        statement = _load_json(_read(args.add_to), str(args.add_to))
        release = Release.from_statement(statement)
        if platform in release.platforms:
            raise _UsageError(f"{args.add_to} already names {platform.value}")
    else:
        if not args.name or not args.build_digest:
            raise _UsageError("--name and --build-digest are required (or --add-to STATEMENT)")
        release = Release(args.name, bytes.fromhex(_hex(args.build_digest, "--build-digest")), {})
        statement = release.statement()
    statement["predicate"]["platforms"][platform.value] = _platform_doc(args, platform)
    checked = Release.from_statement(statement)  # every value checked before anything is written
    _write(args.output, (json.dumps(checked.statement(), indent=2, sort_keys=True) + "\n").encode())
    print(f"wrote {args.output}: release {checked.name}, platforms {', '.join(_names(checked))} (unsigned)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from veil.attestation.release import Release, load_signing_key, publisher_key_id, sign_release

    release = Release.from_statement(_load_json(_read(args.statement), str(args.statement)))
    key = load_signing_key(_read(args.key))
    _write(args.output, sign_release(release, key))
    print(
        f"wrote {args.output}: release {release.name} signed by key id {publisher_key_id(key.public_key())}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from veil.attestation.release import verify_release

    release = verify_release(_read(args.manifest), _read(args.publisher_key))
    print(f"policy.release pass: release {release.name} signed by key id {release.publisher_key_id}")
    print(f"build sha256:{release.build_digest.hex()}, platforms {', '.join(_names(release))}")
    return 0


def _show(args: argparse.Namespace) -> int:
    doc = _load_json(_read(args.manifest), str(args.manifest))
    signed = "payload" in doc and "signatures" in doc
    if signed:
        try:
            statement = _load_json(base64.b64decode(doc["payload"], validate=True), "payload")
        except (ValueError, TypeError):
            raise _UsageError(f"{args.manifest}: the envelope's payload is not base64 JSON") from None
        keyids = [s.get("keyid") for s in doc["signatures"] if isinstance(s, dict)]
    else:
        statement, keyids = doc, []
    from veil.attestation.release import Release

    release = Release.from_statement(statement)
    if args.json:
        print(json.dumps({"signed_by_key_ids": keyids, "verified": False, **release.statement()}, indent=2))
        return 0
    print(
        f"file: {args.manifest} ({'DSSE envelope, NOT verified here: use verify' if signed else 'unsigned'})"
    )
    if signed:
        print(f"payloadType: {doc.get('payloadType')}; signature key ids: {', '.join(map(str, keyids))}")
    print(f"release: {release.name}")
    print(f"build sha256: {release.build_digest.hex()}")
    for name, pins in sorted(release.statement()["predicate"]["platforms"].items()):
        print(f"platform {name}:")
        for key, value in sorted(pins.items()):
            print(f"  {key}: {json.dumps(value)}")
    return 0


def _load_json(data: bytes, what: str) -> Any:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _UsageError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise _UsageError(f"{what} is not a JSON object")
    return doc


def _names(release: Any) -> list[str]:
    return sorted(p.value for p in release.platforms)
