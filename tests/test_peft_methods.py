"""DoRA, IA3, prefix tuning, prompt tuning and bottleneck adapters: parameter counts, identity at init,
PEFT interop both ways, the KV cache and the engine with a prefix, save/load and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import llmlab
from llmlab.errors import CheckpointError, ConfigError
from llmlab.model import KVCache, ModelConfig, Transformer
from llmlab.model.checkpoint import save_checkpoint
from llmlab.model.lora import LoRAConfig, merge_lora, trainable_parameters, unmerge_lora
from llmlab.model.peft import (
    BottleneckConfig,
    IA3Config,
    PrefixConfig,
    PromptConfig,
    apply_peft,
    load_adapter,
    peft_method,
    save_peft,
)

CFG = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
D, L, KV, FFN = 64, 2, 32, 192  # d_model, layers, kv_heads * head_dim, ffn width
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, "d_ff": FFN, "norm_eps": 1e-5, **kw})).eval()


def method_config(method: str):
    return {
        "dora": LoRAConfig(r=4, alpha=8, targets=["q", "v"]),
        "ia3": IA3Config(),
        "prefix": PrefixConfig(tokens=5),
        "prefix-mlp": PrefixConfig(tokens=5, projection=True, hidden=8),
        "prompt": PromptConfig(tokens=5),
        "adapter": BottleneckConfig(size=8),
    }[method]


def wrapped(method: str, seed: int = 0, model: Transformer | None = None) -> Transformer:
    model = model if model is not None else tiny(seed)
    apply_peft(model, method.removesuffix("-mlp"), method_config(method))
    return model


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every trainable parameter, as training would, so the method changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale * max(p.abs().mean().item(), 0.1))


# ------------------------------------------------------------------------------- counts, identity
EXPECTED_TRAINABLE = {
    "dora": L * ((4 * (D + D) + D) + (4 * (D + KV) + KV)),  # r (in + out) + out per wrapped layer
    "ia3": L * (2 * KV + FFN),  # k, v output vectors + the FFN's input vector
    "prefix": 5 * L * 2 * KV,  # P virtual tokens x layers x (key, value) x kv_dim
    "prefix-mlp": 5 * KV + (KV * 8 + 8) + (8 * L * 2 * KV + L * 2 * KV),  # embedding + MLP
    "prompt": 5 * D,  # P x d_model
    "adapter": L * 2 * (2 * D * 8 + 8 + D),  # per adapter 2 d m + m + d, after attention and FFN
}


@pytest.mark.parametrize("method", list(EXPECTED_TRAINABLE))
def test_trainable_parameters_match_formula(method):
    model = wrapped(method)
    assert trainable_parameters(model) == EXPECTED_TRAINABLE[method]
    model.train()
    perturb(model)
    model(IDS).square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, n


@pytest.mark.parametrize("method", ["dora", "ia3", "adapter"])
def test_identity_at_init(method):
    base = tiny()(IDS)
    model = wrapped(method)
    assert torch.allclose(model(IDS), base, atol=1e-5)
    perturb(model)
    assert (model(IDS) - base).abs().max() > 1e-3


def test_dora_magnitude_is_row_norm_and_merge_is_exact():
    model = wrapped("dora")
    q = model.layers[0].self_attn.q_proj
    assert torch.allclose(q.lora_magnitude_vector, q.base_layer.weight.norm(dim=1))
    perturb(model)
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model)
        assert torch.allclose(model(IDS), adapted, atol=1e-5)
        unmerge_lora(model)
        assert torch.allclose(model(IDS), adapted, atol=1e-5)


# ------------------------------------------------------------------------------------ PEFT interop
def hf_pair(seed: int = 0):
    """A random transformers Llama and an llmlab Transformer holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    ours = tiny()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours.load_state_dict(state, strict=True)
    return hf, ours


def peft_logits(peft_model, method: str) -> torch.Tensor:
    logits = peft_model(input_ids=IDS).logits
    return logits[:, 5:] if method == "prompt" else logits  # PEFT returns the soft prompt's positions too


@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prefix-mlp", "prompt"])
def test_our_adapter_loads_in_peft(tmp_path, method):
    from peft import PeftModel

    hf, ours = hf_pair()
    with torch.no_grad():
        base = ours(IDS)
    wrapped(method, model=ours)
    perturb(ours)
    save_peft(ours, tmp_path / "ad", base_model="base")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "base"
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        got = ours(IDS)
        ref = peft_logits(peft_model, method)
    assert (got - base).abs().max() > 1e-3  # the adapter really changes the output
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()


def peft_config(method: str):
    from peft import IA3Config as PeftIA3
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    return {
        "dora": LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], use_dora=True),
        "ia3": PeftIA3(
            task_type=TaskType.CAUSAL_LM,
            target_modules=["v_proj", "up_proj"],
            feedforward_modules=["up_proj"],
        ),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
        "prefix-mlp": PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16
        ),
        "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    }[method]


@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prefix-mlp", "prompt"])
def test_peft_adapter_loads_in_llmlab(tmp_path, method):
    from peft import get_peft_model

    hf, ours = hf_pair()
    peft_model = get_peft_model(hf, peft_config(method))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.mul_(0.05 if "prompt_encoder" in n and "prompt" != method else 1.0)
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model.eval()
    load_adapter(ours, tmp_path / "peft")
    assert trainable_parameters(ours) == 0
    assert peft_method(ours) == method.removesuffix("-mlp")
    with torch.no_grad():
        ref = peft_logits(peft_model, method)
        assert torch.allclose(ref, ours(IDS), atol=1e-4), (ref - ours(IDS)).abs().max()


# ------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prompt", "adapter"])
def test_save_load_roundtrip_through_llmlab_load(tmp_path, method):
    model = wrapped(method)
    perturb(model)
    with torch.no_grad():
        expected = model(IDS)
    save_checkpoint(tmp_path / "base", tiny())
    save_peft(model, tmp_path / "ad")
    loaded, _ = llmlab.load(tmp_path / "base", adapter=tmp_path / "ad")
    with torch.no_grad():
        assert torch.allclose(loaded(IDS), expected, atol=1e-5)


def test_bottleneck_file_format(tmp_path):
    model = wrapped("adapter")
    save_peft(model, tmp_path / "ad", base_model="/x")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["format"] == "llmlab-bottleneck-v1"
    assert cfg["bottleneck_size"] == 8 and cfg["target_modules"] == ["down_proj", "o_proj"]
    state = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.o_proj.adapter_down.weight"
    assert tuple(state[key].shape) == (8, D)
    assert len(state) == L * 2 * 4


# --------------------------------------------------------------------------- KV cache and engine
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_kv_cache_with_prefix_equals_full_forward(method):
    model = wrapped(method)
    perturb(model)
    with torch.no_grad():
        full = model(IDS)
        cache = KVCache(model.cfg, 2, 32)
        steps = [model(IDS[:, :7], cache=cache)]
        for t in range(7, IDS.shape[1]):
            steps.append(model(IDS[:, t : t + 1], cache=cache))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.lengths == [IDS.shape[1]] * 2  # the prefix is stored once in the model, not per row


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_packed_documents_each_see_the_prefix(method):
    """SFT packs documents into one row: each must see the prefix and start at position P, as if alone."""
    model = wrapped(method)
    perturb(model)
    a, b = IDS[0, :5], IDS[1, :7]
    packed = torch.cat([a, b])[None]
    segments = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        got = model(packed, positions=positions, segment_ids=segments)
        alone = torch.cat([model(a[None]), model(b[None])], dim=1)
    assert torch.allclose(got, alone, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_engine_generation_with_prefix_equals_full_forward(tmp_path, method):
    model = wrapped(method)
    perturb(model, scale=0.5)
    save_checkpoint(tmp_path / "base", tiny())
    save_peft(model, tmp_path / "ad")
    prompts = [IDS[0, :6].tolist(), IDS[1, :9].tolist()]
    params = llmlab.SamplingParams(max_tokens=8, ignore_eos=True, logprobs=True)
    llm = llmlab.LLM(
        str(tmp_path / "base"),
        adapter=str(tmp_path / "ad"),
        block_size=4,
        max_batch_size=2,
        prefill_chunk=4,
        enable_prefix_caching=True,
    )
    outs = llm.generate(prompts, params)
    again = llm.generate(prompts, params)  # the second pass reuses cached blocks of the prompts
    assert again[1].num_cached_tokens > 0
    with torch.no_grad():
        for prompt, out, out2 in zip(prompts, outs, again, strict=True):
            assert out2.token_ids == out.token_ids
            ids, logprobs = list(prompt), []
            for _ in range(8):  # greedy by full forwards over the whole sequence
                logp = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
                ids.append(int(logp.argmax()))
                logprobs.append(float(logp.max()))
            assert list(out.token_ids) == ids[len(prompt) :]
            assert out.logprobs == pytest.approx(logprobs, abs=1e-4)
    base_out = llmlab.LLM(str(tmp_path / "base"), block_size=4).generate(prompts[:1], params)[0]
    assert base_out.logprobs != pytest.approx(outs[0].logprobs, abs=1e-3)  # the engine used the adapter


# ------------------------------------------------------------------------------------- bad input
def test_method_on_a_module_it_cannot_wrap():
    with pytest.raises(ConfigError, match="PEFT method 'ia3' cannot wrap module 'embed_tokens'"):
        apply_peft(tiny(), "ia3", IA3Config(targets=["k", "embed_tokens"]))
    with pytest.raises(ConfigError, match="PEFT method 'adapter' cannot wrap module 'norm'"):
        apply_peft(tiny(), "adapter", BottleneckConfig(where=["attn", "norm"]))
    model = tiny()
    model.layers[1].mlp.down_proj = torch.nn.Sequential(torch.nn.Linear(FFN, D))  # e.g. an MoE block
    with pytest.raises(ConfigError, match=r"cannot wrap module 'layers\.1\.mlp\.down_proj' \(Sequential"):
        apply_peft(model, "ia3", IA3Config())
    moe = tiny(ffn="moe", n_experts=4, experts_top_k=2)  # experts are stacked tensors: no down_proj to scale
    with pytest.raises(ConfigError, match=r"cannot wrap module 'layers\.0\.mlp\.down_proj' \(MoE has none"):
        apply_peft(moe, "ia3", IA3Config())
    with pytest.raises(ConfigError, match=r"cannot wrap module 'layers\.0\.self_attn\.q_proj' \(DoRALinear"):
        apply_peft(wrapped("dora"), "ia3", IA3Config(["q"], []))  # one method at a time
    with pytest.raises(ConfigError, match="needs RoPE positions"):
        apply_peft(tiny(position="learned"), "prefix", PrefixConfig(tokens=4))


def test_prefix_longer_than_context(tmp_path):
    with pytest.raises(ConfigError, match=r"'prefix.tokens': a prefix of 64 virtual tokens is longer than"):
        apply_peft(tiny(), "prefix", PrefixConfig(tokens=64))
    with pytest.raises(ConfigError, match=r"'prompt.tokens': a prefix of 100 virtual tokens"):
        apply_peft(tiny(), "prompt", PromptConfig(tokens=100))
    model = wrapped("prefix")
    save_peft(model, tmp_path / "ad")
    with pytest.raises(CheckpointError, match="adapter_config.json: .*longer than the model's context"):
        load_adapter(tiny(max_seq_len=4), tmp_path / "ad")


# ------------------------------------------------------------------------------------ llmlab sft
@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    from test_sft import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)
    )
    path = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(path, model, tok)
    return path


SFT_FAST = [
    "max_steps=2",
    "batch_size=4",
    "seq_len=96",
    "max_len=64",
    "task_examples=40",
    "task_eval_per_task=0",
    "general_eval_tokens=256",
    "eval_batches=1",
    "warmup_steps=1",
    "train.progress=false",
    "train.precision=fp32",
    "peak_tflops=1.0",  # skip the matmul benchmark
]


@pytest.mark.parametrize(
    "method, overrides, peft_type",
    [
        ("prefix", ["prefix_tokens=4"], "PREFIX_TUNING"),
        pytest.param("prompt", ["prompt_tokens=4"], "PROMPT_TUNING", marks=pytest.mark.slow),
        pytest.param("ia3", ["ia3_targets=k,v,down"], "IA3", marks=pytest.mark.slow),
        pytest.param("dora", ["lora_r=2", "lora_targets=q,v"], "LORA", marks=pytest.mark.slow),
        pytest.param(
            "adapter", ["adapter_size=4", "adapter_where=ffn"], "BOTTLENECK", marks=pytest.mark.slow
        ),
    ],
)
def test_sft_cli_trains_and_saves_each_method(sft_base, tmp_path, capsys, method, overrides, peft_type):
    from llmlab.cli import main

    out = tmp_path / "run"
    code = main(["sft", "--base", str(sft_base), "--out", str(out), "--peft", method, *SFT_FAST, *overrides])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type and cfg["base_model_name_or_path"] == str(sft_base.resolve())
    report = json.loads((out / "sft_report.json").read_text())
    assert 0 < report["params"]["trainable"] < report["params"]["params"] / 10
    base, _ = llmlab.load(sft_base)
    tuned, _ = llmlab.load(out)  # the run directory: its adapter on the base it records
    ids = torch.randint(0, base.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tuned(ids) - base(ids)).abs().max() > 0  # training moved the adapter


def test_sft_cli_bad_peft_settings(sft_base, tmp_path, capsys):
    from llmlab.cli import main

    args = ["sft", "--base", str(sft_base), "--out", str(tmp_path / "o"), *SFT_FAST]
    assert main([*args, "--peft", "prefix", "prefix_tokens=500"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'prefix.tokens': a prefix of 500 virtual tokens is longer than" in err
    assert main([*args, "--peft", "ia3", "ia3_targets=k,norm"]) == 2
    assert "PEFT method 'ia3' cannot wrap module 'norm'" in capsys.readouterr().err
