"""``llmlab analyze``: update norms per group/layer, LoRA effective rank, attention and output statistics."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.analysis import attention as A
from llmlab.analysis import params as P
from llmlab.model.checkpoint import save_checkpoint
from llmlab.model.config import ModelConfig
from llmlab.model.lora import LoRAConfig, apply_lora, save_adapter
from llmlab.model.transformer import Transformer


def test_param_delta_groups_layers_and_shares():
    before = {
        "embed_tokens.weight": torch.ones(4, 2),
        "layers.0.self_attn.q_proj.weight": torch.ones(2, 2),
        "layers.0.self_attn.k_proj.weight": torch.ones(2, 2),
        "layers.1.mlp.up_proj.weight": torch.ones(2, 2),
        "layers.1.input_layernorm.weight": torch.ones(2),
        "norm.weight": torch.ones(2),
    }
    after = {k: v.clone() for k, v in before.items()}
    after["layers.0.self_attn.q_proj.weight"] += torch.tensor(
        [[1.0, 1.0], [0.0, 0.0]]
    )  # |dW|^2 = 2, |W|^2 = 4
    after["layers.1.mlp.up_proj.weight"] += torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # |dW|^2 = 4
    d = P.param_delta(before, after)
    assert d["param_delta"]["q"] == {"0": pytest.approx((2 / 4) ** 0.5)}
    assert d["param_delta"]["k"]["0"] == 0.0 and d["param_delta"]["up"]["1"] == pytest.approx(1.0)
    assert set(d["param_delta"]["norms"]) == {"1", "-"}  # the final norm sits outside the blocks
    assert d["attention_share"] == pytest.approx(2 / 6) and d["ffn_share"] == pytest.approx(4 / 6)
    assert d["moved_fraction"] == pytest.approx(3 / 24)
    assert "up 1" in P.summary_line(d) and "attention holds 33%, the FFN 67%" in P.summary_line(d)


def test_effective_rank_of_known_spectra():
    assert P.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert P.effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert P.energy_rank(torch.tensor([3.0, 1.0, 0.1])) == 2  # 9 / 10.01 < 0.9
    assert P.energy_rank(torch.tensor([3.0, 0.5, 0.1])) == 1


def test_js_divergence_bounds():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    js = A.js_divergence(p, q)
    assert js[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-4) and js[1] == pytest.approx(
        0.0
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from llmlab.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("analysis")
    text = "Reverse the letters and sort the numbers. Count the words, convert km to m. " * 40
    tok = train_tokenizer([text, "Summarize and translate: good morning, bonjour. 12 + 7 = 19"] * 5, 320)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=128)
    )
    save_checkpoint(root / "before", model, tok)
    with torch.no_grad():
        model.layers[1].self_attn.q_proj.weight.mul_(3.0)  # only layer 1's queries change
    save_checkpoint(root / "after", model, tok)
    return root


def test_analyze_finds_the_one_changed_matrix(tiny_models, tmp_path):
    from llmlab.analysis.analyze import analyze

    res = analyze(tiny_models / "before", tiny_models / "after", tmp_path, n_prompts=4)
    delta = res["param_delta"]
    assert delta["q"]["1"] == pytest.approx(2.0, rel=1e-5) and delta["q"]["0"] == 0.0
    assert all(v == 0.0 for g in ("k", "v", "o", "gate", "up", "down") for v in delta[g].values())
    assert res["attention_share"] == pytest.approx(1.0)
    js = res["attention"]["js_divergence"]
    assert max(js[0]) == pytest.approx(0.0, abs=1e-6) and max(js[1]) > 1e-6  # layer 0's maps are untouched
    assert res["outputs"]["kl_after_before"] > 0
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["param_delta"]["q"]["1"] == pytest.approx(2.0, rel=1e-5)
    assert {"param_delta.png", "attention.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "keyword" in res["attention_summary"]


def test_analyze_identical_models_changes_nothing(tiny_models, tmp_path):
    from llmlab.analysis.analyze import analyze

    res = analyze(tiny_models / "before", tiny_models / "before", tmp_path, n_prompts=2)
    assert res["moved_fraction"] == 0.0 and res["outputs"]["kl_after_before"] == pytest.approx(0.0, abs=1e-6)
    assert res["attention"]["entropy"]["before"] == res["attention"]["entropy"]["after"]


def test_lora_adapter_rank_and_group(tiny_models, tmp_path):
    from llmlab.analysis.analyze import analyze
    from llmlab.loading import load

    model, _ = load(tiny_models / "before")
    apply_lora(model, LoRAConfig(r=2, alpha=4.0, targets=["v"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    res = analyze(
        tiny_models / "before", tiny_models / "before", tmp_path / "out", adapter=tmp_path / "adapter"
    )
    assert set(res["param_delta"]["lora"]) == {"0", "1"} and res["param_delta"]["lora"]["0"] > 0
    assert res["param_delta"]["v"]["0"] == pytest.approx(res["param_delta"]["lora"]["0"], rel=1e-4)
    assert res["param_delta"]["q"]["0"] == 0.0
    for spec in res["lora_spectra"].values():
        assert spec["adapter_rank"] == 2 and 1.0 <= spec["effective_rank"] <= 2.0 + 1e-6
    assert all(s["full_rank"] >= 2 and s["rank90"] <= 2 for s in res["update_spectra"].values())
