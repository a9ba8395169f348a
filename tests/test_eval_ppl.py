"""Sliding-window perplexity: the window plan, a hand computation, transformers' own loss, bits per byte."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import ConfigError, DataError
from llmlab.eval.perplexity import evaluate_perplexity, window_plan
from llmlab.model import ModelConfig, Transformer

TEXT = (
    " = Valkyria Chronicles III = \n The game began development in 2010 , carrying over a large portion of the "
    "work done on Valkyria Chronicles II . While it retained the standard features of the series , it also "
    "underwent multiple adjustments , such as making the game more forgiving for series newcomers . "
)


@lru_cache(maxsize=1)
def _tokenizer():
    from llmlab.data.corpora import read_text
    from llmlab.tokenizer.train import train_tokenizer

    text = read_text("wikitext2-valid")[:60_000]
    return train_tokenizer([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=400)


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=400, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, d_ff=128
    )
    return Transformer(cfg).eval()


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(100, 32, 32), (100, 32, 8), (65, 16, 5), (10, 32, 4)])
def test_window_plan_scores_each_token_once(n, seq_len, stride):
    plan = window_plan(n, seq_len, stride)
    scored = [t for _, end, first in plan for t in range(first, end)]
    for begin, end, first in plan:
        assert end - begin <= seq_len and first > begin
    assert len(scored) == len(set(scored))
    if stride < seq_len:
        assert scored == list(range(1, n))  # overlapping windows: every token but the first, once
    else:
        # Disjoint windows: the first token of each window has no context and is skipped.
        assert set(scored) == set(range(n)) - {b for b, _, _ in plan}
    # Every scored token has at least seq_len - stride tokens of context (or all tokens before it).
    for begin, _, first in plan:
        assert first - begin >= min(seq_len - stride, first)


def _hand_nll(model: Transformer, ids: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """Each token's log-probability, computed one target at a time with the context its window gives it."""
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in window_plan(len(ids), seq_len, stride):
            for t in range(first, end):
                context = torch.tensor([ids[begin:t]])
                logp = torch.log_softmax(model(context)[0, -1], dim=-1)
                total -= float(logp[ids[t]])
                count += 1
    return total, count


@pytest.mark.parametrize(("seq_len", "stride"), [(16, 16), (16, 6)])
def test_matches_hand_computation(seq_len, stride):
    model, tok = _model(), _tokenizer()
    ids = tok.encode(TEXT)[:50]
    result = evaluate_perplexity(model, tok, token_ids=ids, seq_len=seq_len, stride=stride, batch_size=3)
    total, count = _hand_nll(model, ids, seq_len, stride)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # Batching windows does not change the result.
    one = evaluate_perplexity(model, tok, token_ids=ids, seq_len=seq_len, stride=stride, batch_size=1)
    assert one["nll"] == pytest.approx(result["nll"], rel=1e-6)


def test_matches_transformers_loss_on_the_same_weights():
    """A transformers Llama scored with its own shifted-label loss, as in HF's perplexity guide."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    tok = _tokenizer()
    ids = tok.encode(TEXT)[:70]
    seq_len, stride = 24, 10
    ours = evaluate_perplexity(hf, tok, token_ids=ids, seq_len=seq_len, stride=stride)
    # The guide's loop: labels -100 except the last trg_len tokens; the loss averages the scored tokens.
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    all_ids = torch.tensor([ids])
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + seq_len, len(ids))
            trg_len = end - prev_end
            window = all_ids[:, begin:end]
            labels = window.clone()
            labels[:, :-trg_len] = -100
            n_valid = int((labels[:, 1:] != -100).sum())  # the model shifts labels left by one
            nll_sum += float(hf(window, labels=labels).loss) * n_valid
            n_scored += n_valid
            prev_end = end
            if end == len(ids):
                break
    assert ours["tokens"] == n_scored
    assert ours["ppl"] == pytest.approx(math.exp(nll_sum / n_scored), rel=1e-5)


def test_bits_per_byte_and_max_tokens():
    model, tok = _model(seed=1), _tokenizer()
    ids = tok.encode(TEXT)
    result = evaluate_perplexity(model, tok, TEXT, seq_len=32, stride=16)
    # Byte-level BPE: the scored tokens (all but the first) decode to the text minus the first token.
    first_bytes = len(tok.decode(ids[:1]).encode("utf-8"))
    assert result["bytes"] == len(TEXT.encode("utf-8")) - first_bytes
    total_bits = result["nll"] * result["tokens"] / math.log(2)
    assert result["bits_per_byte"] == pytest.approx(total_bits / result["bytes"])
    # A random model is close to uniform over the vocabulary: ppl near the vocabulary size.
    assert 0.5 * 400 < result["ppl"] < 2 * 400
    short = evaluate_perplexity(model, tok, TEXT, seq_len=32, stride=16, max_tokens=20)
    assert short["tokens"] == 19


def test_learns_something_a_trained_model_has_lower_perplexity():
    """A few steps of training on the text lower its perplexity: the metric tracks the model, not noise."""
    model, tok = _model(seed=2), _tokenizer()
    ids = torch.tensor([tok.encode(TEXT)[:64]])
    before = evaluate_perplexity(model, tok, TEXT, seq_len=64)["ppl"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(12):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_perplexity(model, tok, TEXT, seq_len=64)["ppl"]
    assert after < 0.5 * before
    assert model.training  # evaluate_perplexity restores the mode it found


def test_bad_input():
    model, tok = _model(), _tokenizer()
    with pytest.raises(ConfigError, match="stride"):
        evaluate_perplexity(model, tok, TEXT, seq_len=16, stride=32)
    with pytest.raises(ConfigError, match="seq_len"):
        evaluate_perplexity(model, tok, TEXT, seq_len=1)
    with pytest.raises(DataError, match="at least 2 tokens"):
        evaluate_perplexity(model, tok, "a", seq_len=16)


def test_cli_ppl_on_a_checkpoint(tmp_path, capsys):
    from llmlab.cli import main
    from llmlab.model.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ck", _model(), _tokenizer())
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    rc = main(["eval", "ppl", str(tmp_path / "ck"), "--data", str(text), "--seq-len", "32", "--stride", "16"])
    out = capsys.readouterr().out
    assert rc == 0 and "perplexity" in out and "bits/byte" in out
    assert main(["eval", "ppl", str(tmp_path / "ck"), "--data", str(text), "--stride", "999"]) == 2
    assert "stride must be in" in capsys.readouterr().err
    assert main(["eval", "ppl", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
