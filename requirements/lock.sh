#!/usr/bin/env bash
# `make lock`: regenerate the lock files from pyproject.toml. Run it on purpose, review the diff.
#
# Why uv (`uv pip compile`) rather than pip-tools: it resolves from the registry alone (pip-tools
# runs pip's resolver, which reads this machine's pip.conf and its local wheel folders), it can
# keep torch out of the resolution with an override (torch is installed by its own rule, see
# torch-cpu.in; resolving it would lock several GB of CUDA wheels), and it writes hashes for
# every file of every pinned version, which `pip install --require-hashes` then enforces.
#
# The target is the project's machines: CPython 3.11 on x86_64 Linux (manylinux 2.28).
# all.txt is one resolution of every extra; dev.txt, client.txt and enclave.txt are cut from it with
# all.txt as a constraint, so the three never disagree on a version.
set -euo pipefail
cd "$(dirname "$0")/.."
uv="${UV:-.venv/bin/uv}"
common=(--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --override requirements/overrides.txt --no-emit-package torch --no-emit-package veil
        --custom-compile-command "make lock")
"$uv" pip compile "${common[@]}" pyproject.toml requirements/torch-cpu.in \
    --extra dev --extra bench -o requirements/all.txt
"$uv" pip compile "${common[@]}" pyproject.toml requirements/torch-cpu.in \
    --extra dev -c requirements/all.txt -o requirements/dev.txt
"$uv" pip compile "${common[@]}" pyproject.toml -c requirements/all.txt -o requirements/client.txt
# The enclave image's lock (deploy/image): the server's closure, no dev or bench tools.
"$uv" pip compile "${common[@]}" pyproject.toml requirements/torch-cpu.in \
    --extra enclave -c requirements/all.txt -o requirements/enclave.txt
echo "wrote requirements/all.txt, dev.txt, client.txt, enclave.txt"
