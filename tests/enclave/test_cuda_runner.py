"""The GPU runner's forward pass against the fp32 reference forward, on a small synthetic Llama.

Without a GPU the runner runs on the CPU with the Triton kernels in the interpreter (fp32, no CUDA
graphs, but the same padded static-buffer decode path the graphs replay). Weights are built so that
every scale is exactly representable in fp16 and bf16: the reference's "as the kernel sees it"
weights and the Triton kernels' weights are then bit-identical, and the only differences left are fp32
summation orders. With a GPU, a ``gpu`` test runs the embedded SmolLM2 with CUDA graphs in bf16.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

pytest.importorskip("triton")

from veil.enclave.errors import InvalidRequestError  # noqa: E402
from veil.enclave.model.config import ModelConfig  # noqa: E402
from veil.enclave.model.llama import reference_forward  # noqa: E402
from veil.enclave.model.loader import LoadedModel  # noqa: E402
from veil.enclave.model.weights import BlockEmbedding, LayerSpecs, LlamaSpecs, build_weights  # noqa: E402
from veil.enclave.runner.cuda import CudaRunner  # noqa: E402
from veil.enclave.runner.protocol import GREEDY, SampleSpec, SeqStep  # noqa: E402
from veil.kernels.quant_cpu import Int4Spec, Int8Spec  # noqa: E402

VOCAB, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 80, 64, 96, 4, 2, 16


def _pow2(shape: tuple[int, ...], lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    return 2.0 ** -torch.randint(lo, hi, shape, generator=g).float()


def _int4(n: int, k: int, g: torch.Generator) -> Int4Spec:
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = _pow2((n, k // 32), 4, 7, g)
    m = -torch.randint(0, 8, (n, k // 32), generator=g).float() / 16
    return Int4Spec(codes, scale, m + 8 * scale, 32)


def _int8(n: int, k: int, g: torch.Generator) -> Int8Spec:
    return Int8Spec(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), _pow2((n,), 6, 9, g))


def _dense(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, k, generator=g) * 0.05).bfloat16().float()  # what a bf16 kernel would see


def _model(*, tied: bool) -> tuple[ModelConfig, LlamaSpecs]:
    g = torch.Generator().manual_seed(7)
    config = ModelConfig(
        n_layers=2, n_heads=HEADS, n_kv_heads=KV_HEADS, hidden=HIDDEN, intermediate=INTER, vocab=VOCAB,
        head_dim=HEAD_DIM, rope_theta=10000.0, rms_eps=1e-5, max_context=64, tied_output=tied,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    qkv_out = (HEADS, KV_HEADS, KV_HEADS)

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(HIDDEN, generator=g)

    layers = [
        LayerSpecs(  # all int4 (the GGUF Q4_1 case)
            attn_norm=norm(), q=_int4(HEADS * HEAD_DIM, HIDDEN, g), k=_int4(KV_HEADS * HEAD_DIM, HIDDEN, g),
            v=_int4(KV_HEADS * HEAD_DIM, HIDDEN, g), o=_int4(HIDDEN, HEADS * HEAD_DIM, g), ffn_norm=norm(),
            gate=_int4(INTER, HIDDEN, g), up=_int4(INTER, HIDDEN, g), down=_int4(HIDDEN, INTER, g),
        ),
        LayerSpecs(  # int8 QKV, a dense O, a mixed gate/up (falls back to one dense weight)
            attn_norm=norm(), q=_int8(qkv_out[0] * HEAD_DIM, HIDDEN, g),
            k=_int8(KV_HEADS * HEAD_DIM, HIDDEN, g),
            v=_int8(KV_HEADS * HEAD_DIM, HIDDEN, g), o=_dense(HIDDEN, HEADS * HEAD_DIM, g), ffn_norm=norm(),
            gate=_int4(INTER, HIDDEN, g), up=_dense(INTER, HIDDEN, g), down=_int4(HIDDEN, INTER, g),
        ),
    ]  # fmt: skip
    codes = torch.randint(-127, 128, (VOCAB, HIDDEN), generator=g, dtype=torch.int8)
    scale = _pow2((VOCAB, HIDDEN // 32), 5, 8, g)
    embed = BlockEmbedding(codes, scale, None, 32, 0.0)  # GGUF Q8_0 table
    output = embed.dequantize() if tied else _int4(VOCAB, HIDDEN, g)  # tied: the table itself, exactly
    return config, LlamaSpecs(embed, layers, norm(), output)


def _runner(config: ModelConfig, specs: LlamaSpecs, device: torch.device, dtype: torch.dtype) -> CudaRunner:
    loaded = LoadedModel(
        config=config, weights=build_weights(specs, reference=True), tokenizer=None, chat_template=None,
        eos_token_ids=frozenset(), model_digest=b"", path=Path("synthetic"), quant="auto",
    )  # fmt: skip
    return CudaRunner(
        loaded, num_kv_blocks=24, block_size=4, device=device, dtype=dtype, max_batch=4, specs=specs
    )


@pytest.fixture(scope="module")
def device() -> torch.device:
    if HAS_CUDA:
        return torch.device("cuda")
    from veil.kernels.triton_common import kernels_run_on_cpu

    if not kernels_run_on_cpu():
        pytest.skip("no CUDA device, and the kernel modules were imported without TRITON_INTERPRET=1")
    return torch.device("cpu")


@pytest.mark.slow  # the Triton interpreter on the CPU: 2-4 s per case
@pytest.mark.parametrize("tied", [False, True])
def test_prefill_decode_and_chunked_prefill_match_the_reference(tied: bool, device: torch.device) -> None:
    config, specs = _model(tied=tied)
    runner = _runner(config, specs, device, torch.float32)
    ref_weights = build_weights(specs, reference=True)
    g = torch.Generator().manual_seed(11)
    prompts = {0: torch.randint(0, VOCAB, (7,), generator=g).tolist(), 1: [5, 6, 7], 2: [9]}
    order = torch.randperm(24, generator=torch.Generator().manual_seed(3)).tolist()
    tables = {0: order[0:6], 1: order[6:12], 2: order[12:18]}  # scattered physical blocks
    history = {0: prompts[0][:5], 1: prompts[1][:], 2: prompts[2][:]}

    def check(steps: list[SeqStep]) -> None:
        logits = runner.logits(steps)
        want = [s for s in steps if s.want_logits]
        assert logits.shape == (len(want), VOCAB) and logits.device.type == "cpu"
        # the runner's own sampling (re-running a step writes the same cache positions)
        assert runner.execute(steps) == logits.argmax(-1).tolist()
        for row, s in zip(logits, want, strict=True):
            ref = reference_forward(config, ref_weights, history[s.seq_id][: s.start_pos + len(s.token_ids)])[
                -1
            ]
            torch.testing.assert_close(row, ref, atol=2e-4, rtol=1e-4)

    # 1. mixed step: two prompt chunks (5 of A's 7 tokens, all of B) and a one-token prompt (C)
    steps = [
        SeqStep(0, prompts[0][:5], 0, tables[0], GREEDY),
        SeqStep(1, prompts[1], 0, tables[1]),
        SeqStep(2, prompts[2], 0, tables[2], GREEDY),
    ]
    check(steps)
    # 2. A's prompt continues (a chunk over cached positions) next to B's first decode step
    history[0] = prompts[0][:]
    history[1].append(11)
    steps = [SeqStep(0, prompts[0][5:], 5, tables[0], GREEDY), SeqStep(1, [11], 3, tables[1], GREEDY)]
    check(steps)
    # 3. three decode steps: the graph path, padded from 3 rows to the ladder's 4
    for tok in (12, 13):
        steps = []
        for sid in (0, 1, 2):
            pos = len(history[sid])
            history[sid].append(tok + sid)
            steps.append(SeqStep(sid, [tok + sid], pos, tables[sid], GREEDY))
        check(steps)
    assert runner.graph_batches == (1, 2, 4)


def test_execute_rejects_bad_steps(device: torch.device) -> None:
    config, specs = _model(tied=False)
    runner = _runner(config, specs, device, torch.float32)
    assert runner.execute([]) == []
    assert runner.logits([]).shape == (0, VOCAB)
    for bad in (
        SeqStep(0, [1], 0, []),  # no block for position 0
        SeqStep(0, [VOCAB], 0, [0]),  # token id out of range
        SeqStep(0, [1], 0, [24]),  # block id out of range
        SeqStep(0, [1] * 3, 63, [0] * 17),  # past the context
        SeqStep(
            0, [1], 0, [0], SampleSpec(GREEDY.params, 0, 0, torch.zeros(VOCAB, dtype=torch.int32))
        ),  # mask
    ):
        with pytest.raises(InvalidRequestError):
            runner.execute([bad])


@pytest.mark.gpu
def test_gpu_smollm2_graph_decode_matches_eager_and_the_cpu_runner(loaded_model: LoadedModel) -> None:
    from veil.enclave.runner.cpu import CpuRunner

    model = loaded_model
    graphs = CudaRunner(model, num_kv_blocks=256, block_size=16, max_batch=8)
    eager = CudaRunner(model, num_kv_blocks=256, block_size=16, max_batch=8, use_graphs=False)
    cpu = CpuRunner(model, num_kv_blocks=64, block_size=16)
    prompt = model.tokenizer.encode("The capital of France is")
    table = list(range(8))
    first = graphs.logits([SeqStep(0, prompt, 0, table, GREEDY)])
    eager.execute([SeqStep(0, prompt, 0, table, GREEDY)])
    on_cpu = cpu.logits([SeqStep(0, prompt, 0, table, GREEDY)])[0]
    # bf16 on both sides, different kernels: the distributions agree, the top token is among the CPU's top 5
    assert torch.nn.functional.cosine_similarity(first[0], on_cpu, dim=0) > 0.99
    assert int(first.argmax()) in on_cpu.topk(5).indices.tolist()
    tokens = [int(first.argmax())]
    for _ in range(8):
        step = [SeqStep(0, [tokens[-1]], len(prompt) + len(tokens) - 1, table, GREEDY)]
        a, b = graphs.logits(step), eager.logits(step)
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # a replay runs the very same kernels
        assert graphs.execute(step) == eager.execute(step) == [int(a.argmax())]  # sampled on the device
        tokens.append(int(a.argmax()))
