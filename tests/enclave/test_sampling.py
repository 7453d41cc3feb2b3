from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from veil.enclave.engine.sampler import Sampler, mix_seed
from veil.enclave.engine.sampling import MAX_SEED, MAX_STOP_STRINGS, SamplingParams
from veil.enclave.errors import EngineInternalError, InvalidRequestError

# --------------------------------------------------------------------------- SamplingParams


def test_defaults_and_list_fields_become_tuples() -> None:
    p = SamplingParams(stop=["</s>", "\n\n"], stop_token_ids=[2, 7])  # type: ignore[arg-type]
    assert p.stop == ("</s>", "\n\n")
    assert p.stop_token_ids == (2, 7)
    assert p.max_tokens == 256 and p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"max_tokens": 1.5},
        {"max_tokens": True},
        {"temperature": -0.1},
        {"temperature": math.inf},
        {"temperature": math.nan},
        {"temperature": "1"},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": -1.0},
        {"top_k": -1},
        {"seed": -1},
        {"seed": MAX_SEED + 1},
        {"stop": ["ok", ""]},
        {"stop": "a string, not a list"},
        {"stop": ["x" * 1000]},
        {"stop": ["s"] * (MAX_STOP_STRINGS + 1)},
        {"stop": [3]},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": [1.0]},
        {"min_tokens": 5, "max_tokens": 4},
        {"ignore_eos": 1},
    ],
)
def test_invalid_params_raise_typed_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert "a string, not a list" not in str(info.value)


def test_boundary_values_are_accepted() -> None:
    SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=0, seed=0)
    SamplingParams(top_p=1e-9, seed=MAX_SEED, stop=("s",) * MAX_STOP_STRINGS, min_tokens=256)


# --------------------------------------------------------------------------- Sampler

VOCAB = 97


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


def test_greedy_batch_is_argmax() -> None:
    logits = _logits(8)
    params = [SamplingParams(temperature=0)] * 8
    out = Sampler().sample(logits, params, seeds=[0] * 8, steps=[0] * 8)
    assert out == logits.argmax(-1).tolist()


def test_seeded_row_is_independent_of_batch_mates_and_position() -> None:
    sampler = Sampler()
    target = _logits(1, seed=42)
    mine = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    alone = [sampler.sample(target, [mine], seeds=[1234], steps=[s])[0] for s in range(20)]
    assert len(set(alone)) > 1  # it really samples
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(top_p=0.5),
    ]
    for mates in range(1, 16):
        for where in (0, mates // 2, mates):
            batch = _logits(mates, seed=mates)
            logits = torch.cat([batch[:where], target, batch[where:]])
            params = [others[i % len(others)] for i in range(mates)]
            params.insert(where, mine)
            seeds = [mates * 7 + i for i in range(mates)]
            seeds.insert(where, 1234)
            for s in (0, 7, 19):
                steps = [s + i for i in range(mates)]
                steps.insert(where, s)
                assert sampler.sample(logits, params, seeds, steps)[where] == alone[s]


def test_different_seeds_and_steps_give_different_streams() -> None:
    assert len({mix_seed(1, s) for s in range(1000)}) == 1000
    assert mix_seed(1, 0) != mix_seed(2, 0)
    logits = torch.zeros(1, VOCAB)  # uniform
    p = SamplingParams(temperature=1.0)
    draws = {Sampler().sample(logits, [p], [seed], [0])[0] for seed in range(200)}
    assert len(draws) > 50


def test_top_k_restricts_support() -> None:
    logits = _logits(1, seed=3)
    top5 = set(logits[0].topk(5).indices.tolist())
    p = SamplingParams(temperature=2.0, top_k=5)
    drawn = {Sampler().sample(logits, [p], [s], [0])[0] for s in range(300)}
    assert drawn <= top5 and len(drawn) == 5
    k1 = SamplingParams(temperature=5.0, top_k=1)
    assert {Sampler().sample(logits, [k1], [s], [0])[0] for s in range(50)} == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    sampler = Sampler()
    # 0.5 + 0.3 = 0.8 >= 0.7: the nucleus is {1, 3}
    p = SamplingParams(top_p=0.7)
    assert {sampler.sample(logits, [p], [s], [0])[0] for s in range(300)} == {1, 3}
    # a tiny top_p keeps the most likely token only
    p = SamplingParams(top_p=1e-6)
    assert {sampler.sample(logits, [p], [s], [0])[0] for s in range(50)} == {1}
    # top_p = 1 keeps everything
    p = SamplingParams(top_p=1.0)
    assert {sampler.sample(logits, [p], [s], [0])[0] for s in range(400)} == {0, 1, 2, 3}


def test_samples_follow_the_distribution() -> None:
    probs = [0.5, 0.3, 0.2]
    logits = torch.tensor([probs]).log()
    p = SamplingParams(temperature=1.0)
    n = 4000
    counts = Counter(Sampler().sample(logits, [p], [s], [0])[0] for s in range(n))
    for tok, q in enumerate(probs):
        sd = math.sqrt(n * q * (1 - q))
        assert abs(counts[tok] - n * q) < 5 * sd


def test_low_temperature_is_greedy_and_high_temperature_flattens() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = SamplingParams(temperature=1e-3)
    assert {Sampler().sample(logits, [cold], [s], [0])[0] for s in range(100)} == {0}
    hot = SamplingParams(temperature=100.0)
    counts = Counter(Sampler().sample(logits, [hot], [s], [0])[0] for s in range(900))
    assert min(counts.values()) > 200


def test_bad_logits_raise() -> None:
    p = [SamplingParams(temperature=0)]
    with pytest.raises(EngineInternalError):
        Sampler().sample(torch.tensor([[0.0, math.nan]]), p, [0], [0])
    with pytest.raises(EngineInternalError):
        Sampler().sample(torch.full((1, 4), -math.inf), p, [0], [0])
    with pytest.raises(EngineInternalError):
        Sampler().sample(torch.zeros(2, 4), p, [0], [0])


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.95])
def test_top_p_nucleus_is_exact_inside_and_beyond_the_candidate_window(top_p: float) -> None:
    vocab = 5000
    ramp = -torch.arange(1, vocab, dtype=torch.float32) * 1e-4
    logits = torch.cat([torch.tensor([8.0]), ramp]).unsqueeze(0)
    probs = torch.softmax(logits.double(), dim=-1)[0]
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    nucleus = set(order[before < top_p].tolist())
    p = SamplingParams(top_p=top_p)
    drawn = [Sampler().sample(logits, [p], [s], [0])[0] for s in range(400)]
    assert set(drawn) <= nucleus
    if len(nucleus) > 1024:  # the wide nucleus is sampled beyond the first window
        assert max(drawn) > 1024
    # the same draws whatever shares the batch (other rows take other paths)
    mates = [SamplingParams(temperature=0), SamplingParams(top_k=7), SamplingParams(top_p=0.5)]
    batch = torch.cat([logits, torch.randn(3, vocab)])
    for s in range(0, 400, 37):
        assert Sampler().sample(batch, [p, *mates], [s, 1, 2, 3], [0, 0, 0, 0])[0] == drawn[s]
