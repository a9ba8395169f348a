"""The generation engine: paged cache, continuous batching, fast path, long context, bad input, CLI, chat."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
import torch.nn.functional as F
from _infer_helpers import model, one_thread, prompts, reference_greedy, tokenizer

from llmlab.errors import LLMLabError
from llmlab.infer import LLM, PagedKVCache, SamplingParams
from llmlab.model import KVCache

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


# ----------------------------------------------------------------------------- cache and batching
def test_paged_cache_matches_contiguous_cache():
    """Same logits from the model over a paged and a contiguous cache, rows of different lengths."""
    m = model()
    cfg = m.cfg
    ps = prompts(3, seed=1)
    contiguous = [KVCache(cfg, 1, 64) for _ in ps]
    paged = PagedKVCache(cfg, num_blocks=40, block_size=4)
    for i in range(len(ps)):
        paged.add_sequence(i)
    with torch.no_grad():
        for i, p in enumerate(ps):  # prefill one at a time
            paged.set_batch([i])
            a = m(torch.tensor([p]), cache=paged)
            b = m(torch.tensor([p]), cache=contiguous[i])
            torch.testing.assert_close(a, b)
        nxt = [[p[-1]] for p in ps]
        for _ in range(5):  # batched decode over all three, each at its own length
            paged.set_batch([0, 1, 2])
            a = m(torch.tensor(nxt), cache=paged)[:, -1]
            b = torch.cat(
                [m(torch.tensor([n]), cache=c)[:, -1] for n, c in zip(nxt, contiguous, strict=True)]
            )
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            nxt = [[int(t)] for t in a.argmax(-1)]
    assert [paged.length(i) for i in range(3)] == [len(p) + 5 for p in ps]


@pytest.mark.parametrize("fast", [True, False])
def test_batched_generation_equals_one_at_a_time(fast):
    """Greedy outputs under continuous batching (requests joining/leaving, preemption) equal a plain loop."""
    m = model()
    ps = prompts(7, seed=2)
    want = [reference_greedy(m, p, 12) for p in ps]
    # Few batch slots and a pool too small for all: requests wait, join, leave and get preempted.
    llm = LLM.from_model(m, None, max_batch_size=4, block_size=4, num_blocks=14, fast=fast)
    lengths = [SamplingParams(max_tokens=12 - (i % 3)) for i in range(len(ps))]
    outs = llm.generate(ps, lengths)
    for out, w, p in zip(outs, want, lengths, strict=True):
        assert out.token_ids == w[: p.max_tokens]
        assert out.finish_reason == "length"
    assert llm.stats["preemptions"] > 0
    assert llm.cache.num_free_blocks == llm.cache.num_blocks


def test_fast_path_is_token_identical_and_tracks_weight_updates():
    for overrides in (
        {},
        {"qkv_bias": True, "sliding_window": 8},
        dict(norm="layernorm", norm_bias=True, ffn="gelu", activation="gelu_tanh", position="learned",
             qkv_bias=True, out_bias=True, mlp_bias=True, n_kv_heads=None),
    ):  # fmt: skip
        m = model(seed=3, **overrides)
        ps = prompts(3, seed=3)
        fast = LLM.from_model(m, None, block_size=4)
        assert fast.fast is not None
        slow = LLM.from_model(m, None, fast=False)
        a = fast.generate(ps, SamplingParams(max_tokens=15, logprobs=True))
        b = slow.generate(ps, SamplingParams(max_tokens=15, logprobs=True))
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        torch.testing.assert_close(
            torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), atol=1e-4, rtol=0
        )
    # An in-place weight update (an optimizer step) is picked up by the next generate.
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    assert [o.token_ids for o in fast.generate(ps)] == [o.token_ids for o in slow.generate(ps)]


def test_fused_optimizer_steps_are_seen_by_a_borrowed_engine():
    """Fused AdamW updates parameters without bumping their version counters; RL rollouts must still see
    the new weights (stale fused copies would silently make PPO/GRPO off-policy)."""
    m = model(seed=4)
    ps = prompts(2, seed=4)
    llm = LLM.from_model(m, None)
    llm.generate(ps, SamplingParams(max_tokens=4))  # builds the fused weights
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in m.parameters()]
    opt.step()
    assert [p._version for p in m.parameters()] == versions  # the reason for the explicit refresh
    got = llm.generate(ps, SamplingParams(max_tokens=6, logprobs=True))
    want = LLM.from_model(m, None, fast=False).generate(ps, SamplingParams(max_tokens=6, logprobs=True))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    torch.testing.assert_close(
        torch.tensor(got[0].logprobs), torch.tensor(want[0].logprobs), atol=1e-4, rtol=0
    )


def test_generating_from_a_training_policy_uses_eval_mode_and_restores_it():
    m = model(dropout=0.5)
    ps = prompts(2, seed=12)
    want = [reference_greedy(m, p, 8) for p in ps]  # model is in eval mode here
    m.train()
    llm = LLM.from_model(m, None)
    assert [o.token_ids for o in llm.generate(ps, SamplingParams(max_tokens=8))] == want  # no dropout
    assert m.training


def test_int8_and_int4_matmuls():
    from llmlab.infer.fast import linear, quantize_int4, quantize_int8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g)
    x = torch.randn(3, 128, generator=g)
    want = x @ w.t()
    for quant, tol in ((quantize_int8, 0.02), (quantize_int4, 0.12)):
        rel = float((linear(x, quant(w)) - want).norm() / want.norm())
        assert 1e-4 < rel < tol, (quant.__name__, rel)
    # A matrix already on GGUF Q4_1's grid (w = d * q + m per group of 32) is represented up to bf16 scales.
    d = torch.rand(96, 4, 1, generator=g) * 0.1 + 0.01
    m = torch.randn(96, 4, 1, generator=g) * 0.1
    q = torch.randint(0, 16, (96, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # each group spans the full range, as Q4_1 blocks do
    w4 = (d * q + m).view(96, 128)
    rel = float((linear(x, quantize_int4(w4)) - x @ w4.t()).norm() / (x @ w4.t()).norm())
    assert rel < 0.01
    assert len(quantize_int4(torch.randn(90, 128))) == 2  # 90 rows: the int4 kernel needs 16 | rows -> int8


@pytest.mark.parametrize("fmt,tol", [("int8", 0.08)])
def test_quantized_fast_path_stays_close_to_the_model(fmt, tol):
    m = model(seed=4, d_model=128, n_layers=2)
    ps = prompts(2, seed=4)
    exact = LLM.from_model(m, None).generate(ps, SamplingParams(max_tokens=12, logprobs=True))
    llm8 = LLM.from_model(m, None, fast=fmt)
    for p, e in zip(ps, exact, strict=True):
        # Score the exact model's greedy continuation with the int8 path: logits within a few percent.
        full = torch.tensor([p + e.token_ids])
        sid = llm8.scheduler.new_seq_id()
        llm8.cache.add_sequence(sid)
        got = llm8.runner.forward(full, [sid], last_only=False)[0]
        llm8.cache.free_sequence(sid)
        with torch.no_grad():
            want = m(full)[0]
        rel = float((got - want).norm() / want.norm())
        assert 1e-4 < rel < tol, rel  # the rounding is there, and small
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
        assert agree > 0.7 if fmt == "int8" else agree > 0.4
    assert (
        isinstance(llm8.fast.layers[0].qkv_w, tuple) and llm8.fast.layers[0].qkv_w[0].dtype != torch.float32
    )
    with pytest.raises(LLMLabError):
        LLM.from_model(m, None, fast="int3")


def test_no_block_leak_under_random_requests_and_cancellations():
    m = model()
    llm = LLM.from_model(m, None, max_batch_size=5, block_size=4, num_blocks=30)
    rng = random.Random(0)
    live: list[str] = []
    finished = 0
    for step in range(150):
        if rng.random() < 0.4:
            p = prompts(1, seed=step)[0]
            sp = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 1.0]), seed=step)
            live.append(llm.add_request(p, sp))
        if live and rng.random() < 0.15:
            llm.abort(live.pop(rng.randrange(len(live))))
        for out in llm.step():
            if out.finished:
                live.remove(out.request_id)
                finished += 1
    while llm.has_unfinished():
        finished += sum(o.finished for o in llm.step())
    assert finished > 20
    assert llm.cache.num_free_blocks == llm.cache.num_blocks and not llm.cache.seqs and not llm.requests


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    m = model()
    llm = LLM.from_model(m, None)
    p = prompts(4, seed=4)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=123)
    alone = llm.generate([p[0]], sp)[0].token_ids
    batched = llm.generate(p, [sp] + [SamplingParams(temperature=1.0, max_tokens=10)] * 3)[0].token_ids
    assert alone == batched
    other = llm.generate([p[0]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=124))[0]
    assert other.token_ids != alone


def test_logprobs_are_the_models_log_softmax():
    m = model()
    p = prompts(1, seed=5)[0]
    out = LLM.from_model(m, None).generate(
        [p], SamplingParams(temperature=1.0, max_tokens=8, seed=0, logprobs=True)
    )[0]
    full = torch.tensor([p + out.token_ids])
    with torch.no_grad():
        lp = F.log_softmax(m(full)[0, len(p) - 1 : -1], dim=-1)
    want = lp.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ text, stops, chat
def test_stop_strings_tokens_and_streaming():
    tok = tokenizer()
    m = model()
    llm = LLM.from_model(m, tok)
    base = llm.generate(["First Citizen:"], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.text) > 6
    # Pick a stop string that spans a token boundary of the generated text.
    ids = base.token_ids
    pieces = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    cut = next(
        i for i in range(2, len(ids)) if len(pieces[i]) - len(pieces[i - 1]) >= 1 and len(pieces[i - 1]) > 2
    )
    stop = pieces[cut][len(pieces[cut - 1]) - 2 : len(pieces[cut - 1]) + 1]
    out = llm.generate(["First Citizen:"], SamplingParams(max_tokens=30, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.index(stop)] and stop not in out.text
    assert out.token_ids == ids[: len(out.token_ids)]
    # Streaming deltas add up to the final text and never show part of the stop string.
    deltas = list(llm.stream("First Citizen:", SamplingParams(max_tokens=30, stop=[stop], ignore_eos=True)))
    assert "".join(d.delta_text for d in deltas) == out.text
    assert sum((d.delta_token_ids for d in deltas), []) == out.token_ids
    # A stop token id ends generation; the id stays in token_ids, not in the text.
    sid = ids[3]
    out = llm.generate(
        ["First Citizen:"], SamplingParams(max_tokens=30, stop_token_ids=[sid], ignore_eos=True)
    )[0]
    assert out.token_ids[-1] == sid and out.finish_reason == "stop" and out.stop_reason == sid
    assert out.token_ids == ids[: ids.index(sid) + 1]


def test_chat_prompt_and_session():
    from llmlab.infer.chat import ChatSession, run_chat

    tok = tokenizer()
    llm = LLM.from_model(model(), tok)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak."}]
    text, ids = llm.encode_prompt(msgs)
    assert text.endswith("<|im_start|>assistant\n") and ids.count(tok.token_to_id("<|im_start|>")) == 3
    a = llm.generate([msgs], SamplingParams(max_tokens=5))[0]
    assert a.token_ids == llm.generate([ids], SamplingParams(max_tokens=5))[0].token_ids
    session = ChatSession(llm, SamplingParams(max_tokens=5), system="Be brief.")
    reply = session.send("Speak.")
    assert session.history == [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": reply}]
    stdin = io.StringIO("hello\n/system You are terse.\nhi\n/reset\n/bogus\n/exit\n")
    stdout = io.StringIO()
    assert run_chat(llm, SamplingParams(max_tokens=4), None, stdin, stdout) == 0
    shown = stdout.getvalue()
    assert "system prompt set" in shown and "history cleared" in shown and "unknown command /bogus" in shown
    # ignore_eos guarantees the 4-token limit ends each reply, and the REPL says so rather than cutting silently
    stdout = io.StringIO()
    assert (
        run_chat(llm, SamplingParams(max_tokens=4, ignore_eos=True), None, io.StringIO("hi\n"), stdout) == 0
    )
    assert "cut at the max_tokens limit of 4" in stdout.getvalue()


# ------------------------------------------------------------------------------------ bad input
def test_bad_requests_raise_and_the_engine_keeps_serving():
    m = model()
    llm = LLM.from_model(m, None)
    good = prompts(3, seed=6)
    too_long = list(range(5, 5 + m.cfg.max_seq_len))
    bad = [  # SamplingParams are checked on construction, so each is built inside pytest.raises
        (too_long, {}),
        (good[0], {"max_tokens": 0}),
        (good[0], {"top_p": 1.5}),
        (good[0], {"temperature": -1.0}),
        (good[0], {"stop_token_ids": [m.cfg.vocab_size + 5]}),
        ([], {}),
        ([m.cfg.vocab_size], {}),
    ]
    for p, kw in bad:
        with pytest.raises(LLMLabError):
            llm.generate(good + [p], [SamplingParams()] * 3 + [SamplingParams(**kw)])  # nothing runs
        assert not llm.has_unfinished()
    # Scheduler path: the bad request is refused alone; the good ones queued around it finish.
    ids = [llm.add_request(good[0], SamplingParams(max_tokens=6))]
    with pytest.raises(LLMLabError, match="context"):
        llm.add_request(too_long)
    ids.append(llm.add_request(good[1], SamplingParams(max_tokens=6)))
    done = {}
    while llm.has_unfinished():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    assert sorted(done) == sorted(ids) and all(len(o.token_ids) == 6 for o in done.values())
    with pytest.raises(LLMLabError, match="max_batchsize"):
        LLM.from_model(m, None, max_batchsize=4)
    with pytest.raises(LLMLabError, match="prompt 1"):
        llm.generate([good[0], "text needs a tokenizer"])


# ------------------------------------------------------------------------------ GQA and long context
def test_kv_memory_report_matches_allocation():
    for kv_heads, dtype in ((1, torch.float32), (2, torch.bfloat16), (4, torch.float32)):
        m = model(n_kv_heads=kv_heads)
        llm = LLM.from_model(m, None, dtype=dtype, num_blocks=10, block_size=8)
        r = llm.memory_report()
        want = 2 * m.cfg.n_layers * kv_heads * m.cfg.dim_head * (2 if dtype == torch.bfloat16 else 4)
        assert r["kv_bytes_per_token"] == want == r["kv_bytes_per_token_measured"]
        assert llm.cache.k.shape[-2] == kv_heads  # only the KV heads are stored


def test_attention_sinks_bound_memory_far_past_the_context():
    m = model(max_seq_len=32)
    llm = LLM.from_model(m, None, attention_sinks=(4, 16), block_size=4, max_batch_size=2)
    p = prompts(2, seed=7, lo=10, hi=20)
    rids = [llm.add_request(q, SamplingParams(max_tokens=4 * 32, ignore_eos=True)) for q in p]
    peak, outs = 0, {}
    while llm.has_unfinished():
        for o in llm.step():
            outs[o.request_id] = o
        peak = max(peak, llm.cache.num_blocks - llm.cache.num_free_blocks)
        assert all(llm.cache.length(r.seq_id) <= 4 + 16 + 4 for r in llm.running)
    assert all(len(outs[r].token_ids) == 128 for r in rids)
    assert peak <= 2 * (1 + 16 // 4 + 1)  # per sequence: the sink block, the window, one block of slack
    assert llm.cache.num_free_blocks == llm.cache.num_blocks
    # Before the first eviction the rolling cache is the plain cache: same tokens.
    short = SamplingParams(max_tokens=8)
    plain = LLM.from_model(m, None).generate(p, short)
    assert [o.token_ids for o in llm.generate(p, short)] == [o.token_ids for o in plain]


def test_evicted_keys_are_rerotated_to_their_cache_positions():
    """After evictions, the cached layer-0 keys equal keys computed fresh at the new positions."""
    m = model(max_seq_len=64)
    cache = PagedKVCache(m.cfg, 20, 4, sinks=(4, 8), rope_inv_freq=m.rotary.inv_freq)
    cache.add_sequence(0)
    cache.set_batch([0])
    toks = prompts(1, seed=8, lo=30, hi=31)[0]
    with torch.no_grad():
        for t in toks:
            m(torch.tensor([[t]]), cache=cache)
        seq = cache.seqs[0]
        assert seq.evicted > 0 and seq.length < len(toks)
        kept = toks[:4] + toks[4 + seq.evicted :]
        attn = m.layers[0].self_attn
        h = m.layers[0].input_layernorm(m.embed_tokens(torch.tensor([kept])))
        k = attn.k_proj(h).view(1, len(kept), attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        cos, sin = m.rotary(torch.arange(len(kept))[None])
        from llmlab.model.rope import apply_rope

        want = apply_rope(k, cos, sin)[0].transpose(0, 1)  # [T, kv, hd]
        got = cache.k[0, cache._slots(seq, 0, seq.length)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_scaling_override_runs_past_the_context():
    import dataclasses

    from llmlab.model import RopeScaling, Transformer

    m = model(max_seq_len=32)
    scaled = Transformer(dataclasses.replace(m.cfg, rope_scaling=RopeScaling("yarn", 4.0, 32))).eval()
    scaled.load_state_dict(m.state_dict())
    llm = LLM.from_model(m, None, rope_scaling={"type": "yarn", "factor": 4.0})
    assert llm.max_model_len == 128
    p = prompts(1, seed=9, lo=20, hi=21)[0]
    out = llm.generate([p], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 100  # 120 tokens in a 32-token model
    assert out.token_ids == reference_greedy(scaled, p, 100)
    with pytest.raises(LLMLabError):
        LLM.from_model(model(), None, rope_scaling={"type": "bogus", "factor": 2})


def windowed_greedy(m, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from full forwards with no cache: the model's own windowed mask over everything."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_sliding_window_matches_full_forward():
    m = model()
    llm = LLM.from_model(m, None, sliding_window=6, block_size=4)
    assert m.cfg.sliding_window == 6
    p = prompts(2, seed=10, lo=12, hi=14)
    outs = llm.generate(p, SamplingParams(max_tokens=10))
    for q, o in zip(p, outs, strict=True):
        assert o.token_ids == windowed_greedy(m, q, 10)


def test_sliding_window_frees_blocks_outside_the_window():
    """Mistral-style window without sinks: blocks no query can see go back to the pool as decoding runs,
    so memory stays bounded by the window, and the tokens still equal full windowed forwards."""
    window, bs = 8, 4
    m = model(max_seq_len=96)
    llm = LLM.from_model(m, None, sliding_window=window, block_size=bs, max_batch_size=2, prefill_chunk=8)
    # Different prompt lengths: the rows free different numbers of blocks (the per-row mask path), and a
    # 30-token prompt is prefilled in 8-token chunks that free blocks as they go.
    ps = [prompts(1, seed=12, lo=30, hi=31)[0], prompts(1, seed=13, lo=5, hi=6)[0]]
    rids = [llm.add_request(q, SamplingParams(max_tokens=40, ignore_eos=True)) for q in ps]
    outs, peak_live, most_dropped = {}, 0, 0
    while llm.has_unfinished():
        for o in llm.step():
            outs[o.request_id] = o
        for r in llm.running:
            seq = llm.cache.seqs[r.seq_id]
            peak_live, most_dropped = max(peak_live, len(seq.blocks)), max(most_dropped, seq.dropped)
            assert seq.dropped * bs <= max(0, seq.length - window + 1)  # only unreachable keys were freed
    assert most_dropped >= 10  # ~70 tokens: all but the last few blocks were freed
    assert peak_live <= -(-(window + 1) // bs) + 1  # window + the new token, plus block alignment
    for rid, q in zip(rids, ps, strict=True):
        assert outs[rid].token_ids == windowed_greedy(m, q, 40)
    assert llm.cache.num_free_blocks == llm.cache.num_blocks  # nothing leaked
    # A pool far smaller than the sequences: it still runs, because only the window is held.
    small = LLM.from_model(m, None, sliding_window=window, block_size=bs, num_blocks=6, prefill_chunk=4)
    out = small.generate([ps[0]], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert out.token_ids == outs[rids[0]].token_ids and out.finish_reason == "length"


def test_sliding_window_with_speculative_rollback():
    """Prompt-lookup drafts are verified and rolled back on a windowed cache without touching freed blocks."""
    m = model(max_seq_len=96)
    q = prompts(1, seed=14, lo=6, hi=7)[0] * 4  # repetitive: prompt lookup finds drafts
    llm = LLM.from_model(
        m, None, sliding_window=8, block_size=4, speculative={"method": "ngram", "num_tokens": 3}
    )
    out = llm.generate([q], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert out.token_ids == windowed_greedy(m, q, 30)
    assert llm.speculative.stats["proposed"] > 0
    assert llm.cache.num_free_blocks == llm.cache.num_blocks


# ------------------------------------------------------------------------------------------- CLI
def test_cli_generate_and_errors(tmp_path, capsys):
    from llmlab.cli import main
    from llmlab.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt", model(), tokenizer())
    (tmp_path / "p.txt").write_text("First Citizen:\n\nAll: Speak\n")
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "All:"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    args = [
        "generate",
        str(ckpt),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--out",
        str(out),
        "--max-tokens",
        "5",
    ]
    assert main(args + ["--temperature", "0.8", "--seed", "1", "--set", "top_k=20", "--logprobs"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["First Citizen:", "All: Speak"]
    assert all(len(r["token_ids"]) == len(r["logprobs"]) <= 5 for r in rows)
    assert main(["generate", str(ckpt), "--prompts", str(tmp_path / "p.jsonl"), "--max-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    assert main(["generate", str(ckpt), "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["generate", str(ckpt), "--prompt", "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", str(ckpt), "--prompt", "hi", "--set", "tempreature=1"]) == 2
    assert "tempreature" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_chat_matches_transformers_and_quantized_paths_agree(smollm2_gguf):
    """The real SmolLM2-135M-Instruct GGUF: engine greedy == transformers greedy on the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmlab.interop.hf import config_to_hf, state_to_hf

    llm = LLM(smollm2_gguf)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.generate([msgs], SamplingParams(max_tokens=16))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
    m = llm.model
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_to_hf(m.cfg))).eval()
    hf.load_state_dict(state_to_hf(m.state_dict(), m.cfg), strict=False)
    hf.tie_weights()
    ids = torch.tensor([out.prompt_token_ids])
    with torch.no_grad():
        ref = hf.generate(
            ids, max_new_tokens=len(out.token_ids), do_sample=False, attention_mask=torch.ones_like(ids)
        )
    assert out.token_ids == ref[0, ids.shape[1] :].tolist()
    for fmt in ("int8", "int4"):
        q = LLM.from_model(m, llm.tokenizer, fast=fmt).generate([msgs], SamplingParams(max_tokens=16))[0]
        assert "Paris" in q.text
