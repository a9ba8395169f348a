"""HF mixture-of-experts interop: small random mixtral / qwen2_moe / qwen3_moe models load into llmlab with
matching fp32 logits, and llmlab MoE models exported as HF dirs load into transformers with matching logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmlab.cli import main  # noqa: E402
from llmlab.errors import CheckpointError, ConfigError  # noqa: E402
from llmlab.interop.hf import config_from_hf, load_hf, save_hf  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402

ATOL = 1e-4
VOCAB = 120


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that a wrong expert order, projection or router mapping shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if "norm" in name:
                p.copy_(1.0 + noise)
            elif name.endswith(("gate.weight", "shared_expert_gate.weight")):
                p.copy_(noise * 10.0)  # a decisive router: distinct top-k choices per token
            else:
                p.copy_(noise * (2.0 if p.ndim >= 2 else 1.0))


def _ids(T: int = 20, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _base(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        num_experts_per_tok=2,
    )
    base.update(kw)
    return base


HF_CASES = {
    "mixtral-sliding": ("MixtralConfig", "MixtralForCausalLM", _base(num_local_experts=4, sliding_window=7)),
    "mixtral-top1-tied": (
        "MixtralConfig",
        "MixtralForCausalLM",
        _base(num_local_experts=3, num_experts_per_tok=1, tie_word_embeddings=True),
    ),
    "qwen2_moe-shared": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        _base(
            num_experts=5, moe_intermediate_size=24, shared_expert_intermediate_size=36, norm_topk_prob=False
        ),
    ),
    "qwen2_moe-norm": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        _base(
            num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=16, norm_topk_prob=True
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _base(
            num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20, norm_topk_prob=True, head_dim=16
        ),
    ),
    "qwen3_moe-unnormalized": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _base(num_experts=4, moe_intermediate_size=20, norm_topk_prob=False),
    ),
}


def _make_hf(case: str):
    cfg_cls, model_cls, kwargs = HF_CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()
    _perturb(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_moe_to_llmlab_logits_match(case: str, tmp_path):
    hf = _make_hf(case)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    cfg = model.cfg
    assert cfg.ffn == "moe" and cfg.arch == hf.config.model_type
    assert (cfg.n_experts, cfg.experts_top_k) == (
        HF_CASES[case][2].get("num_local_experts") or hf.config.num_experts,
        hf.config.num_experts_per_tok,
    )
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)
    # Every expert was used somewhere (so the parity covers each expert's mapping).
    from llmlab.losses.moe import expert_load

    assert (expert_load(model) > 0).all()


def _small(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        d_model=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=40,
        max_seq_len=64,
        ffn="moe",
        n_experts=4,
        experts_top_k=2,
        moe_d_ff=24,
        tie_embeddings=False,
    )
    base.update(kw)
    return ModelConfig(**base)


EXPORT_CASES = {
    "mixtral": (_small(arch="mixtral", sliding_window=9), "mixtral"),
    "mixtral-topk_softmax": (_small(moe_router="topk_softmax", tie_embeddings=True), "mixtral"),
    "qwen2_moe": (_small(shared_expert_d_ff=32, qkv_bias=True, norm_topk_prob=False), "qwen2_moe"),
    "qwen3_moe": (_small(qk_norm=True, n_experts=5, experts_top_k=3, head_dim=16), "qwen3_moe"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_llmlab_moe_to_hf_logits_match(case: str, tmp_path):
    cfg, family = EXPORT_CASES[case]
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    _perturb(model)
    save_hf(tmp_path / "hf", model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == family
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=ATOL, rtol=0)
    again, _ = load_hf(tmp_path / "hf")  # and back: the tensors round-trip exactly
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_cli_convert_moe_both_ways(tmp_path, capsys):
    import llmlab

    hf = _make_hf("qwen2_moe-shared")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ll")]) == 0
    assert main(["convert", str(tmp_path / "ll"), str(tmp_path / "back"), "--to", "hf"]) == 0
    model, _ = llmlab.load(tmp_path / "ll")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(model(ids), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(back(ids).logits, ref, atol=ATOL, rtol=0)


# -------------------------------------------------------------------------------------------- bad input
def test_dense_layers_inside_moe_are_refused():
    hf = dict(model_type="qwen3_moe", **_base(num_experts=4, moe_intermediate_size=20))
    with pytest.raises(CheckpointError, match="x/config.json: key 'mlp_only_layers'"):
        config_from_hf({**hf, "mlp_only_layers": [0]}, source="x/config.json")
    with pytest.raises(CheckpointError, match="'decoder_sparse_step'"):
        config_from_hf({**hf, "decoder_sparse_step": 2}, source="x/config.json")


def test_hf_top_k_above_experts_names_both_keys(tmp_path):
    hf = dict(model_type="mixtral", **_base(num_local_experts=2, num_experts_per_tok=3))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(
        ConfigError, match=r"config\.json.*'experts_top_k' \(3\) must be <= 'n_experts' \(2\)"
    ):
        load_hf(tmp_path)


def test_export_refuses_unnormalized_mixtral():
    with pytest.raises(ConfigError, match="mixtral.*norm_topk_prob"):
        save_hf("/nonexistent/never-written", Transformer(_small(norm_topk_prob=False)))


# ------------------------------------------------------------------------------------------------- GGUF
_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "qwen3": "qwen3"}


def _write_gguf_like_llama_cpp(hf, directory, path):
    """``hf`` (saved in ``directory``) as llama.cpp's converter writes it: names from gguf's own
    TensorNameMap, experts stacked to ``[E, out, in]``, llama's q/k rows permuted, MoE metadata keys."""
    import gguf
    import numpy as np
    from _interop_helpers import _llama_cpp_permute
    from gguf.constants import MODEL_ARCH

    from llmlab.interop.hf import read_safetensors_dir

    c = hf.config
    arch = _GGUF_ARCH[c.model_type]
    arch_enum = {
        "llama": MODEL_ARCH.LLAMA,
        "qwen2moe": MODEL_ARCH.QWEN2MOE,
        "qwen3moe": MODEL_ARCH.QWEN3MOE,
        "qwen3": MODEL_ARCH.QWEN3,
    }
    names = gguf.get_tensor_name_map(arch_enum[arch], c.num_hidden_layers)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch != "qwen3":  # the MoE keys
        w.add_expert_count(c.num_experts if arch != "llama" else c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_weights_norm(bool(c.norm_topk_prob))
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    state = read_safetensors_dir(directory)
    merged: dict[str, dict[int, torch.Tensor]] = {}
    for key in sorted(state):
        value = state[key]
        if ".experts." in key:  # model.layers.0.mlp.experts.3.up_proj.weight -> ...experts.up_proj.weight
            head, _, rest = key.partition(".experts.")
            expert, proj = rest.split(".", 1)
            merged.setdefault(f"{head}.experts.{proj}", {})[int(expert)] = value
            continue
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key.endswith("shared_expert_gate.weight"):
            value = value.reshape(-1)  # llama.cpp's {n_embd}
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in key else c.num_key_value_heads
            value = torch.from_numpy(_llama_cpp_permute(value.numpy(), heads))
        w.add_tensor(
            names.get_name(key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(value.numpy())
        )
    for key, per_expert in merged.items():
        stacked = torch.stack([per_expert[e] for e in range(len(per_expert))]).numpy()
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(stacked))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["mixtral-top1-tied", "qwen2_moe-shared", "qwen3_moe-unnormalized", "qwen3"])
def test_gguf_moe_import_matches_transformers(case: str, tmp_path):
    pytest.importorskip("gguf")
    from llmlab.interop.gguf import load_gguf

    if case == "qwen3":  # dense, with QK-norm
        torch.manual_seed(0)
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_base(head_dim=16))).eval()
        _perturb(hf)
    else:
        hf = _make_hf(case)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_gguf(_write_gguf_like_llama_cpp(hf, tmp_path / "hf", tmp_path / "m.gguf"))
    assert (
        model.cfg.ffn == ("swiglu" if case == "qwen3" else "moe") and model.cfg.arch == hf.config.model_type
    )
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)
