"""GGUF: tiny files written here (llama.cpp's layout, q/k rows permuted, quantized blocks) and the real
SmolLM2-135M-Instruct Q4_1 file, each checked against transformers' own GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from _interop_helpers import write_tiny_gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from llmlab.cli import main  # noqa: E402
from llmlab.errors import CheckpointError  # noqa: E402
from llmlab.interop.gguf import load_gguf  # noqa: E402
from llmlab.model import KVCache, ModelConfig, Transformer  # noqa: E402


def _tiny_model(**kw) -> Transformer:
    cfg = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64,
               rope_theta=10000.0, tie_embeddings=False)  # fmt: skip
    cfg.update(kw)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def _ids(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))


def test_tiny_f32_gguf_round_trip_undoes_permutation(tmp_path):
    model = _tiny_model()
    loaded, tokenizer = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", model))
    assert tokenizer is None and loaded.cfg.kv_heads == 2 and not loaded.cfg.tie_embeddings
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_quantized_gguf_matches_transformers(tmp_path, arch, tied):
    """Q8_0/Q4_0/Q4_1/F16 blocks: our dequantized model gives the logits transformers' GGUF loader gives."""
    transformers = pytest.importorskip("transformers")
    model = _tiny_model(tie_embeddings=tied, qkv_bias=arch == "qwen2", arch=arch)
    qtypes = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0,
              "token_embd": Q.Q8_0, "output.weight": Q.F16, "attn_output": Q.BF16}  # fmt: skip
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model, qtypes, arch=arch)
    ours, _ = load_gguf(path)
    assert (ours.cfg.arch, ours.cfg.qkv_bias, ours.cfg.tie_embeddings) == (arch, arch == "qwen2", tied)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ids = _ids()
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(logits, ref(ids).logits, atol=1e-4, rtol=0)
    # Each weight is close to its fp32 original, as close as its type allows (so it was not skipped).
    own = model.state_dict()
    for name, bound in [
        ("layers.0.self_attn.v_proj.weight", 0.01),
        ("layers.1.self_attn.q_proj.weight", 0.15),
        ("layers.0.self_attn.k_proj.weight", 0.15),
        ("layers.1.self_attn.o_proj.weight", 0.01),
    ]:
        rel = (ours.state_dict()[name] - own[name]).norm() / own[name].norm()
        assert 1e-5 < rel < bound, (name, rel)


def test_unsupported_tensor_type_names_tensor(tmp_path, capsys):
    model = _tiny_model(d_ff=256)  # Q2_K blocks are 256 wide
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(256)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((96, 64), np.float32))
    # 64 rows of one Q2_K block (84 bytes) each: a valid Q2_K tensor that llmlab does not dequantize.
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((64, 84), np.uint8), raw_dtype=Q.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    del model
    with pytest.raises(CheckpointError, match=r"bad\.gguf: tensor 'blk\.0\.ffn_down\.weight' has type Q2_K"):
        load_gguf(path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Q2_K" in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf: not a valid GGUF file"):
        load_gguf(path)


# ------------------------------------------------------------------------------------ real SmolLM2 file
PROMPTS = ["Write a short story about a robot who learns to paint."]  # a long answer: 20 tokens without eos
STRINGS = [
    "Hello world!",
    "  héllo wörld — naïve café, 日本語のテキスト 🤗\n\ttabs and\r\nnewlines",
    "In 2024, 3.14159 × 12 = 37.699",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x**2  # comment",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(ours, our tokenizer, transformers model, transformers tokenizer), loaded once for the module."""
    transformers = pytest.importorskip("transformers")
    model, tokenizer = load_gguf(smollm2_gguf)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    ).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tokenizer, ref, ref_tok


def test_smollm2_config_and_tokenizer(smollm2):
    model, tok, _, ref_tok = smollm2
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>") and "SmolLM" in tok.chat_template
    for text in STRINGS:
        ids = tok.encode(text)
        assert ids == ref_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text
    # SmolLM's pre-tokenizer splits digits one by one.
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def _greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Minimal greedy decode with the KV cache (the engine lives in llmlab.infer; this checks the model)."""
    cache = KVCache(model.cfg, batch_size=1, max_len=len(prompt) + n)
    logits = model(torch.tensor([prompt]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache)
    return out


def test_smollm2_greedy_generation_matches_transformers(smollm2):
    model, tok, ref, ref_tok = smollm2
    for question in PROMPTS:
        text = ref_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
        prompt = tok.encode(text)
        assert prompt == ref_tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ours = _greedy(model, prompt, 20)
            theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[
                0, len(prompt) :
            ]
        theirs = theirs.tolist()  # shorter than 20 only if it stopped on the eos token
        assert len(theirs) == 20 or theirs[-1] == tok.eos_id
        assert ours[: len(theirs)] == theirs, (tok.decode(ours), tok.decode(theirs))
        assert len(tok.decode(theirs).strip()) > 10
