"""GGUF export (issue 21 section 4): what we write loads back into llmlab (exactly for F32/F16, within the
type's rounding for Q8_0/Q4_0), transformers' GGUF loader reads it and generates our greedy tokens, and what
the format cannot hold is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from _interop_helpers import tiny_tokenizer  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from llmlab.cli import main  # noqa: E402
from llmlab.errors import ConfigError  # noqa: E402
from llmlab.infer import LLM, SamplingParams  # noqa: E402
from llmlab.interop.gguf import load_gguf  # noqa: E402
from llmlab.interop.gguf_export import gguf_tensor_name, permute_qk, save_gguf  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.model.checkpoint import save_checkpoint  # noqa: E402

VOCAB = 320  # the tokenizer has 291 tokens: the rest are written as unused [PADn] tokens


def _model(**kw) -> Transformer:
    cfg = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
               tie_embeddings=False)  # fmt: skip
    cfg.update(kw)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_float_export_loads_back_identical(tmp_path, qtype):
    model, tok = _model(), tiny_tokenizer(300)
    report = save_gguf(tmp_path / "m.gguf", model, tok, qtype)
    assert report["arch"] == "llama"
    assert report["types"] == ({"F32": 21} if qtype == "f32" else {"F32": 5, "F16": 16})  # norms stay F32
    loaded, ltok = load_gguf(tmp_path / "m.gguf")
    expected = model.state_dict()
    if qtype == "f16":
        expected = {k: v.half().float() if v.dim() == 2 else v for k, v in expected.items()}
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name  # names and the q/k permutation round-trip
    reference = _model()
    reference.load_state_dict(expected)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), reference(_ids()))
    text = "hello world, héllo 日本<|im_end|>"
    assert ltok.encode(text) == tok.encode(text)
    assert (ltok.bos_token, ltok.eos_token, ltok.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert ltok.chat_template == tok.chat_template and ltok.extra_stop_tokens == ["<|im_end|>"]


def test_quantized_export_is_the_gguf_rounding_of_each_weight(tmp_path):
    """Q8_0/Q4_0: each weight we load back is exactly gguf's quantize-dequantize of ours, and the logits'
    error is bounded by the type (Q8_0 far below Q4_0)."""
    model = _model(tie_embeddings=True)
    errors = {}
    for qtype in ("q8_0", "q4_0"):
        report = save_gguf(tmp_path / f"{qtype}.gguf", model, tiny_tokenizer(300), qtype)
        kind = Q[qtype.upper()]
        # Q4_0: the tied embedding (the output head) stays Q8_0, as llama-quantize keeps the head at more bits.
        assert report["types"] == (
            {"Q8_0": 15, "F32": 5} if qtype == "q8_0" else {"Q4_0": 14, "Q8_0": 1, "F32": 5}
        )
        reader = gguf.GGUFReader(tmp_path / f"{qtype}.gguf")
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == kind and types["blk.0.attn_norm.weight"] == Q.F32
        loaded, _ = load_gguf(tmp_path / f"{qtype}.gguf")
        for name, value in model.state_dict().items():
            if value.dim() == 1 or name == "lm_head.weight":
                continue
            gname = gguf_tensor_name(name)
            w = value.float()
            if "attn_q" in gname or "attn_k" in gname:
                w = permute_qk(w, 4 if "attn_q" in gname else 2)
            t = types[gname]
            rounded = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t), t)
            expected = torch.from_numpy(np.ascontiguousarray(rounded)).reshape(w.shape)
            if "attn_q" in gname or "attn_k" in gname:  # undo the permutation (inverse: swap the axes back)
                h = 4 if "attn_q" in gname else 2
                expected = expected.reshape(h, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
            assert torch.equal(loaded.state_dict()[name], expected), name
        with torch.no_grad():
            errors[qtype] = _rel(loaded(_ids()), model(_ids()))
    assert 0 < errors["q8_0"] < 0.02 and errors["q8_0"] * 5 < errors["q4_0"] < 0.3, errors


@pytest.mark.parametrize("qtype,qkv_bias", [("f32", False), ("q8_0", False), ("f16", True)])
def test_transformers_reads_our_gguf_and_generates_our_greedy_tokens(tmp_path, qtype, qkv_bias):
    transformers = pytest.importorskip("transformers")
    model, tok = _model(qkv_bias=qkv_bias), tiny_tokenizer(300)
    report = save_gguf(tmp_path / "m.gguf", model, tok, qtype)
    assert report["arch"] == ("qwen2" if qkv_bias else "llama")
    ours, our_tok = load_gguf(tmp_path / "m.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(ref(_ids()).logits, ours(_ids()), atol=1e-4, rtol=0)
    for text in ["hello world", "héllo wörld 日本, a small test", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert ref_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
    prompt = tok.encode("hello world, a")
    llm = LLM.from_model(ours, our_tok)
    mine = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[
        0
    ].token_ids
    with torch.no_grad():
        theirs = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.pad_id,
        )[0, len(prompt) :].tolist()
    assert mine == theirs


def test_cli_convert_to_gguf_from_checkpoint_and_quantized(tmp_path, capsys):
    model, tok = _model(), tiny_tokenizer(300)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    assert (
        main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")]) == 0
    )  # --to gguf from the suffix
    assert "gguf, arch llama, tensors: 16 F16, 5 F32" in capsys.readouterr().err  # f16 is the default
    assert main(["quantize", str(tmp_path / "ckpt"), str(tmp_path / "q"), "--scheme", "int8"]) == 0
    capsys.readouterr()
    rc = main(["convert", str(tmp_path / "q"), str(tmp_path / "q.gguf"), "--to", "gguf", "--type", "q8_0"])
    err = capsys.readouterr().err
    assert rc == 0 and "is quantized (Int8Linear)" in err and "16 Q8_0" in err
    from llmlab.quant.common import dequantize_model
    from llmlab.quant.quantize import load_quantized

    quantized, _ = load_quantized(tmp_path / "q")
    dequantize_model(quantized)
    loaded, _ = load_gguf(tmp_path / "q.gguf")
    with torch.no_grad():
        assert _rel(loaded(_ids()), quantized(_ids())) < 0.02


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    learned = Transformer(
        ModelConfig(
            vocab_size=VOCAB,
            d_model=64,
            n_layers=1,
            n_heads=4,
            position="learned",
            norm="layernorm",
            ffn="gelu",
            activation="gelu_tanh",
            arch="gpt2",
        )  # fmt: skip
    )
    with pytest.raises(ConfigError, match=r"cannot export to GGUF: position='learned'"):
        save_gguf(tmp_path / "x.gguf", learned, None)
    save_checkpoint(tmp_path / "gpt2", learned, None)
    assert main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "x.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "position='learned'" in err and "Traceback" not in err
    save_checkpoint(tmp_path / "ok", _model(), None)
    for qtype, message in [
        ("q4_k", "the gguf package (0.19.0) cannot write Q4_K tensors"),
        ("tq1_0", "llmlab does not write TQ1_0"),
        ("int3", "'int3': not a GGUF tensor type"),
    ]:
        assert (
            main(["convert", str(tmp_path / "ok"), str(tmp_path / "x.gguf"), "--to", "gguf", "--type", qtype])
            == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message.replace("0.19.0", gguf_version()) in err, err
    assert not (tmp_path / "x.gguf").exists()
    assert main(["convert", str(tmp_path / "ok"), str(tmp_path / "hf"), "--to", "hf", "--type", "q8_0"]) == 2
    assert "--type q8_0 applies to --to gguf only" in capsys.readouterr().err
    bad_vocab = _model(vocab_size=200)
    with pytest.raises(ConfigError, match="291 tokens but the model's vocab_size is 200"):
        save_gguf(tmp_path / "x.gguf", bad_vocab, tiny_tokenizer(300))


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


# ------------------------------------------------------------------------------------ real SmolLM2 file
@pytest.mark.slow
def test_smollm2_round_trip_through_q8_0(smollm2_gguf, tmp_path):
    """SmolLM2 Q4_1 GGUF -> llmlab -> our Q8_0 GGUF -> llmlab and transformers: same greedy tokens."""
    transformers = pytest.importorskip("transformers")
    model, tok = load_gguf(smollm2_gguf)
    report = save_gguf(tmp_path / "smol-q8_0.gguf", model, tok, "q8_0")
    reader = gguf.GGUFReader(tmp_path / "smol-q8_0.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert report["bytes"] < 150 * 2**20
    back, back_tok = load_gguf(tmp_path / "smol-q8_0.gguf")
    prompt = tok.encode(
        tok.chat_template
        and "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert back_tok.encode("  héllo 2024 <|im_end|>") == tok.encode("  héllo 2024 <|im_end|>")
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    before = LLM.from_model(model, tok).generate([prompt], params)[0].token_ids
    after = LLM.from_model(back, back_tok).generate([prompt], params)[0].token_ids
    assert after == before, (tok.decode(before), tok.decode(after))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smol-q8_0.gguf").eval()
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert theirs[0, len(prompt) :].tolist() == after
