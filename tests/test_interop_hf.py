"""Hugging Face interop: small random HF models (no hub) load into llmlab with matching fp32 logits, and
llmlab models exported as HF dirs load into transformers with matching logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _interop_helpers import tiny_tokenizer  # noqa: E402

from llmlab.errors import CheckpointError, ConfigError  # noqa: E402
from llmlab.interop.hf import config_from_hf, load_hf, parse_size, save_hf  # noqa: E402
from llmlab.model import KVCache, ModelConfig, RopeScaling, Transformer  # noqa: E402

ATOL = 1e-4
VOCAB = 160


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace the (near-zero, ones-for-norms) init by weights large enough that any mapping mistake shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if "norm" in name or ".ln_" in name or name.endswith(("ln_f.weight",)):
                p.copy_(1.0 + noise if name.endswith("weight") else noise)
            else:
                p.copy_(noise * (2.0 if p.ndim == 2 else 1.0))


def _ids(T: int = 24, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _llama_kwargs(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    base.update(kw)
    return base


HF_CASES = {
    "llama-mha-untied": ("LlamaConfig", "LlamaForCausalLM", _llama_kwargs(tie_word_embeddings=False)),
    "llama-gqa-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        _llama_kwargs(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "llama-mqa-headdim-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        _llama_kwargs(num_key_value_heads=1, head_dim=24, attention_bias=True, mlp_bias=True),
    ),
    "llama-rope-linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        _llama_kwargs(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    ),
    "llama-rope-dynamic": (
        # max_position_embeddings < T so the dynamic base actually grows.
        "LlamaConfig",
        "LlamaForCausalLM",
        _llama_kwargs(
            max_position_embeddings=16,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
    ),
    "llama-rope-yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        _llama_kwargs(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "llama-rope-llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        _llama_kwargs(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "rope_theta": 10000.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "qwen2-bias-tied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        _llama_kwargs(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen2-sliding": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        _llama_kwargs(num_key_value_heads=2, use_sliding_window=True, sliding_window=7, max_window_layers=0),
    ),
    "qwen3-qknorm-bias-tied": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        _llama_kwargs(num_key_value_heads=2, head_dim=24, attention_bias=True, tie_word_embeddings=True),
    ),
    "qwen3-untied": ("Qwen3Config", "Qwen3ForCausalLM", _llama_kwargs(num_key_value_heads=1)),
    "mistral-sliding": (
        "MistralConfig",
        "MistralForCausalLM",
        _llama_kwargs(num_key_value_heads=2, sliding_window=7),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
    "gpt2-n_inner-gelu": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            n_inner=80,
            activation_function="gelu",
            layer_norm_epsilon=1e-6,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
}


def _make_hf(case: str):
    cfg_cls, model_cls, kwargs = HF_CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()
    _perturb(model)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_to_llmlab_logits_match(case: str, tmp_path):
    hf = _make_hf(case)
    hf.save_pretrained(tmp_path)
    model, tokenizer = load_hf(tmp_path)
    assert tokenizer is None
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if "sliding" in case:
        assert model.cfg.sliding_window == 7 and ids.shape[1] > 7


def test_sharded_hf_checkpoint_loads(tmp_path):
    hf = _make_hf("llama-gqa-tied")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    model, _ = load_hf(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_old_config_layout_rope_theta_and_rope_scaling():
    """transformers 4.x configs: top-level rope_theta and a rope_scaling dict keyed 'type'."""
    hf = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rope_theta=5e5,
        rope_scaling={"type": "linear", "factor": 4.0},
    )
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.type == "linear" and cfg.rope_scaling.factor == 4.0
    assert cfg.kv_heads == 4 and cfg.tie_embeddings is False


@pytest.mark.parametrize("case", ["llama-gqa-tied", "mistral-sliding"])
def test_kv_cache_decode_matches_full_forward(tmp_path, case):
    """Prefill 10 tokens then decode 6 one by one (past the window of 7 for mistral): same logits."""
    hf = _make_hf(case)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    ids = _ids(T=16, B=2)
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(full, hf(ids).logits, atol=ATOL, rtol=0)
        cache = KVCache(model.cfg, batch_size=2, max_len=32)
        steps = [model(ids[:, :10], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------- llmlab -> HF
def _small(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


EXPORT_CASES = {
    "llama-gqa-untied": _small(tie_embeddings=False),
    "llama-tied-yarn": _small(rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)),
    "llama-llama3-headdim": _small(
        head_dim=24,
        rope_theta=5e5,
        rope_scaling=RopeScaling(type="llama3", factor=8.0, original_max_seq_len=16),
    ),
    "qwen2-sliding": _small(qkv_bias=True, sliding_window=7, arch="qwen2"),
    "mistral-sliding": _small(sliding_window=7, tie_embeddings=False, arch="mistral"),
    "qwen3-qknorm": _small(qk_norm=True, head_dim=24, tie_embeddings=False, arch="qwen3"),
    "qwen3-qknorm-bias-sliding": _small(
        qk_norm=True, qkv_bias=True, out_bias=True, sliding_window=7, arch="qwen3"
    ),
    "gpt2": ModelConfig(
        vocab_size=VOCAB,
        d_model=64,
        n_layers=2,
        n_heads=4,
        max_seq_len=64,
        norm="layernorm",
        norm_bias=True,
        ffn="gelu",
        activation="gelu_tanh",
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        arch="gpt2",
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_llmlab_to_hf_logits_match(case: str, tmp_path):
    torch.manual_seed(0)
    model = Transformer(EXPORT_CASES[case]).eval()
    _perturb(model)
    save_hf(tmp_path / "hf", model, max_shard_size="60KB" if case == "gpt2" else "5GB")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == model.cfg.arch
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=ATOL, rtol=0)
    # And back again: the round trip is exact.
    again, _ = load_hf(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_sharded_export_writes_index(tmp_path):
    model = Transformer(_small())
    save_hf(tmp_path / "hf", model, max_shard_size="50KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / "hf" / s).is_file() for s in shards)
    assert parse_size("50KB") == 50_000 and parse_size("1GiB") == 2**30
    with pytest.raises(ConfigError, match="bad size"):
        parse_size("lots")


def test_tokenizer_round_trips_through_transformers(tmp_path):
    tok = tiny_tokenizer(VOCAB)
    save_hf(tmp_path / "hf", Transformer(_small(vocab_size=tok.vocab_size)), tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "hello wörld, 日本 test"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert hf_tok.eos_token == "<|eos|>" and hf_tok.pad_token == "<|pad|>"
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert sorted(gen.eos_token_id) == tok.stop_ids
    # transformers' own save (chat_template.jinja beside tokenizer_config.json) comes back into llmlab.
    hf_tok.save_pretrained(tmp_path / "resaved")
    (tmp_path / "resaved" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    for f in (tmp_path / "hf").glob("*.safetensors"):
        (tmp_path / "resaved" / f.name).write_bytes(f.read_bytes())
    _, back = load_hf(tmp_path / "resaved")
    assert back.chat_template == tok.chat_template
    assert back.encode(text) == tok.encode(text) and back.eos_id == tok.eos_id


# -------------------------------------------------------------------------------------------- bad input
def test_impossible_shape_names_file_and_key(tmp_path):
    cfg = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=5,
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*'n_heads' \(5\) must divide 'd_model' \(64\)"):
        load_hf(tmp_path)


def test_unsupported_model_type_and_missing_key(tmp_path):
    with pytest.raises(CheckpointError, match="'model_type' = 'bert'"):
        config_from_hf({"model_type": "bert"}, source="x/config.json")
    with pytest.raises(CheckpointError, match="x/config.json: missing key 'num_hidden_layers'"):
        config_from_hf({"model_type": "llama", "vocab_size": 3}, source="x/config.json")


def test_partial_sliding_window_is_refused():
    hf = dict(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
    )
    with pytest.raises(CheckpointError, match="max_window_layers"):
        config_from_hf(hf)


def test_export_refuses_what_hf_cannot_express():
    with pytest.raises(ConfigError, match="ntk"):
        save_hf(
            "/nonexistent/never-written",
            Transformer(_small(rope_scaling=RopeScaling(type="ntk", factor=2.0))),
        )


def test_named_chat_templates_pick_default(tmp_path):
    tok = tiny_tokenizer(VOCAB)
    save_hf(tmp_path, Transformer(_small(vocab_size=tok.vocab_size)), tokenizer=tok)
    meta = json.loads((tmp_path / "tokenizer_config.json").read_text())
    meta["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(meta))
    _, back = load_hf(tmp_path)
    assert back.chat_template == "D"
