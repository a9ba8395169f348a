"""LoRA: exact no-op at init, trainable counts, merge/unmerge, disable, and PEFT interop both ways."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model import ModelConfig, Transformer
from llmlab.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_adapter,
    apply_lora,
    disable_adapter,
    merge_and_unload,
    merge_lora,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)

CFG = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **kw})).eval()


def randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    """Give B non-zero values, as training would, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_fresh_wrap_is_exact_noop_and_only_adapters_train():
    model = tiny()
    base = model(IDS)
    wrapped = apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"]))
    assert torch.equal(model(IDS), base)
    assert len(wrapped) == 3 * CFG["n_layers"]
    d, kv = CFG["d_model"], CFG["n_kv_heads"] * (CFG["d_model"] // CFG["n_heads"])
    ffn = model.cfg.ffn_dim
    expected = CFG["n_layers"] * 4 * ((d + d) + (d + kv) + (ffn + d))
    assert trainable_parameters(model) == expected
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    a = model.layers[0].self_attn.q_proj.lora_A.weight
    assert a.abs().sum() > 0  # A is random (Kaiming), B is zero


def test_merge_unmerge_and_disable():
    model = tiny()
    base = model(IDS)
    apply_lora(model, LoRAConfig(r=4, alpha=16, targets=["all"]))
    randomize_b(model)
    with torch.no_grad():
        adapted = model(IDS)
        assert (adapted - base).abs().max() > 1e-3
        with disable_adapter(model):
            assert torch.allclose(model(IDS), base, atol=1e-6)
        merge_lora(model)
        assert torch.allclose(model(IDS), adapted, atol=1e-5)
        unmerge_lora(model)
        assert torch.allclose(model(IDS), adapted, atol=1e-5)
        merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny().state_dict())
    assert torch.allclose(model(IDS), adapted, atol=1e-5)


def test_gradients_reach_only_adapters():
    model = tiny().train()
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["q", "k"]))
    randomize_b(model)
    model(IDS).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_bad_targets_and_rank():
    with pytest.raises(ConfigError, match="unknown LoRA target 'qq'"):
        apply_lora(tiny(), LoRAConfig(targets=["qq"]))
    with pytest.raises(ConfigError, match="lora.r"):
        apply_lora(tiny(), LoRAConfig(r=0))


def test_save_and_reload_roundtrip(tmp_path):
    model = tiny()
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "o", "up"]))
    randomize_b(model)
    expected = model(IDS)
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "LORA"
        and cfg["r"] == 4
        and cfg["target_modules"] == ["o_proj", "q_proj", "up_proj"]
    )
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    fresh = apply_adapter(tiny(), tmp_path / "ad")
    assert torch.allclose(fresh(IDS), expected, atol=1e-6)
    assert trainable_parameters(fresh) == 0


def test_adapter_for_other_base_names_the_tensor(tmp_path):
    model = tiny()
    apply_lora(model, LoRAConfig(r=4, targets=["q"]))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(
        CheckpointError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"
    ):
        apply_adapter(tiny(d_model=96, n_heads=4), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        apply_adapter(tiny(), tmp_path / "ad")


# ------------------------------------------------------------------------------------ PEFT interop
def hf_pair(seed: int = 0):
    """A random transformers Llama and an llmlab Transformer holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    ours = Transformer(ModelConfig(**CFG, d_ff=192, norm_eps=1e-5)).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, ours(IDS), atol=1e-4)
    return hf, ours


def test_llmlab_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    hf, ours = hf_pair()
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=["q", "v", "gate", "down"]))
    randomize_b(ours)
    save_adapter(ours, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        ref, got = peft_model(IDS).logits, ours(IDS)
        assert (got - hf_pair()[1](IDS)).abs().max() > 1e-3  # the adapter really changes the output
    assert torch.allclose(ref, got, atol=1e-4)


def test_peft_adapter_loads_in_llmlab(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, ours = hf_pair()
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.0)
    )
    g = torch.Generator().manual_seed(3)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model.eval()
    apply_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(peft_model(IDS).logits, ours(IDS), atol=1e-4)


def test_qlora_wraps_nf4_base_and_trains_adapters_only():
    from llmlab.quant.nf4 import NF4Linear
    from llmlab.quant.qlora import quantize_for_qlora

    model = tiny()
    full = model(IDS)
    mem = quantize_for_qlora(model, ["all"])
    assert isinstance(model.layers[0].mlp.down_proj, NF4Linear)
    assert 3.5 < mem["bf16_bytes"] / mem["nf4_bytes"] < 4.0  # 4.127 bits per weight with double quantization
    quantized = model(IDS)
    assert 0 < (quantized - full).abs().max() < 0.1 * full.abs().max()  # NF4 error: small but real
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["all"]))
    assert torch.equal(model(IDS), quantized)  # fresh adapters change nothing
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    randomize_b(model)
    model.train()
    model(IDS).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_A." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ConfigError, match="quantized base"):
        merge_lora(model)
