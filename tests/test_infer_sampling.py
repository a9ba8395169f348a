"""Sampling filters against transformers' logits processors; penalties; seeds; stop-string helpers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmlab.errors import LLMLabError
from llmlab.infer.sampling import (
    SamplingParams,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    find_stop,
    process_logits,
    sample_from,
    stop_prefix_len,
)


def _logits(seed: int, B: int = 4, V: int = 257) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3


@pytest.mark.parametrize("seed", range(3))
def test_filters_match_transformers(seed):
    x = _logits(seed)
    ids = torch.randint(0, x.shape[-1], (x.shape[0], 12), generator=torch.Generator().manual_seed(seed))
    cases = [
        (apply_temperature(x, 0.7), TemperatureLogitsWarper(0.7)(ids, x.clone())),
        (apply_top_k(x, 13), TopKLogitsWarper(13)(ids, x.clone())),
        (apply_top_p(x, 0.8), TopPLogitsWarper(0.8)(ids, x.clone())),
        (apply_top_p(x, 0.05), TopPLogitsWarper(0.05)(ids, x.clone())),
        (apply_min_p(x, 0.1), MinPLogitsWarper(0.1)(ids, x.clone())),
        (apply_repetition_penalty(x, ids, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone())),
        (apply_repetition_penalty(x, ids, 0.8), RepetitionPenaltyLogitsProcessor(0.8)(ids, x.clone())),
    ]
    for ours, theirs in cases:
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        finite = ~torch.isinf(theirs)
        torch.testing.assert_close(ours[finite], theirs[finite])
    # Each filter really filters (so the comparison above is not vacuous).
    assert torch.isinf(apply_top_p(x, 0.8)).any() and torch.isinf(apply_min_p(x, 0.1)).any()


def test_presence_frequency_are_openai_semantics():
    x = torch.zeros(1, 6)
    counts = torch.tensor([[0, 1, 3, 0, 0, 2]])
    out = apply_presence_frequency(x, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0, 0.0, -1.0]]
    # process_logits counts only *generated* tokens for these penalties, the prompt too for repetition.
    p = SamplingParams(presence_penalty=1.0)
    assert process_logits(torch.zeros(6), p, prompt_ids=[1], output_ids=[2, 2]).tolist() == [
        [0, 0, -1, 0, 0, 0]
    ]
    r = SamplingParams(repetition_penalty=2.0)
    assert process_logits(torch.tensor([1.0, -1.0, 1.0]), r, [0], [1]).tolist() == [[0.5, -2.0, 1.0]]


def test_greedy_and_seeded_sampling():
    x = _logits(7, B=1)
    assert sample_from(process_logits(x, SamplingParams()), SamplingParams(), None) == int(x.argmax())
    p = SamplingParams(temperature=1.0, top_k=50)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_from(process_logits(x, p), p, g) for _ in range(20)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    # top_k=1 sampling is greedy whatever the temperature.
    p1 = SamplingParams(temperature=5.0, top_k=1)
    assert sample_from(process_logits(x, p1), p1, torch.Generator().manual_seed(0)) == int(x.argmax())


def test_stop_string_helpers():
    # A stop string completed by the newest text, spanning the old/new boundary.
    assert find_stop("hello wor", ["world"], search_from=7) == -1
    assert find_stop("hello world!", ["world"], search_from=9) == 6
    assert find_stop("ab STOP cd STOP", ["STOP", "cd"], search_from=0) == 3
    assert stop_prefix_len("the end of Wo", ["World"]) == 2
    assert stop_prefix_len("nothing", ["World"]) == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"max_tokens": 0},
        {"max_tokens": -3},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"temperature": -0.1},
        {"stop_token_ids": [10_000]},
        {"stop_token_ids": [-1]},
        {"top_k": -1},
        {"stop": [""]},
    ],
)
def test_bad_parameters_raise(kw):
    with pytest.raises(LLMLabError, match="sampling parameter"):
        SamplingParams(**kw).validate(vocab_size=300)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1e-300},  # logits / T overflow to +-inf
        {"temperature": 0.7, "repetition_penalty": 4e-43},  # seen positive logits / penalty overflow
    ],
)
def test_overflowing_logits_fall_back_to_the_limit_distribution(kw):
    """Extreme but valid parameters used to make ``torch.multinomial`` raise on a NaN row; the limit of the
    distribution is the argmax, and a whole engine run must finish."""
    from llmlab.infer import LLM
    from tests._infer_helpers import model, prompts, tokenizer

    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    params = SamplingParams(**kw, seed=0)
    processed = process_logits(logits, params, prompt_ids=[1, 2])
    assert sample_from(processed, params, torch.Generator().manual_seed(0)) == 1

    for speculative in (None, {"method": "ngram", "num_tokens": 3}):  # the verify rule draws from p too
        llm = LLM.from_model(model(), tokenizer(), speculative=speculative)
        outs = llm.generate(prompts(3), SamplingParams(**kw, max_tokens=6, ignore_eos=True))
        assert [len(o.token_ids) for o in outs] == [6, 6, 6]
