"""Medusa heads: decoding through them keeps the target's greedy output and sampled distribution, inside
continuous batching; the heads' files round-trip; heads for another base are refused; the training loss and
targets follow their formulas; ``llmlab medusa`` trains, saves and checks end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _infer_helpers import model, one_thread, prompts, reference_greedy

from llmlab.errors import LLMLabError
from llmlab.infer import LLM, SamplingParams
from llmlab.medusa.data import head_targets
from llmlab.medusa.heads import CONFIG_FILE, heads_for, load_heads, save_heads
from llmlab.medusa.loss import chain_scores, medusa_loss, topk_hits
from llmlab.medusa.tree import build_tree, tree_tokens

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


PROMPTS = prompts(4, seed=12, lo=4, hi=8)


def oracle_heads(target, num_heads: int = 3):
    """Heads that know much of the target's future on :data:`PROMPTS`: trained on the hidden states of the
    target's own greedy continuations of them (self-distillation, as ``llmlab medusa`` does; memorized, since
    a random tiny model's text has nothing general to learn)."""
    torch.manual_seed(0)
    heads = heads_for(target, num_heads)
    W = target.embed_tokens.weight
    seqs = []
    for p in PROMPTS:
        seqs.append(p + reference_greedy(target, p, 24))
    hs, labels = [], []
    with torch.no_grad():
        for s in seqs:
            pos, lab = head_targets(s, [True] * len(s), num_heads)
            hs.append(target(torch.tensor([s]), return_hidden=True)[0, pos])
            labels.append(lab)
    h, y = torch.cat(hs), torch.cat(labels)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(200):
        loss, _ = medusa_loss(heads.states(h), heads.projections(W), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return heads.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def target_and_heads():
    target = model(seed=0)
    return target, oracle_heads(target)


# ------------------------------------------------------------------------------------- decoding
def test_medusa_greedy_output_equals_the_target_alone_in_a_batch(target_and_heads):
    """Several prompts decoded together (one joins mid-way, a small pool forces preemptions): every output
    equals the target's own greedy tokens, and drafts were really accepted on the way."""
    target, heads = target_and_heads
    ps = PROMPTS
    spec = {"method": "medusa", "heads": heads, "num_tokens": 3}
    llm = LLM.from_model(target, None, speculative=spec, block_size=4, num_blocks=20, max_batch_size=4)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    rids = [llm.add_request(p, sp) for p in ps[:3]]
    done, steps = {}, 0
    while llm.has_unfinished():
        for o in llm.step():
            if o.finished:
                done[o.request_id] = o.token_ids
        steps += 1
        if steps == 2:
            rids.append(llm.add_request(ps[3], sp))
    for rid, p in zip(rids, ps, strict=True):
        assert done[rid] == reference_greedy(target, p, 24)
    s = llm.speculative.stats
    assert s["accepted"] > 0.3 * s["proposed"] > 0  # the trained heads are right most of the time
    assert llm.stats["spec_mean_accepted_len"] > 1.5
    assert llm.stats["preemptions"] > 0
    assert llm.cache.num_free_blocks == llm.cache.num_blocks
    assert not llm.speculative.medusa._kept  # finished requests leave no head state behind


@pytest.mark.parametrize("tree", [None, [[0], [1], [0, 0], [0, 0, 0]]])
def test_fused_heads_read_the_lm_head_once_per_step_and_change_nothing(target_and_heads, tree):
    """At batch 1 the heads' rows ride in the verify forward's LM-head matmul: no separate head read ever
    runs, and drafts, acceptance and output are exactly those of the unfused path (a second read)."""
    target, heads = target_and_heads
    runs = {}
    for max_rows in (0, 1000):
        spec = {"method": "medusa", "heads": heads, "num_tokens": 3, "tree": tree}
        llm = LLM.from_model(target, None, speculative=spec, max_batch_size=1)
        medusa = llm.speculative.medusa
        medusa.max_rows = max_rows
        separate = []
        real = medusa.head_logits
        medusa.head_logits = lambda h, num, s=separate, f=real: s.append(len(h)) or f(h, num)
        outs = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))]
        runs[max_rows] = outs, dict(llm.speculative.stats), len(separate), dict(medusa.stats)
    (out0, stats0, reads0, kept0), (out1, stats1, reads1, kept1) = runs[0], runs[1000]
    assert out0 == out1 == [reference_greedy(target, p, 24) for p in PROMPTS]
    assert stats0 == stats1 and stats1["accepted"] > 0
    assert reads0 > 0 and kept0["fused"] == 0  # unfused: the heads' own LM-head read at every drafting step
    assert reads1 == 0 and kept1["unfused"] == 0 and kept1["fused"] > 0


def test_medusa_tree_accepts_off_chain_paths_and_keeps_the_greedy_output(target_and_heads, monkeypatch):
    """With the heads' first and second choices swapped, the right tokens sit on the tree's rank-1 branches:
    the accepted path leaves the first-choice chain (its keys/values move down in the cache), and the output
    is still the target's greedy one, batched and under preemption."""
    from llmlab.infer.medusa_tree import MedusaTreeDecoder

    target, heads = target_and_heads
    spec = {"method": "medusa", "heads": heads, "tree": [[0], [1], [1, 0], [1, 1], [1, 1, 1]]}
    llm = LLM.from_model(target, None, speculative=spec, block_size=4, num_blocks=24, max_batch_size=4)
    dec = llm.speculative
    assert isinstance(dec, MedusaTreeDecoder) and dec.tree.size == 6
    real = dec.medusa.logits

    def swapped(reqs, num):
        logits = real(reqs, num)
        top = logits.topk(2, dim=-1).indices
        first, second = logits.gather(-1, top[..., :1]), logits.gather(-1, top[..., 1:])
        return logits.scatter(-1, top[..., :1], second).scatter(-1, top[..., 1:], first)

    monkeypatch.setattr(dec.medusa, "logits", swapped)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    for p, o in zip(PROMPTS, outs, strict=True):
        assert o.token_ids == reference_greedy(target, p, 24)
    assert llm.stats["spec_mean_accepted_len"] > 2.5  # 3 tokens on most steps: only via rank-1 nodes
    assert llm.stats["preemptions"] > 0
    assert llm.cache.num_free_blocks == llm.cache.num_blocks


def test_tree_layout():
    tree = build_tree([[1, 0], [0], [0, 0, 0]], num_heads=3)  # prefixes [1], [0, 0] are added
    assert tree.paths == [(), (0,), (1,), (0, 0), (1, 0), (0, 0, 0)]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.chain == [0, 1, 3, 5] and tree.widths == [2, 1, 1]
    assert tree.children == [[1, 2], [3], [4], [5], [], []]
    assert tree.ancestors[5].tolist() == [True, True, False, True, False, True]
    assert tree_tokens(tree, 7, [[10, 11], [20], [30]]) == [7, 10, 11, 20, 20, 30]
    with pytest.raises(LLMLabError, match="deeper than the 3 Medusa heads"):
        build_tree([[0, 0, 0, 0]], num_heads=3)


@pytest.mark.parametrize("tree,fused", [(None, False), (None, True), ("default", False)])
def test_medusa_sampling_matches_the_targets_distribution(tree, fused):
    """400 sampled requests batched together, on a tiny vocabulary with heads made far off on purpose: the
    first drafted token (the third generated: the prefill gives the first, a plain verify step the second and
    the hidden state the heads read) follows the target's exact marginal, not the heads'."""
    V = 12
    target = model(seed=1, vocab_size=V, init_std=0.3)
    heads = heads_for(target, 3)
    with torch.no_grad():  # a large random residual: the heads' proposals disagree with the target
        for blk in heads.blocks:
            blk[0].linear.weight.normal_(0, 1.0)
    prompt = [3, 5, 7, 2]
    with torch.no_grad():  # exact marginals of tokens 2 and 3 under the target, and the first head's
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], dim=-1)
        ctx1 = torch.tensor([prompt + [a] for a in range(V)])
        p2 = torch.softmax(target(ctx1)[:, -1], dim=-1)  # [a, b]
        want2 = p1 @ p2
        ctx2 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = torch.softmax(target(ctx2)[:, -1], dim=-1).reshape(V, V, V)
        want3 = torch.einsum("a,ab,abc->c", p1, p2, p3)
        h = target(ctx1, return_hidden=True)[:, -1]  # the state under token 2, whose head 1 drafts token 3
        q3 = torch.einsum("a,ab,ac->c", p1, p2, torch.softmax(heads(h, target.logits)[:, 0], dim=-1))
    assert 0.5 * float((q3 - want3).abs().sum()) > 0.3  # the heads alone would be far off
    llm = LLM.from_model(
        target,
        None,
        max_batch_size=16,
        speculative={"method": "medusa", "heads": heads, "num_tokens": 2, "tree": tree},
    )
    llm.speculative.medusa.max_rows = 10**6 if fused else 0  # heads' rows in the verify matmul, or not
    N = 400
    params = [SamplingParams(temperature=1.0, max_tokens=4, seed=i) for i in range(N)]
    outs = llm.generate([prompt] * N, params)
    for pos, want in ((1, want2), (2, want3)):
        got = torch.bincount(torch.tensor([o.token_ids[pos] for o in outs]), minlength=V).float()
        assert 0.5 * float((got / N - want).abs().sum()) < 0.1  # sampling noise at N=400 is about 0.05
    assert llm.speculative.stats["proposed"] > 0 and 0 < llm.speculative.acceptance_rate < 1
    assert llm.cache.num_free_blocks == llm.cache.num_blocks


# ------------------------------------------------------------------------------ files and bad input
@pytest.mark.parametrize("share", [True, False])
def test_heads_save_load_round_trip(tmp_path, target_and_heads, share):
    target, trained = target_and_heads
    heads = trained if share else heads_for(target, 2, num_layers=2, share_lm_head=False)
    save_heads(heads, tmp_path)
    loaded = load_heads(tmp_path, target)
    assert loaded.config == heads.config
    h = torch.randn(5, target.cfg.d_model)
    torch.testing.assert_close(loaded(h, target.logits), heads(h, target.logits), rtol=0, atol=0)
    # The shared LM head is never copied into the heads file; a copied one is.
    size = (tmp_path / "medusa_heads.safetensors").stat().st_size
    head_bytes = target.cfg.vocab_size * target.cfg.d_model * 4
    assert (size < head_bytes) if share else (size > 2 * head_bytes)
    # And the engine takes the directory itself.
    llm = LLM.from_model(target, None, speculative={"method": "medusa", "heads": str(tmp_path)})
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8))[0]
    assert out.token_ids == reference_greedy(target, PROMPTS[0], 8)


def test_heads_for_another_base_are_refused_with_one_clear_error(tmp_path, target_and_heads):
    target, heads = target_and_heads
    save_heads(heads, tmp_path)
    wider = model(seed=0, d_model=96)
    with pytest.raises(
        LLMLabError, match=r"medusa_config.json: Medusa heads for a different base .*hidden size 64"
    ):
        LLM.from_model(wider, None, speculative={"method": "medusa", "heads": str(tmp_path)})
    other_vocab = model(seed=0, vocab_size=100)
    with pytest.raises(LLMLabError, match="vocabulary 290"):
        LLM.from_model(other_vocab, None, speculative={"method": "medusa", "heads": heads})
    with pytest.raises(LLMLabError, match="not a Medusa heads directory"):
        LLM.from_model(target, None, speculative={"method": "medusa", "heads": str(tmp_path / "nope")})
    with pytest.raises(LLMLabError, match="needs 'heads'"):
        LLM.from_model(target, None, speculative={"method": "medusa"})
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**cfg, "num_heads": 5}))
    with pytest.raises(LLMLabError, match="weights do not match"):
        load_heads(tmp_path, target)


# ------------------------------------------------------------------------------------ loss, targets
def test_head_targets_and_loss_follow_their_formulas():
    ids = [10, 11, 12, 13, 14, 15]
    counted = [False, False, True, True, True, True]  # a 2-token prompt, then the answer
    positions, labels = head_targets(ids, counted, 2)
    # Position t's hidden state predicts ids[t+1] through the LM head; head k targets ids[t+1+k].
    assert positions == [0, 1, 2, 3]
    assert labels.tolist() == [[12, 13], [13, 14], [14, 15], [15, -100]]
    g = torch.Generator().manual_seed(0)
    states, W = torch.randn(4, 2, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.tensor([[1, 2], [3, -100], [5, 6], [7, 8]])
    total, per_head = medusa_loss(states, [W, W], labels, decay=0.5)
    ce = [
        F.cross_entropy(states[:, k] @ W.T, labels[:, k], ignore_index=-100, reduction="sum") for k in (0, 1)
    ]
    torch.testing.assert_close(total, ce[0] + 0.5 * ce[1])
    torch.testing.assert_close(torch.stack(per_head), torch.stack(ce))
    # chain_scores: leading run of right heads per row.
    logits = F.one_hot(torch.tensor([[1, 2], [3, 0], [0, 6], [7, 8]]), 20).float()
    top1, accepted = chain_scores(logits, labels)
    assert top1.tolist() == [0.75, 1.0] and accepted.tolist() == [2, 1, 0, 2]
    # topk_hits: a label among the k best counts; unlabelled rows count for nothing.
    logits = torch.arange(20.0).repeat(4, 2, 1)  # every head ranks 19, 18, 17, ... first
    labels = torch.tensor([[19, 17], [18, -100], [16, 0], [17, 19]])
    hits, counts = topk_hits(logits, labels, 3)
    assert hits.tolist() == [3, 2] and counts.tolist() == [4, 3]


# --------------------------------------------------------------------------------------- the command
def test_medusa_command_trains_saves_and_checks(tmp_path, monkeypatch):
    from _align_helpers import chat_tokenizer, tiny_model

    from llmlab.cli import main
    from llmlab.model.checkpoint import save_checkpoint

    base = save_checkpoint(
        tmp_path / "base", tiny_model(seed=0, n_layers=2, init_std=0.1, max_seq_len=512), chat_tokenizer()
    )
    out = tmp_path / "heads"
    args = ["medusa", str(base), "--out", str(out), "--heads", "2", "max_examples=12", "response_tokens=24"]
    args += ["eval_examples=4", "accept_prompts=2", "accept_tokens=16", "eval_every=10", "max_steps=20"]
    args += ["batch_size=32", f"cache_dir={tmp_path / 'cache'}"]
    assert main([*args, "progress=false"]) == 0
    report = json.loads((out / "medusa_report.json").read_text())
    assert report["train"]["steps"] == 20 and report["data"]["train_positions"] > 100
    assert report["speculative"]["identical_to_base"] is True
    assert set(report["after"]) >= {"top1_1", "top1_2", "accept_len"}
    assert (
        set(report["after"]) >= {"top5_1", "top5_2"}
        and report["after"]["top5_1"] >= report["after"]["top1_1"]
    )
    assert [c["step"] for c in report["curve"]] == [0, 10, 20]  # eval_every=10: the held-out curve
    heads = load_heads(out)
    assert heads.num_heads == 2 and heads.config.base_model == str(base)

    # A rerun (other steps) reuses the cached answers and hidden states: the base runs no forward for them.
    def no_forward(*a, **k):
        raise AssertionError("hidden states recomputed")

    monkeypatch.setattr("llmlab.medusa.data.collect_hidden", no_forward)
    monkeypatch.setattr("llmlab.distill.data.LLM", lambda *a, **k: pytest.fail("answers regenerated"))
    assert main([*args, "max_steps=4", "accept_prompts=0", "progress=false", "--overwrite"]) == 0
    assert json.loads((out / "medusa_report.json").read_text())["train"]["steps"] == 4
    assert main(["medusa", str(base), "--out", str(tmp_path / "x"), "train_vocab=most"]) == 2
