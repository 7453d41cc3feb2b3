#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU (issue #16): install what the check needs, run the
# gpu-marked tests, bench/kernels.py and the engine benchmark (Veil --device cuda vs HF transformers
# on the GPU, and vLLM if it installs), and write every figure to ONE file.
#
#     bench/gpu_check.sh [OUT]        # or: make gpu-check  (OUT defaults to gpu-check-<host>-<date>.txt)
#
# Installs: the lock (requirements/all.txt, hash-checked, as `make bench` does) through `make setup`.
# torch is the exception the Makefile already makes: a torch that imports is kept. When the venv's
# torch has no CUDA, torch==2.13.0 is installed from the default index (on Linux x86_64 that is the
# CUDA build). vLLM goes into its own venv (.venv-vllm; it pins its own torch) and is optional: a
# failed install is written to the file and the rest still runs. Every step is run under `timeout`
# (GPU_CHECK_STEP_S, default 900 s); a failing step is recorded, never fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1
OUT="${1:-gpu-check-$(hostname -s)-$(date -u +%Y%m%dT%H%MZ).txt}"
STEP_S="${GPU_CHECK_STEP_S:-900}"
PY=.venv/bin/python
TORCH_VERSION=2.13.0

: >"$OUT"
say() { printf '%s\n' "$*" | tee -a "$OUT"; }
step() {  # step TITLE CMD... : run CMD, its output into the file, its exit status recorded
    local title="$1"; shift
    say ""; say "===== $title ($(date -u +%H:%M:%SZ))"; say "\$ $*"
    timeout "$STEP_S" "$@" 2>&1 | tee -a "$OUT"
    local rc=${PIPESTATUS[0]}
    say "----- $title: exit $rc"
    return 0
}

say "Veil GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    say "no NVIDIA GPU visible (nvidia-smi -L failed): nothing to check on this machine"
    exit 2
fi
step "GPU" nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv

# ---------------------------------------------------------------------------------------- install
test -x "$PY" || python3 -m venv .venv
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    step "install torch $TORCH_VERSION with CUDA" "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
fi
step "make setup (the lock, Veil, the embedded model, CPU kernels)" make setup
step "bench extra (requirements/all.txt, hash-checked)" \
    "$PY" -m pip install --quiet --require-hashes --no-deps -r requirements/all.txt
step "torch / triton / device" "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name(0), \
'available', torch.cuda.is_available())"

VLLM_ARGS=()
if [ "${GPU_CHECK_VLLM:-1}" = 1 ]; then
    test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
    step "install vLLM (optional, own venv)" .venv-vllm/bin/python -m pip install --quiet vllm gguf
    if .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
        .venv-vllm/bin/python -m pip install --quiet --no-deps -e . >/dev/null 2>&1
        VLLM_ARGS=(--vllm-python .venv-vllm/bin/python)
        say "vLLM $(.venv-vllm/bin/python -c 'import vllm; print(vllm.__version__)') installed"
    else
        say "vLLM: not installed on this machine (see the install step above); compared without it"
    fi
fi

# ---------------------------------------------------------------------------------------- checks
step "gpu-marked tests" .venv/bin/pytest -m gpu -v -rs -p no:cacheprovider
step "interpreter parity test (the CPU proof of the same path, for reference)" \
    .venv/bin/pytest -q tests/enclave/test_cuda_runner_interpreter.py -p no:cacheprovider
step "kernel benchmark (bench/kernels.py, sweep)" "$PY" bench/kernels.py --sweep --json "${OUT%.txt}-kernels.json"
step "engine benchmark: Veil --device cuda vs HF transformers (GPU)${VLLM_ARGS:+ vs vLLM}" \
    "$PY" bench/engine.py --device cuda --only veil --only hf ${VLLM_ARGS:+--only vllm} "${VLLM_ARGS[@]}" \
    --concurrency 1 16 64 --threads "$(nproc)"
step "engine benchmark: Veil --device cpu vs llama.cpp on this host, CPU only (the CPU targets)" \
    "$PY" bench/engine.py --device cpu --only veil --only llamacpp --concurrency 1 16 --threads "$(nproc)"
step "veil serve --device auto: the start-up log names the device" bash -c '
    d=$(mktemp -d); .venv/bin/veil serve --device auto --port 0 --state-dir "$d" >"$d/log" 2>&1 & pid=$!
    for _ in $(seq 180); do grep -q "^listening" "$d/log" && break; sleep 1; done
    kill "$pid"; wait "$pid"; grep "^device:\|^listening" "$d/log"'

say ""; say "all figures are in $OUT"
