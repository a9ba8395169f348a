"""Speculative decoding: the acceptance rule keeps the target's distribution; greedy output is unchanged."""

from __future__ import annotations

import pytest
import torch
from _infer_helpers import model, one_thread, prompts, reference_greedy

from llmlab.errors import LLMLabError
from llmlab.infer import LLM, SamplingParams
from llmlab.infer.speculative import ngram_propose, verify

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def _dist(seed: int, rows: int, V: int, sharp: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, V, generator=g) * sharp, dim=-1)


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_rule_preserves_the_target_distribution(deterministic):
    """Joint law of the first two emitted tokens equals the target's, whatever the proposer."""
    V, N = 5, 12_000
    p = _dist(0, 3, V)  # target at positions 1, 2 and the bonus position 3
    q = _dist(1, 2, V)  # a proposer that disagrees with the target
    g = torch.Generator().manual_seed(2)
    joint = torch.zeros(V, V)
    first_accept = 0
    for _ in range(N):
        if deterministic:  # prompt-lookup style: fixed drafts, q is a point mass
            drafts, qq = [int(p[0].argsort()[-2]), int(p[1].argsort()[-2])], None
        else:
            drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
            qq = q
        n, nxt = verify(p, qq, drafts, g, greedy=False)
        first_accept += n > 0
        out = drafts[:n] + [nxt]
        if len(out) >= 2:
            joint[out[0], out[1]] += 1
        else:
            # The second token would come from a fresh target step at position 2: sample it from p[1].
            joint[out[0], int(torch.multinomial(p[1], 1, generator=g))] += 1
    # The target's joint law: p1(a) * p2(b) (the toy target ignores history).
    want = p[0][:, None] * p[1][None, :]
    assert _tv(joint.flatten(), want.flatten()) < 0.03  # sampling noise is about 0.013
    # Chi-square goodness of fit on the first token (4 degrees of freedom: p=0.001 critical value 18.5).
    first = joint.sum(1)
    chi2 = float(((first - N * p[0]) ** 2 / (N * p[0])).sum())
    assert chi2 < 18.5
    # Sanity: the proposer is really being rejected sometimes and accepted sometimes.
    assert 0.05 * N < first_accept < 0.95 * N
    # A proposer equal to the target is always accepted.
    n, _ = verify(p, p[:2], [0, 1], g, greedy=False)
    assert n == 2


def test_greedy_verify_and_ngram_lookup():
    p = torch.eye(4)[[2, 1, 3]]
    assert verify(p, None, [2, 1], None, greedy=True) == (2, 3)
    assert verify(p, None, [2, 0], None, greedy=True) == (1, 1)
    assert ngram_propose([5, 6, 7, 8, 1, 5, 6], k=3) == [7, 8, 1]
    assert ngram_propose([1, 2, 3, 9, 2, 3], k=2, n_max=2) == [9, 2]
    assert ngram_propose([1, 2, 3, 4], k=2) == []


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_greedy_output_equals_the_target_alone(method):
    target = model(seed=0)
    # A draft that mostly agrees with the target: the target with noise on its weights.
    draft = model(seed=0)
    with torch.no_grad():
        for prm in draft.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    ps = [p * 3 for p in prompts(3, seed=11, lo=4, hi=8)]  # repetitive prompts give prompt lookup matches
    spec = {"method": method, "num_tokens": 4, "draft_model": draft if method == "draft" else None}
    llm = LLM.from_model(target, None, speculative=spec)
    outs = llm.generate(ps, SamplingParams(max_tokens=20))
    for p, o in zip(ps, outs, strict=True):
        assert o.token_ids == reference_greedy(target, p, 20)
    s = llm.speculative.stats
    assert s["proposed"] > 0 and s["accepted"] > 0  # the comparison went through accepted drafts
    assert llm.cache.num_free_blocks == llm.cache.num_blocks


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_streams_and_batches_with_preemption(method):
    """Speculation is the engine's decode step: a streamed request and queued ones share the batch, a pool
    too small for all of them forces preemptions, and every output still equals the target's greedy alone,
    with no block left behind in the target's or the draft's pool."""
    target = model(seed=0)
    draft = model(seed=0)
    with torch.no_grad():
        for prm in draft.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    ps = [p * 3 for p in prompts(4, seed=12, lo=4, hi=8)]
    spec = {"method": method, "num_tokens": 3, "draft_model": draft if method == "draft" else None}
    llm = LLM.from_model(target, None, speculative=spec, block_size=4, num_blocks=18, max_batch_size=4)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    rids = [llm.add_request(p, sp) for p in ps[:2]]
    done, streamed, steps = {}, [], 0
    while llm.has_unfinished():
        for o in llm.step():
            if o.request_id == rids[0]:
                streamed += o.delta_token_ids  # what a stream of the first request shows
            if o.finished:
                done[o.request_id] = o.token_ids
        steps += 1
        if steps == 3:  # requests join a running batch
            rids += [llm.add_request(p, sp) for p in ps[2:]]
    for rid, p in zip(rids, ps, strict=True):
        assert done[rid] == reference_greedy(target, p, 24)
    assert streamed == done[rids[0]]
    assert llm.stats["preemptions"] > 0  # 4 x ~45 tokens do not fit 72 slots at once
    assert llm.speculative.stats["accepted"] > 0
    assert llm.cache.num_free_blocks == llm.cache.num_blocks
    if method == "draft":
        dc = llm.speculative.draft.cache
        assert dc.num_free_blocks == dc.num_blocks and not dc.seqs


def test_speculative_sampling_matches_the_targets_next_token_distribution():
    """End to end, with a real draft model on a tiny vocabulary and 400 requests batched together: the
    first speculative token (the second generated; the first comes from the prefill) ~ the target's."""
    V = 12
    target = model(seed=1, vocab_size=V, init_std=0.3)
    draft = model(seed=2, vocab_size=V, init_std=0.3)
    prompt = [3, 5, 7, 2]
    with torch.no_grad():  # marginal of token 2: sum over token 1 of p(t1) p(t2 | t1), target and draft
        first = torch.softmax(target(torch.tensor([prompt]))[0, -1], dim=-1)
        ctx = torch.tensor([prompt + [t] for t in range(V)])
        want = first @ torch.softmax(target(ctx)[:, -1], dim=-1)
        q = first @ torch.softmax(draft(ctx)[:, -1], dim=-1)
    llm = LLM.from_model(
        target,
        None,
        max_batch_size=16,
        speculative={"method": "draft", "draft_model": draft, "num_tokens": 3},
    )
    N = 400
    outs = llm.generate(
        [prompt] * N, [SamplingParams(temperature=1.0, max_tokens=3, seed=i) for i in range(N)]
    )
    counts = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=V).float()
    assert 0.5 * float((q - want).abs().sum()) > 0.3  # the draft alone would be far off
    assert _tv(counts, want) < 0.1  # sampling noise at N=400 is about 0.05
    assert 0 < llm.speculative.acceptance_rate < 1
    assert llm.cache.num_free_blocks == llm.cache.num_blocks
    assert llm.speculative.draft.cache.num_free_blocks == llm.speculative.draft.cache.num_blocks


def test_speculative_config_errors():
    with pytest.raises(LLMLabError):
        LLM.from_model(model(), None, speculative={"method": "draft"})
    with pytest.raises(LLMLabError):
        LLM.from_model(model(), None, speculative={"method": "medusa"})
    with pytest.raises(LLMLabError, match="sinks"):
        LLM.from_model(model(), None, speculative="ngram", attention_sinks=(4, 16))
