"""The quantized runner against HF transformers (fp32, same GGUF) and against its own fp32 reference."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from veil.enclave.engine.block_manager import blocks_for_budget
from veil.enclave.errors import InvalidRequestError
from veil.enclave.model.llama import BatchPlan, reference_forward
from veil.enclave.model.loader import LoadedModel
from veil.enclave.model.weights import LlamaWeights
from veil.enclave.runner.cpu import CpuRunner
from veil.enclave.runner.protocol import GREEDY, SeqStep

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "1, 1, 2, 3, 5, 8, 13, 21, 34,",
    "Le chat est assis sur le tapis et regarde par la fenêtre. Il",
    "Q: What is the boiling point of water at sea level?\nA:",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY",
    "In 1905 Albert Einstein published four papers that changed physics. The first explained the "
    "photoelectric effect, the second Brownian motion, the third special relativity, and the fourth "
    "the equivalence of mass and energy. Together they are known as the annus mirabilis papers. "
    "Historians often point out that",
    "日本の首都は東京です。大阪は",
    "Emoji test 🙂🚀 — and some math: ∫ x² dx =",
]


@pytest.fixture(scope="module")
def loaded(loaded_model: LoadedModel) -> LoadedModel:
    return loaded_model


@pytest.fixture(scope="module")
def reference(loaded: LoadedModel) -> LlamaWeights:
    return loaded.reference_weights()


@pytest.fixture(scope="module")
def hf_model(model_path: Path) -> Any:
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32, local_files_only=True
    ).eval()


def _ids(loaded: LoadedModel, text: str) -> list[int]:
    return list(loaded.tokenizer(text).input_ids)


def _all_logits(runner: CpuRunner, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits of every position through the paged, quantized forward."""
    table = list(range((len(ids) + runner.block_size - 1) // runner.block_size))
    plan = BatchPlan.build([(ids, 0, table, True)], runner.block_size, runner.model.cos, runner.model.sin)
    plan.logit_rows = torch.arange(len(ids))
    with torch.inference_mode():
        return runner.model.forward(plan, runner.cache)


@pytest.mark.slow  # loads HF transformers' model from the GGUF (about 25 s)
def test_teacher_forced_logits_match_hf_transformers(loaded: LoadedModel, hf_model: Any) -> None:
    """Top-1 agreement ≥ 98 % of positions and max |Δlogit| ≤ 2.0 against HF fp32 on the same GGUF.

    Why 2.0: HF runs the file's exact fp32 dequantization with fp32 activations (our fp32 reference
    with those exact weights matches it to 7e-5). The engine differs by bf16 rounding (2⁻⁹
    relative per value) of every quantized matmul's input — and on the PyTorch fallback path also
    of its output, and of the Q4_1 scales (error-compensated, tested in test_quant_cpu) — injected
    at 120 matmuls plus the LM head and carried through 30 residual layers. Measured (2026-11-22):
    Veil's kernels (fp32 outputs, exact fp16 scales) 225/227 agreeing, max 0.675; PyTorch's ops
    (``VEIL_CPU_KERNELS=0``) 224/227, max 0.557 (an earlier build of that path: 1.24). 2.0 leaves
    room for heavy-tailed positions without hiding a real bug, which shows up as errors of several logits
    and agreement far below 98 %.
    """
    runner = CpuRunner(loaded, num_kv_blocks=64, block_size=16)
    agree = total = 0
    worst = 0.0
    for text in PROMPTS:
        ids = _ids(loaded, text)
        ours = _all_logits(runner, ids)
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids])).logits[0].float()
        assert ours.shape == theirs.shape
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float((ours - theirs).abs().max()))
    print(f"top-1 agreement {agree}/{total}, max |dlogit| {worst:.3f}")
    assert agree / total >= 0.98
    assert worst <= 2.0


@pytest.mark.slow
def test_reference_path_matches_hf_closely(
    loaded: LoadedModel, reference: LlamaWeights, hf_model: Any
) -> None:
    """The fp32 reference differs from HF only by the kernel's bf16 scale/zero (measured ≈ 0.3)."""
    ids = _ids(loaded, PROMPTS[7])
    ours = reference_forward(loaded.config, reference, ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    assert bool((ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.98)
    assert float((ours - theirs).abs().max()) <= 1.0


def _greedy_runner(runner: CpuRunner, ids: list[int], n: int) -> list[int]:
    """Greedy tokens through ``execute``: the forward pass and the runner's own sampling."""
    table = list(range(runner.num_kv_blocks))
    out = runner.execute([SeqStep(0, ids, 0, table, GREEDY)])
    pos = len(ids)
    while len(out) < n:
        out += runner.execute([SeqStep(0, [out[-1]], pos, table, GREEDY)])
        pos += 1
    return out


def _greedy_reference(loaded: LoadedModel, ref: LlamaWeights, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(reference_forward(loaded.config, ref, seq, last_only=True)[-1].argmax()))
    return seq[len(ids) :]


@pytest.mark.slow  # 32 steps of the fp32 reference forward: about 5 s per prompt
@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[5], PROMPTS[4]])
def test_greedy_32_tokens_equals_fp32_reference(
    loaded: LoadedModel, reference: LlamaWeights, prompt: str
) -> None:
    """Greedy decoding through the quantized, paged runner equals the fp32 reference path, which
    uses the same quantized weights dequantized to fp32 (so it checks the forward pass and the
    cache, with only bf16 activation rounding between the two)."""
    runner = CpuRunner(loaded, num_kv_blocks=8, block_size=16)
    ids = _ids(loaded, prompt)
    assert _greedy_runner(runner, ids, 32) == _greedy_reference(loaded, reference, ids, 32)


def test_paged_batch_equals_each_sequence_alone(loaded: LoadedModel) -> None:
    """Long and short sequences, chunked prefill mixed with decode, scattered block tables: the
    batch produces the same tokens as each sequence alone, and logits within bf16 noise.

    The quantized matmuls are batch-invariant (each row's result does not depend on the others),
    but attention over a padded batch or a prefill split into chunks sums in a different order:
    fp32 differences of ~1e-7 that occasionally flip a bf16 rounding of the next matmul's input
    and grow through 30 layers to a few tenths of a logit (bf16 logits step by 1/16 near 10).
    Hence tokens must be equal and logits within 1.0."""
    bs = 4
    prompts = [_ids(loaded, PROMPTS[7]), _ids(loaded, PROMPTS[0]), _ids(loaded, PROMPTS[2]), [1]]
    n_new = 12
    pool = list(range(200))
    random.Random(7).shuffle(pool)
    tables = [pool[i * 50 : (i + 1) * 50] for i in range(len(prompts))]

    alone: list[tuple[list[int], torch.Tensor]] = []
    for ids in prompts:
        runner = CpuRunner(loaded, num_kv_blocks=64, block_size=bs)
        table = list(range(64))
        logits = runner.logits([SeqStep(0, ids, 0, table, GREEDY)])
        toks, rows = [], [logits[0]]
        pos = len(ids)
        for _ in range(n_new):
            toks.append(int(rows[-1].argmax()))
            rows.append(runner.logits([SeqStep(0, [toks[-1]], pos, table, GREEDY)])[0])
            pos += 1
        alone.append((toks, torch.stack(rows[:-1])))

    runner = CpuRunner(loaded, num_kv_blocks=200, block_size=bs)
    done = [0] * len(prompts)  # prompt tokens already prefilled
    toks_b: list[list[int]] = [[] for _ in prompts]
    rows_b: list[list[torch.Tensor]] = [[] for _ in prompts]
    chunk = 16
    while any(len(t) < n_new for t in toks_b):
        steps, owners = [], []
        for i, ids in enumerate(prompts):
            if done[i] < len(ids):
                part = ids[done[i] : done[i] + chunk]
                last = done[i] + len(part) == len(ids)
                steps.append(SeqStep(i, part, done[i], tables[i], GREEDY if last else None))
                done[i] += len(part)
                if last:
                    owners.append(i)
            elif len(toks_b[i]) < n_new:
                pos = len(ids) + len(toks_b[i]) - 1
                steps.append(SeqStep(i, [toks_b[i][-1]], pos, tables[i], GREEDY))
                owners.append(i)
        logits = runner.logits(steps)
        assert logits.shape[0] == len(owners)
        for row, i in zip(logits, owners, strict=True):
            if len(toks_b[i]) < n_new:
                rows_b[i].append(row)
                toks_b[i].append(int(row.argmax()))
    for i, (toks, rows) in enumerate(alone):
        assert toks_b[i] == toks, f"sequence {i}"
        assert float((torch.stack(rows_b[i]) - rows).abs().max()) <= 1.0


def test_execute_rejects_malformed_steps(loaded: LoadedModel) -> None:
    runner = CpuRunner(loaded, num_kv_blocks=4, block_size=16)
    with pytest.raises(InvalidRequestError):
        runner.execute([SeqStep(0, [1] * 20, 0, [0])])  # table covers 16 positions only
    with pytest.raises(InvalidRequestError):
        runner.execute([SeqStep(0, [1], 0, [9])])  # no block 9
    with pytest.raises(InvalidRequestError):
        runner.execute([SeqStep(0, [10**6], 0, [0])])  # token id beyond the vocabulary
    assert runner.execute([]) == []
    assert runner.logits([]).shape == (0, loaded.config.vocab)


def test_blocks_for_budget(loaded: LoadedModel) -> None:
    per_block = loaded.config.kv_bytes_per_token * 16
    assert blocks_for_budget(per_block * 10 + 5, loaded.config.kv_bytes_per_token, 16) == 10
    runner = CpuRunner(loaded, num_kv_blocks=10, block_size=16)
    assert runner.cache.nbytes == per_block * 10
