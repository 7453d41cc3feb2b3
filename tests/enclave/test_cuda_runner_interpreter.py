"""The GPU path proven on the CPU: the CUDA runner runs the embedded SmolLM2 end to end under the Triton
interpreter (w4a16 / int8 GEMV and GEMM, paged decode attention, fused RMSNorm + residual and RoPE + KV
write, the paged prefill, sampling on the runner's device) inside the real engine, and its greedy
tokens equal the CPU engine's.

Error bound: the interpreter runs in fp32 (it has no bf16) with the exact dequantized Q4_1 / Q8_0
weights; the CPU runner rounds each matmul's input to bf16 (2⁻⁹ relative), which moves SmolLM2's
logits by up to ~0.7 (measured against HF fp32 in test_model). So tokens must be equal, except that at
the first difference (after which the two continuations legitimately part) the two tokens must be a
near-tie in the CPU runner's own logits for that prefix: within 2⁻⁶ of the top logit, relative (a few
bf16 steps, far below the gap a wrong kernel or a wrong cache slot produces). Batched (3 prompts in
one prefill step, then batched decode steps through the padded CUDA-graph decode path) to keep the
interpreter's run to a few minutes on 2 cores.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

pytest.importorskip("triton")

from veil.enclave.engine.sampling import SamplingParams
from veil.enclave.engine.sync_engine import EngineRequest, LLMEngine
from veil.enclave.runner.cpu import CpuRunner
from veil.enclave.runner.protocol import GREEDY, SeqStep

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
NEW_TOKENS = 4


def _greedy(engine: LLMEngine) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        req = EngineRequest(f"p{i}", params, prompt=p)
        engine.add_request(req.request_id, engine.encode(req), params)
    out: dict[str, list[int]] = {f"p{i}": [] for i in range(len(PROMPTS))}
    steps = 0
    while engine.has_unfinished() and steps < 4 * NEW_TOKENS:
        for o in engine.step():
            out[o.request_id].extend(o.delta.token_ids)
        steps += 1
    return out


@pytest.mark.slow  # the Triton interpreter: about a minute per engine step of SmolLM2 on 2 busy cores
def test_interpreted_cuda_runner_greedy_tokens_equal_the_cpu_engine(loaded_model: Any) -> None:
    from veil.enclave.runner.cuda import CudaRunner
    from veil.kernels.triton_common import kernels_run_on_cpu

    if torch.cuda.is_available():
        device = "cuda"
    elif kernels_run_on_cpu():
        device = "cpu"
    else:
        # an earlier test imported the Triton kernels for a GPU: nothing here would be proven
        pytest.fail("the kernel modules were imported without TRITON_INTERPRET=1; run this file alone")
    gpu_path = CudaRunner(loaded_model, num_kv_blocks=8, block_size=16, device=device, max_batch=4)
    assert gpu_path.device.startswith("cpu (Triton interpreter)" if device == "cpu" else "cuda")
    assert gpu_path.graph_batches == (1, 2, 4)  # 3 decode rows run padded to 4, as a graph replays them
    cpu = CpuRunner(loaded_model, num_kv_blocks=8, block_size=16)

    ours = _greedy(LLMEngine(gpu_path, max_batch=4))
    theirs = _greedy(LLMEngine(cpu, max_batch=4))

    exact = 0
    for i, prompt in enumerate(PROMPTS):
        a, b = theirs[f"p{i}"], ours[f"p{i}"]
        assert len(a) == len(b) == NEW_TOKENS
        if a == b:
            exact += 1
            continue
        k = next(j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        prefix = [*loaded_model.tokenizer.encode(prompt), *a[:k]]
        logits = cpu.logits([SeqStep(0, prefix, 0, list(range(8)), GREEDY)])[0]
        best = float(logits.max())
        gap = abs(float(logits[a[k]]) - float(logits[b[k]]))
        assert gap <= abs(best) * 2**-6, f"prompt {i}: token {k} differs without a near-tie ({gap:.3f})"
    assert exact >= 2, f"only {exact} of {len(PROMPTS)} prompts agree exactly: {ours} vs {theirs}"
