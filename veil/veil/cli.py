"""The ``veil`` command line.

Each sub-command lives with the package it belongs to and is imported only when
run, so ``veil chat`` never loads the enclave or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

# sub-command -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("veil.demo.cli", "run an encrypted round trip end to end and show what crossed the wire"),
    "chat": ("veil.client.cli", "chat with an attested enclave, end-to-end encrypted"),
    "proxy": (
        "veil.client.proxy.cli",
        "serve the OpenAI REST API on this machine, forwarded over the attested encrypted channel",
    ),
    "attest": ("veil.attestation.audit.cli", "fetch, inspect and verify attestation evidence (auditor tool)"),
    "measure": (
        "veil.attestation.audit.measure",
        "compute an expected launch measurement from published artifacts",
    ),
    "release": (
        "veil.attestation.audit.release",
        "make, sign, verify and show a signed release manifest (the identity clients pin)",
    ),
    "serve": ("veil.enclave.cli", "run the enclave: attested, end-to-end encrypted inference over gRPC"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one sub-command; returns its exit code.

    Only the chosen sub-command's module is imported, so ``veil chat`` never
    loads the enclave (or torch) and ``veil --help`` loads nothing.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="veil", description="Confidential LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == chosen:
            _module(module_name).add_arguments(p)
    args = parser.parse_args(args_list)
    code: int = _module(args._module).run(args)
    return code


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


if __name__ == "__main__":
    sys.exit(main())
