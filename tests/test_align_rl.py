"""PPO and GRPO: problems and verifiers, rollout/log-prob alignment, the KL controller and guard, short runs."""

from __future__ import annotations

import shutil

import pytest
import torch
from _align_helpers import chat_tokenizer, tiny_model

from llmlab.align import rollout as R
from llmlab.errors import CheckpointError, ConfigError
from llmlab.recipes.grpo import GRPOConfig, run_grpo
from llmlab.recipes.ppo import ActorCritic, AdaptiveKLController, PPOConfig, run_ppo


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quiet(cfg):
    cfg.train.progress = cfg.train.tensorboard = cfg.train.plot = False
    return cfg


def test_math_problems_split_and_verifier():
    train = R.load_problems("multiarith", "train")
    test = R.load_problems("multiarith", "test")
    assert len(train) + len(test) == 600 and 60 < len(test) < 180
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in test}
    p = R.Problem([{"role": "user", "content": "q"}], "15.0", "multiarith")
    assert R.score_completion(p, "5 + 10 = 15. The answer is 15.") == (True, True)
    assert R.score_completion(p, "It is 1,5 or 15") == (True, False)  # last number, no format
    assert R.score_completion(p, "The answer is 16.") == (False, True)
    assert R.verifier_reward(p, "The answer is 15", format_weight=0.1)[0] == pytest.approx(1.1)
    gsm = R.load_problems("gsm8k", "train", n=5)
    assert len(gsm) == 5 and all(p.answer.replace(",", "").lstrip("-").isdigit() for p in gsm)
    with pytest.raises(ConfigError):
        R.load_problems("nope", "train")


def test_task_problems_use_the_suite_scorer():
    (p,) = R.load_problems("tasks:addition", "train", n=1)
    assert R.score_completion(p, p.answer) == (True, True)
    assert R.score_completion(p, "Sure! " + p.answer + " is it")[1] is False


def test_rollout_logprobs_match_the_training_forward_after_updates():
    """Rollouts are on-policy: the engine's raw log-prob of each sampled token equals what the loss recomputes,
    also after optimizer steps (an engine kept across steps returned stale log-probs; rollouts build a fresh one).
    """
    from llmlab.train import TrainConfig, Trainer

    tok = chat_tokenizer()
    model = tiny_model(seed=7)
    problems = R.load_problems("tasks", "train", n=4)
    prompts = [R.prompt_token_ids(tok, p) for p in problems]

    def max_gap() -> float:
        outs = R.generate(model, tok, prompts, 10, 1.0, 1.0, seed=3)
        batch = R.rl_batch(prompts, [o.token_ids for o in outs], tok.pad_id)
        lp = R.batch_token_logps(model, batch)
        return max(
            float((lp[i][batch["labels"][i] != -100] - torch.tensor(o.logprobs)).abs().max())
            for i, o in enumerate(outs)
        )

    assert max_gap() < 1e-4
    cfg = TrainConfig(
        lr=1e-2, progress=False, tensorboard=False, plot=False, precision="fp32", peak_tflops=1.0
    )
    trainer = Trainer(model, cfg, None)
    for _ in range(3):
        trainer.train_step([R.rl_batch(prompts, [[5, 6, 7]] * 4, tok.pad_id)])
    assert max_gap() < 1e-4


def test_adaptive_kl_controller_moves_toward_target():
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=10)
    assert ctl.update(4.0) == pytest.approx(0.1 * 1.02)  # error clipped at +0.2, times 1/10
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=10)
    assert ctl.update(1.8) == pytest.approx(0.1 * (1 - 0.01))  # error -0.1, inside the clip


def test_actor_critic_value_head_starts_at_zero():
    ac = ActorCritic(tiny_model())
    logits, values = ac(torch.tensor([[3, 4, 5]]))
    assert logits.shape == (1, 3, ac.cfg.vocab_size) and torch.all(values == 0)


@pytest.mark.parametrize("detach", [False, True])
def test_detached_value_loss_trains_only_the_head(detach):
    ac = ActorCritic(tiny_model(), detach_value=detach)
    torch.nn.init.normal_(ac.value_head.weight)  # a zero head passes no gradient back either way
    _, values = ac(torch.tensor([[3, 4, 5]]))
    values.pow(2).sum().backward()
    trunk = [p.grad for n, p in ac.named_parameters() if not n.startswith("value_head")]
    assert ac.value_head.weight.grad.abs().sum() > 0
    assert all(g is None for g in trunk) == detach


def test_grpo_short_run_logs_group_statistics(tmp_path):
    tok = chat_tokenizer()
    cfg = quiet(
        GRPOConfig(
            source="tasks:count_words",
            n_train=50,
            n_eval=9,
            group_size=4,
            prompts_per_step=2,
            max_new_tokens=6,
            eval_every=0,
            epochs=2,
        )
    )
    cfg.train.max_steps = 2
    r = run_grpo(cfg, tmp_path / "g", model=tiny_model(seed=1), tokenizer=tok, progress=False)
    for key in ("reward_mean", "reward_std", "zero_std_frac", "kl", "clip_frac", "before_exact_match"):
        assert key in r
    assert 0.0 <= r["zero_std_frac"] <= 1.0
    assert (tmp_path / "g" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "g" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_types_hold_over_the_whole_batch_when_split(loss_type):
    """Each aggregation rule is over the whole rollout batch. The Trainer divides the summed ``loss_sum`` of
    all micro-batches by their summed ``weight``; micro-batches whose completions have different lengths
    must then give the gradient of one batch (dapo's token count is summed across micro-batches)."""
    from llmlab.recipes.grpo import grpo_loss_fn

    tok = chat_tokenizer()
    g = torch.Generator().manual_seed(0)
    prompts = [[5 + i, 9, 11] for i in range(4)]
    completions = [[7] * n for n in (1, 2, 6, 8)]  # ragged: the micro-batches hold 3 and 14 tokens
    batch = R.rl_batch(prompts, completions, tok.pad_id)
    batch["advantages"] = torch.randn(4, generator=g)
    model = tiny_model(seed=1)
    loss_fn = grpo_loss_fn(0.2, 0.0, loss_type, max_completion_length=8)
    grads = []
    for parts in ([batch], R.split_batch(batch, 2)):
        model.zero_grad()
        outs = [loss_fn(model, mb) for mb in parts]
        total_weight = sum(o.weight for o in outs)
        (sum(o.loss_sum for o in outs) / total_weight).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    one, split = grads
    assert any(v.abs().max() > 0 for v in one.values())
    for k in one:
        torch.testing.assert_close(split[k], one[k], rtol=1e-5, atol=1e-7, msg=k)


def _guard_cfg(steps: int, kl_stop: float | None) -> PPOConfig:
    cfg = quiet(
        PPOConfig(
            reward="proxy",
            source="tasks:addition",
            n_train=40,
            n_eval=9,
            prompts_per_step=4,
            max_new_tokens=6,
            ppo_epochs=2,
            minibatch=4,
            micro_batch=4,
            kl_stop=kl_stop,
        )
    )
    cfg.train.max_steps = steps
    cfg.train.lr = 5e-3
    return cfg


def test_ppo_kl_guard_restores_and_stops(tmp_path):
    tok = chat_tokenizer()
    model = tiny_model(seed=2)
    r = run_ppo(_guard_cfg(6, kl_stop=0.05), tmp_path / "p", model=model, tokenizer=tok, progress=False)
    assert r["kl_stopped"] is not None and r["kl_stopped"]["kl"] > 0.05
    # The reward is also scored on the held-out greedy answers before and after (the PPO outcome measure):
    # the proxy gives >= 0.05 per generated token, and greedy answers are never empty here.
    assert r["before_reward_score"] >= 0.05 and r["after_reward_score"] >= 0.05
    s = r["kl_stopped"]["step"]
    assert s >= 1 and r["steps"] == s
    # The policy kept is the last one whose rollout was within bounds: the policy after s-1 updates, exactly
    # what an unguarded run of s-1 steps ends with (runs are deterministic in the seed).
    twin = tiny_model(seed=2)
    run_ppo(_guard_cfg(s - 1, kl_stop=None), None, model=twin, tokenizer=tok, progress=False)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert (tmp_path / "p" / "ppo_report.json").is_file()


def test_ppo_sampled_reward_score_is_paired_and_is_the_rollout_mean():
    """before/after_sampled_reward_score: the same weights give the same draws (so a change is the policy's),
    and the value is the mean reward of ``samples`` rollouts per held-out prompt."""
    from llmlab.align import rollout as R
    from llmlab.recipes.ppo import make_scorer

    tok = chat_tokenizer()
    cfg = _guard_cfg(0, kl_stop=None)
    cfg.train.max_steps = 0
    model = tiny_model(seed=2)
    r = run_ppo(cfg, None, model=model, tokenizer=tok, progress=False)
    assert r["before_sampled_reward_score"] == r["after_sampled_reward_score"] > 0.0
    problems = R.load_problems(cfg.source, "test", cfg.n_eval, seed=cfg.train.seed)
    scorer = make_scorer(cfg, tok, torch.device("cpu"))
    prompts = [R.prompt_token_ids(tok, p) for p in problems for _ in range(cfg.eval_samples)]
    outs = R.generate(
        model, tok, prompts, cfg.max_new_tokens, cfg.temperature, 1.0, cfg.train.seed + 1_000_003
    )
    # sampled, not greedy: one prompt's rollouts differ
    assert len({tuple(o.token_ids) for o in outs[: cfg.eval_samples]}) > 1
    want = float(scorer([p for p in problems for _ in range(cfg.eval_samples)], prompts, outs).mean())
    assert abs(r["before_sampled_reward_score"] - want) < 1e-6


def test_ppo_refuses_a_reward_model_with_another_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    from llmlab.align.reward_model import RewardModel, save_reward_model
    from llmlab.tokenizer import Tokenizer

    other = Tokenizer(HF(models.WordLevel({"a": 0, "<|eos|>": 1}, unk_token="a")))
    rm = RewardModel.from_backbone(tiny_model())
    save_reward_model(tmp_path / "rm", rm, other)
    cfg = quiet(
        PPOConfig(reward="rm", reward_model=str(tmp_path / "rm"), source="tasks", n_train=10, n_eval=9)
    )
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        run_ppo(cfg, None, model=tiny_model(), tokenizer=chat_tokenizer(), progress=False)
    with pytest.raises(ConfigError, match="reward_model"):
        PPOConfig(reward="rm").validate()


def test_ppo_resumed_after_a_kill_ends_with_the_same_policy(tmp_path):
    """A PPO run killed after a rollout step's checkpoint and resumed equals the uninterrupted run:
    policy, value head, optimizer, RNG, rollout step and the adaptive KL coefficient all come back."""
    from safetensors.torch import load_file

    from llmlab.train.state import write_latest

    tok = chat_tokenizer()
    cfg = _guard_cfg(3, kl_stop=None)
    cfg.adaptive_kl, cfg.train.save_every = True, 1
    full = tmp_path / "full"
    run_ppo(cfg, full, model=tiny_model(seed=2), tokenizer=tok, progress=False)
    ckpts = sorted(full.glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(ckpts) >= 2  # the last two rollout steps (keep_last); resume from the earlier one
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "final")
    for later in ckpts[1:]:
        shutil.rmtree(killed / later.name)
    write_latest(killed, ckpts[0].name)
    r = run_ppo(cfg, killed, model=tiny_model(seed=2), tokenizer=tok, progress=False, resume=True)
    assert r["steps"] == 3
    a, b = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    start = tiny_model(seed=2).state_dict()
    assert not all(torch.equal(a[k], start[k]) for k in a)  # the run trained
    assert all(torch.equal(a[k], b[k]) for k in a)
