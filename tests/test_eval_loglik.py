"""Log-likelihood scoring: llmlab's prefix-tree scorer gives transformers' per-choice log-likelihoods (1e-4),
lm-eval's request encoding and left truncation, and the harness end to end on a tiny model."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _interop_helpers import tiny_tokenizer  # noqa: E402

from llmlab.eval import evaluate, mc_tasks  # noqa: E402
from llmlab.eval.loglik import build_tree, encode_requests, score_groups  # noqa: E402
from llmlab.interop.hf import load_hf  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402

PAIRS = [
    [("Question: hello world\nAnswer:", " a small test"), ("Question: hello world\nAnswer:", " héllo"),
     ("Question: hello world\nAnswer:", " wörld 日本 and more words here")],
    [("hello ", "world"), ("hello ", "small"), ("hello ", "test, test")],  # trailing space moves right
    [("The small test was ", " world"), ("The small héllo was ", " world")],  # WinoGrande-style
]  # fmt: skip


def _hf_pair(tmp_path, max_pos: int = 64):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tiny_tokenizer().vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    return hf, model


def _reference(hf, requests, max_len):
    """lm-eval's _loglikelihood_tokens for one request, with transformers."""
    out = []
    for ctx, cont in requests:
        inp = (ctx + cont)[-(max_len + 1) :][:-1]
        with torch.no_grad():
            logits = hf(torch.tensor([inp])).logits[0].float()
        lp = torch.log_softmax(logits[len(inp) - len(cont) :], -1)
        out.append(float(lp.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out


def test_encode_requests_follows_lm_eval():
    tok = tiny_tokenizer()
    (ctx, cont), = encode_requests(tok, [("hello ", "world")])  # fmt: skip
    assert ctx == tok.encode("hello")
    whole = tok.encode("hello world")
    assert ctx + cont == whole[: len(ctx)] + whole[len(ctx) :] and cont == whole[len(tok.encode("hello")) :]


def test_tree_scores_equal_transformers(tmp_path):
    hf, model = _hf_pair(tmp_path)
    tok = tiny_tokenizer()
    groups = [encode_requests(tok, g) for g in PAIRS]
    ours, stats = score_groups(model, groups, batch_size=2)
    theirs, _ = score_groups(hf, groups, batch_size=2)  # the plain one-row-per-request path
    assert stats["truncated"] == 0
    for g, o, t in zip(groups, ours, theirs, strict=True):
        ref = _reference(hf, g, 64)
        assert [x for x, _ in o] == pytest.approx(ref, abs=1e-4)
        assert [x for x, _ in t] == pytest.approx(ref, abs=1e-4)
    # The shared context is computed once: the row holds the context once plus each choice's own tokens.
    row = build_tree(groups[0], 64)
    ctx_len = len(groups[0][0][0])
    assert len(row.ids) == ctx_len + sum(len(c) - 1 for _, c in groups[0])


def test_left_truncation_matches_lm_eval_and_is_counted(tmp_path):
    hf, model = _hf_pair(tmp_path, max_pos=64)
    tok = tiny_tokenizer()
    long_ctx = "hello world, a small test. " * 6
    group = encode_requests(tok, [(long_ctx, " abc"), (long_ctx, " xyz")])
    assert len(group[0][0]) > 24
    ours, stats = score_groups(model, [group], max_len=24)
    assert stats["truncated"] == 1
    assert [x for x, _ in ours[0]] == pytest.approx(_reference(hf, group, 24), abs=1e-4)


def _tiny_llmlab():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=256)
    return Transformer(cfg).eval(), tok


def test_evaluate_end_to_end_on_real_records():
    model, tok = _tiny_llmlab()
    out = evaluate(
        model, tasks=["arc_easy", "winogrande", "truthfulqa_mc2"], limit=6, tokenizer=tok, progress=False
    )
    res = out["results"]
    assert set(res) == {"arc_easy", "winogrande", "truthfulqa_mc2"}
    assert (
        res["arc_easy"]["n"] == 6
        and 0 <= res["arc_easy"]["acc"] <= 1
        and "acc_norm_stderr" in res["arc_easy"]
    )
    assert set(res["winogrande"]) >= {"acc", "acc_stderr", "n"} and "acc_norm" not in res["winogrande"]
    assert 0 < res["truthfulqa_mc2"]["acc"] < 1  # a probability mass, not a 0/1 hit
    assert out["config"]["limit"] == 6 and out["config"]["malformed"] == {}


def test_mmlu_per_subject_and_macro_average():
    model, tok = _tiny_llmlab()
    out = evaluate(model, tasks=["mmlu"], limit=1, shots=1, tokenizer=tok, progress=False)["results"]
    subjects = [k for k in out if k.startswith("mmlu_")]
    assert len(subjects) == 57 and out["mmlu"]["n"] == 57
    assert out["mmlu"]["acc"] == pytest.approx(sum(out[s]["acc"] for s in subjects) / 57)
    assert out["mmlu"]["truncated"] > 0  # 1-shot MMLU prompts overflow the 256-token context: cut, counted


def test_malformed_record_is_counted_with_its_location(tmp_path, monkeypatch):
    good = json.loads(gzip.decompress((mc_tasks.EVAL_ASSETS / "arc_easy_test.json.gz").read_bytes()))[:3]
    bad = {
        "instruction": "Please choose the correct answer to the question: no options here",
        "answer": "answer1",
    }
    (tmp_path / "arc_easy_test.json.gz").write_bytes(
        gzip.compress(json.dumps([good[0], bad, *good[1:]]).encode())
    )
    monkeypatch.setattr(mc_tasks, "EVAL_ASSETS", tmp_path)
    model, tok = _tiny_llmlab()
    out = evaluate(model, tasks=["arc_easy"], tokenizer=tok, progress=False)
    assert out["results"]["arc_easy"]["n"] == 3 and out["results"]["arc_easy"]["malformed"] == 1
    assert out["config"]["malformed"]["arc_easy"][0].startswith("arc_easy_test.json.gz:#1: ")
