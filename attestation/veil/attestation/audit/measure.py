"""``veil measure snp``: the expected SEV-SNP launch measurement of a guest.

An auditor reproduces a measurement allow-list from published artifacts (OVMF,
kernel, initrd, command line, vCPU count and type) with the ``sev-snp-measure``
package, the reference implementation used across the ecosystem; the hex
printed here goes into a policy's ``measurements`` list. ``sev-snp-measure`` comes with
the ``measure`` extra; without it the command exits 2 saying ``pip install 'veil[measure]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="platform", required=True, metavar="PLATFORM")
    snp = sub.add_parser("snp", help="SEV-SNP launch measurement (48 bytes, hex)")
    snp.add_argument("--ovmf", required=True, type=Path, help="OVMF firmware image")
    snp.add_argument("--kernel", type=Path, help="kernel measured through OVMF's hashes table")
    snp.add_argument("--initrd", type=Path, help="initrd (with --kernel)")
    snp.add_argument("--append", default=None, help="kernel command line (with --kernel)")
    snp.add_argument("--vcpus", type=int, required=True, help="number of guest vCPUs")
    snp.add_argument(
        "--vcpu-type", required=True, help="QEMU CPU model, e.g. EPYC-v4, EPYC-Milan, EPYC-Genoa"
    )
    snp.add_argument("--vmm-type", default="QEMU", choices=["QEMU", "ec2"], help="VMM (default QEMU)")
    snp.add_argument(
        "--guest-features", type=lambda v: int(v, 0), default=0x1, help="SEV features word (default 0x1)"
    )


def measure_snp(
    *,
    ovmf: Path,
    vcpus: int,
    vcpu_type: str,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    vmm_type: str = "QEMU",
    guest_features: int = 0x1,
) -> bytes:
    """The 48-byte SNP launch digest of the guest (``LookupError`` on unknown vCPU type or count)."""
    from sevsnpmeasure import guest, vcpu_types
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vmm_types import VMMType

    if vcpu_type not in vcpu_types.CPU_SIGS:
        raise LookupError(f"unknown vCPU type {vcpu_type!r}; known: {', '.join(sorted(vcpu_types.CPU_SIGS))}")
    if vcpus < 1:
        raise LookupError("--vcpus must be at least 1")
    vmm = VMMType.QEMU if vmm_type == "QEMU" else VMMType.ec2
    digest: bytes = guest.calc_launch_digest(
        SevMode.SEV_SNP,
        vcpus,
        vcpu_types.CPU_SIGS[vcpu_type],
        str(ovmf),
        str(kernel) if kernel else None,
        str(initrd) if initrd else None,
        append,
        guest_features,
        vmm_type=vmm,
    )
    return digest


MISSING_EXTRA = "veil measure: needs the sev-snp-measure package: pip install 'veil[measure]'"


def run(args: argparse.Namespace) -> int:
    try:
        import sevsnpmeasure  # noqa: F401  (the `measure` extra)
    except ImportError:
        print(MISSING_EXTRA, file=sys.stderr)
        return 2
    for name in ("ovmf", "kernel", "initrd"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            print(f"veil measure: --{name} {path}: no such file", file=sys.stderr)
            return 2
    try:
        digest = measure_snp(
            ovmf=args.ovmf,
            vcpus=args.vcpus,
            vcpu_type=args.vcpu_type,
            kernel=args.kernel,
            initrd=args.initrd,
            append=args.append,
            vmm_type=args.vmm_type,
            guest_features=args.guest_features,
        )
    except LookupError as exc:
        print(f"veil measure: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # sev-snp-measure raises plain exceptions on unusable firmware images
        print(f"veil measure: cannot measure this image: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(digest.hex())
    return 0
