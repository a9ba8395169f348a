"""Reward model: training through the shared trainer, held-out accuracy, save/load, padding, tokenizer check."""

from __future__ import annotations

import pytest
import torch
from _align_helpers import chat_tokenizer, tiny_cfg, tiny_model

from llmlab.align.data import encode_pairs, load_pairs, split_pairs
from llmlab.align.reward_model import (
    RewardModel,
    RewardPairSource,
    check_same_tokenizer,
    evaluate_reward_model,
    load_reward_model,
    plot_margins,
    save_reward_model,
    score_responses,
)
from llmlab.errors import CheckpointError
from llmlab.recipes.reward_model import make_rm_loss
from llmlab.train import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine run ~10x faster single-threaded (no OpenMP spin contention).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fast_train_cfg(steps: int, **kw) -> TrainConfig:
    base = dict(
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=5,
        max_steps=steps,
        batch_size=16,
        eval_every=0,
        log_every=10,
        progress=False,
        tensorboard=False,
        plot=False,
        precision="fp32",
        spike_factor=0.0,
        peak_tflops=1.0,  # skip the one-off peak-FLOPs measurement (only used for the MFU log)
    )
    base.update(kw)
    return TrainConfig(**base)


def test_reward_model_learns_task_preferences(tmp_path):
    tok = chat_tokenizer()
    train, held = split_pairs(load_pairs("tasks", limit=700), 150)
    src = RewardPairSource(encode_pairs(tok, train, 128), 16, tok.pad_id)
    hsrc = RewardPairSource(encode_pairs(tok, held, 128), 16, tok.pad_id)
    torch.manual_seed(0)
    rm = RewardModel(tiny_cfg(tok.vocab_size))
    before = evaluate_reward_model(rm, hsrc).accuracy
    Trainer(rm, fast_train_cfg(30), src, loss_fn=make_rm_loss()).fit()
    ev = evaluate_reward_model(rm, hsrc)
    # A random head ranks about half of the pairs right; 30 steps must lift held-out accuracy clearly above.
    # (A from-scratch RM this small learns the badly-formatted third of the pairs and the JSON/extraction
    # ones; verifying held-out arithmetic or letter reversals is beyond it: measured 0.547 -> 0.627.)
    print(f"held-out RM accuracy {before:.3f} -> {ev.accuracy:.3f}")
    assert ev.accuracy >= 0.6 and ev.accuracy >= before + 0.06, (before, ev.accuracy)
    assert len(ev.margins) == len(held)
    png = plot_margins(ev.margins, tmp_path / "m.png")
    assert png.stat().st_size > 1000
    s = ev.summary()
    assert s["margin_p10"] <= s["margin_median"] <= s["margin_p90"]


def test_margin_loss_pushes_gap():
    tok = chat_tokenizer()
    enc = encode_pairs(tok, load_pairs("tasks", limit=32), 128)
    for p in enc:
        p.margin = 5.0
    src = RewardPairSource(enc, 16, tok.pad_id)
    b = src.next_batch()
    torch.manual_seed(0)
    rm = RewardModel(tiny_cfg(tok.vocab_size))
    plain = make_rm_loss(False)(rm, b).loss_sum
    with_margin = make_rm_loss(True)(rm, b).loss_sum
    assert with_margin > plain  # -log sigma(d - 5) > -log sigma(d)


def test_rewards_ignore_padding_and_roundtrip(tmp_path):
    tok = chat_tokenizer()
    torch.manual_seed(1)
    rm = RewardModel.from_backbone(tiny_model(seed=1))
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 3
    responses = ["4", "The answer is four, I think, or maybe 5", "5"]
    together = score_responses(rm, tok, prompts, responses)
    alone = [score_responses(rm, tok, [p], [r])[0] for p, r in zip(prompts, responses)]
    assert together == pytest.approx(alone, abs=1e-5)
    save_reward_model(tmp_path / "rm", rm, tok)
    rm2, tok2 = load_reward_model(tmp_path / "rm")
    assert score_responses(rm2, tok2, prompts, responses) == pytest.approx(together, abs=1e-6)
    # Read at the LAST real token: changing the final token changes the reward.
    assert together[0] != pytest.approx(together[2], abs=1e-6)


def test_plain_checkpoint_is_not_a_reward_model(tmp_path):
    from llmlab.model.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "plain", tiny_model(), chat_tokenizer())
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tmp_path / "plain")


def test_tokenizer_mismatch_is_refused():
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    from llmlab.tokenizer import Tokenizer

    tok = chat_tokenizer()
    other = Tokenizer(HF(models.WordLevel({"a": 0, "<|eos|>": 1}, unk_token="a")))
    check_same_tokenizer(tok, tok, "same")
    with pytest.raises(CheckpointError, match="reward model .*tokenizer differs"):
        check_same_tokenizer(tok, other, "reward model rm/")
