"""The engine's seams: SamplingParams checks, top log-probs, logits processors, prefix caching, stats, abort,
and quantized checkpoints on the fast path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _infer_helpers import model, one_thread, prompts, reference_greedy, tokenizer

from llmlab.errors import LLMLabError
from llmlab.infer import LLM, SamplingParams
from llmlab.model.checkpoint import save_checkpoint

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


# ------------------------------------------------------------------------------ SamplingParams
@pytest.mark.parametrize(
    "kw,field",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": None}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": "1"}, "seed"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs_mode": "softmax"}, "logprobs_mode"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logits_processors": [1]}, "logits_processors"),
    ],
)
def test_sampling_params_are_checked_on_construction(kw, field):
    with pytest.raises(LLMLabError, match=f"sampling parameter '{field}'"):
        SamplingParams(**kw)


def test_sampling_params_processors_are_not_data():
    def proc(ids, row):
        return row

    a = SamplingParams(temperature=0.5, logits_processors=[proc])
    assert a == SamplingParams(temperature=0.5)  # processors are code: not compared
    assert "logits_processors" not in a.to_dict() and a.to_dict()["temperature"] == 0.5
    assert "proc" not in repr(a)


# ----------------------------------------------------------------------- log-probs, processors
def test_top_logprobs_are_the_models_top_k():
    m = model()
    p = prompts(1, seed=5)[0]
    out = LLM.from_model(m, None).generate([p], SamplingParams(max_tokens=6, top_logprobs=3))[0]
    with torch.no_grad():
        lp = F.log_softmax(m(torch.tensor([p + out.token_ids]))[0, len(p) - 1 : -1], dim=-1)
    top = lp.topk(3, dim=-1)
    assert out.logprobs is not None and len(out.top_logprobs) == len(out.token_ids) == 6
    for i, d in enumerate(out.top_logprobs):
        assert list(d) == top.indices[i].tolist()  # most likely first
        torch.testing.assert_close(torch.tensor(list(d.values())), top.values[i], atol=1e-4, rtol=0)
        assert out.token_ids[i] == next(iter(d))  # greedy picked the top one
    torch.testing.assert_close(torch.tensor(out.logprobs), top.values[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_logits_processors_see_the_history_and_steer_greedy(speculative):
    m = model()
    p = prompts(1, seed=6)[0] * 3  # repetitive: prompt lookup would find drafts
    seen: list[list[int]] = []

    def only_odd_ids(ids: list[int], row: torch.Tensor) -> torch.Tensor:
        seen.append(list(ids))
        row[0::2] = float("-inf")  # in place: allowed
        return row

    llm = LLM.from_model(m, None, speculative=speculative)
    out = llm.generate([p], SamplingParams(max_tokens=8, logits_processors=[only_odd_ids], logprobs=True))[0]
    assert all(t % 2 == 1 for t in out.token_ids)
    assert seen == [out.token_ids[:i] for i in range(8)]  # one call per token, with the tokens so far
    with torch.no_grad():  # raw logprobs are the model's own, untouched by the in-place edit
        first = F.log_softmax(m(torch.tensor([p]))[0, -1], dim=-1)[out.token_ids[0]]
    assert abs(out.logprobs[0] - float(first)) < 1e-4
    if speculative:
        assert llm.stats["spec_draft_tokens"] == 0  # requests with processors take no drafts
    plain = LLM.from_model(m, None).generate([p], SamplingParams(max_tokens=8))[0]
    assert plain.token_ids == reference_greedy(m, p, 8)  # other requests are unaffected


# ---------------------------------------------------------------------------------- prefix cache
def _shared_prefix_prompts() -> list[list[int]]:
    system = prompts(1, seed=20, lo=21, hi=22)[0]  # 21 shared tokens: 5 full blocks of 4
    return [system + tail for tail in prompts(6, seed=21, lo=2, hi=7)]


def test_prefix_caching_keeps_greedy_outputs_and_counts_hits(tmp_path):
    m = model()
    ps = _shared_prefix_prompts()
    want = [reference_greedy(m, p, 10) for p in ps]
    sp = SamplingParams(max_tokens=10)
    # A pool too small for all six at once: requests wait, get preempted and come back.
    for caching in (False, True):
        llm = LLM.from_model(
            m, None, block_size=4, num_blocks=14, max_batch_size=4, enable_prefix_caching=caching
        )
        rids = [llm.add_request(ps[0], sp)]
        done = {}
        while llm.has_unfinished():
            done.update({o.request_id: o for o in llm.step() if o.finished})
            if len(rids) == 1:  # the rest arrive while the first runs: its prefix blocks are cached
                rids += [llm.add_request(p, sp) for p in ps[1:]]
        assert [done[r].token_ids for r in rids] == want
        s = llm.stats
        assert s["preemptions"] > 0 and s["kv_blocks_used"] == 0
        if caching:
            assert s["prefix_cache_hits"] >= 5 * 20 and s["prefix_cache_queries"] >= sum(map(len, ps))
            assert s["kv_blocks_cached"] > 0 and llm.runner.prefill_tokens < sum(map(len, ps))
            assert min(done[r].num_cached_tokens for r in rids[1:]) >= 20  # the shared 5 blocks
        else:
            assert s["prefix_cache_hits"] == 0 and s["kv_blocks_cached"] == 0
    # A later turn of a chat reuses the earlier turn's prompt and reply. (An engine over a borrowed model
    # forgets its cache whenever it goes idle, as the model may be trained in between: load one.)
    llm = LLM(save_checkpoint(tmp_path / "ckpt", m, tokenizer()), block_size=4, enable_prefix_caching=True)
    first = llm.generate([ps[0]], sp)[0]
    hits = llm.stats["prefix_cache_hits"]
    second = llm.generate([ps[0] + first.token_ids + [7, 8, 9]], sp)[0]
    assert llm.stats["prefix_cache_hits"] - hits >= 28
    assert second.token_ids == reference_greedy(m, ps[0] + first.token_ids + [7, 8, 9], 10)


def test_cached_blocks_are_evicted_lru_when_the_pool_is_short(tmp_path):
    m = model()
    ckpt = save_checkpoint(tmp_path / "ckpt", m, tokenizer())
    llm = LLM(ckpt, block_size=4, num_blocks=12, enable_prefix_caching=True)
    ps = prompts(6, seed=30, lo=17, hi=18)  # 4 full blocks each: the pool caches at most 3 prompts
    outs = [llm.generate([p], SamplingParams(max_tokens=3))[0] for p in ps]
    assert [o.token_ids for o in outs] == [reference_greedy(m, p, 3) for p in ps]
    assert llm.stats["kv_blocks_used"] == 0 and 0 < llm.stats["kv_blocks_cached"] <= 12
    hits = llm.stats["prefix_cache_hits"]
    llm.generate([ps[-1]], SamplingParams(max_tokens=3))  # the newest prompt is still cached
    assert llm.stats["prefix_cache_hits"] - hits == 16
    hits = llm.stats["prefix_cache_hits"]
    llm.generate([ps[0]], SamplingParams(max_tokens=3))  # the oldest was evicted
    assert llm.stats["prefix_cache_hits"] == hits


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_prefix_caching_with_speculative_rollback_and_preemption(method):
    """Drafts are written past the committed tokens and rolled back: such rows must never be cached."""
    m = model()
    ps = [p * 3 for p in prompts(4, seed=12, lo=4, hi=8)]
    spec = {"method": method, "num_tokens": 3, "draft_model": model(seed=1) if method == "draft" else None}
    llm = LLM.from_model(
        m, None, speculative=spec, block_size=4, num_blocks=24, max_batch_size=4, enable_prefix_caching=True
    )
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    rids = [llm.add_request(p, sp) for p in ps + ps[:2]]  # the repeats hit the cache
    done = {}
    while llm.has_unfinished():
        done.update({o.request_id: o.token_ids for o in llm.step() if o.finished})
    assert [done[r] for r in rids] == [reference_greedy(m, p, 24) for p in ps + ps[:2]]
    s = llm.stats
    assert s["preemptions"] > 0 and s["prefix_cache_hits"] > 0 and s["spec_accepted_tokens"] > 0
    assert s["kv_blocks_used"] == 0


def test_prefix_caching_refuses_windowed_caches():
    with pytest.raises(LLMLabError, match="prefix caching"):
        LLM.from_model(model(), None, sliding_window=8, enable_prefix_caching=True)


# ------------------------------------------------------------------------------- abort and stats
@pytest.mark.parametrize("caching", [False, True])
def test_abort_frees_blocks_at_once(caching):
    llm = LLM.from_model(model(), None, block_size=4, enable_prefix_caching=caching)
    ps = _shared_prefix_prompts()[:3]
    rids = [llm.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in ps]
    for _ in range(3):
        llm.step()
    s = llm.stats
    assert s["num_running"] == 3 and s["kv_blocks_used"] > 0 and 0 < s["kv_cache_usage"] < 1
    llm.abort(rids[0])
    assert llm.stats["num_running"] == 2 and llm.stats["kv_blocks_used"] < s["kv_blocks_used"]
    llm.add_request(ps[0], SamplingParams(max_tokens=5))  # between steps, from the same thread
    for rid in rids[1:]:
        llm.abort(rid)
    llm.abort("no-such-request")  # ignored
    while llm.has_unfinished():
        llm.step()
    s = llm.stats
    assert s["kv_blocks_used"] == 0 and s["num_running"] == s["num_waiting"] == 0
    assert (s["kv_blocks_cached"] > 0) == caching
    assert s["kv_capacity_tokens"] == llm.cache.num_blocks * 4
    assert s["prompt_tokens_total"] == sum(map(len, ps)) + len(ps[0])
    assert s["generation_tokens_total"] >= 3 * 3 + 5


def test_speculative_stats():
    m = model()
    q = prompts(1, seed=14, lo=6, hi=7)[0] * 4
    llm = LLM.from_model(m, None, speculative={"method": "ngram", "num_tokens": 3})
    out = llm.generate([q], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    s = llm.stats
    assert s["spec_draft_tokens"] > 0 and 0 < s["spec_accepted_tokens"] <= s["spec_draft_tokens"]
    assert s["spec_acceptance_rate"] == s["spec_accepted_tokens"] / s["spec_draft_tokens"]
    assert 1.0 <= s["spec_mean_accepted_len"] <= 4.0
    assert s["generation_tokens_total"] == len(out.token_ids) == 30


# --------------------------------------------------------------------------- quantized checkpoints
def _quantized(tmp_path, m, **cfg):
    from llmlab.quant import QuantConfig, quantize_model, save_quantized

    q = copy.deepcopy(m)
    quantize_model(q, QuantConfig(**cfg), progress=False)
    return save_quantized(tmp_path / cfg["scheme"], q, None, QuantConfig(**cfg))


def test_quantized_checkpoints_run_on_the_fast_kernels(tmp_path):
    m = model(seed=4, d_model=128, n_layers=2)
    ps = prompts(3, seed=4)
    sp = SamplingParams(max_tokens=12)
    # int8: the checkpoint's codes are the fast path's own int8 rounding, so the tokens are identical.
    llm8 = LLM(_quantized(tmp_path, m, scheme="int8"))
    got = llm8.generate(ps, sp)
    assert llm8.fast.weights == "int8" and llm8.fast.layers[0].qkv_w[0].dtype == torch.int8
    want = LLM.from_model(m, None, fast="int8").generate(ps, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # int4: packed from the checkpoint's codes, zero points and group size. The kernel takes bf16
    # activations (the checkpoint's own forward dequantizes to fp32), so compare logits, as for int8 above.
    path4 = _quantized(tmp_path, m, scheme="int4", group_size=64)
    llm4 = LLM(path4)
    slow = LLM(path4, fast=False)
    assert slow.fast is None
    for p, o in zip(ps, slow.generate(ps, sp), strict=True):
        full = torch.tensor([p + o.token_ids])
        sid = llm4.scheduler.new_seq_id()
        llm4.cache.add_sequence(sid)
        got4 = llm4.runner.forward(full, [sid], last_only=False)[0]
        llm4.cache.free_sequence(sid)
        with torch.no_grad():
            want4 = slow.model(full)[0]
        assert float((got4 - want4).norm() / want4.norm()) < 0.03  # bf16 activations, int8 LM head
        assert (got4.argmax(-1) == want4.argmax(-1)).float().mean() > 0.9
    assert llm4.fast.weights == "int4" and llm4.fast.layers[0].qkv_w[3] == 64
    # Asking for another format is not silently ignored.
    with pytest.warns(UserWarning, match="already int4-quantized"):
        LLM(path4, fast="int8")


def test_quantized_layers_without_a_kernel_warn_and_run_dequantized(tmp_path):
    m = model(seed=4, d_model=128, n_layers=2)
    path = _quantized(tmp_path, m, scheme="nf4")
    with pytest.warns(UserWarning, match="dequantized"):
        llm = LLM(path)
    ps = prompts(2, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once, at construction
        got = llm.generate(ps, SamplingParams(max_tokens=8))
    want = LLM(path, fast=False).generate(ps, SamplingParams(max_tokens=8))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
