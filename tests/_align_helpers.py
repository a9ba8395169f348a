"""Shared fixtures for the alignment tests: a small BPE chat tokenizer and tiny models (built, not downloaded)."""

from __future__ import annotations

from functools import lru_cache

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmlab.data import tasks
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.tokenizer import DEFAULT_SPECIAL_TOKENS, IM_END, Tokenizer


@lru_cache(maxsize=1)
def chat_tokenizer() -> Tokenizer:
    """Byte-level BPE (vocab 512) trained on task-suite prompts/answers, with llmlab's special tokens."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=DEFAULT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [r["prompt"] + " " + r["answer"] for r in tasks.make_sft_examples(600, seed=5)]
    texts += ["user assistant system Human Assistant Sure! The answer is"]
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, extra_stop_tokens=[IM_END])


def tiny_cfg(vocab: int, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_cfg(chat_tokenizer().vocab_size, **kw))


def train_tiny_sft(out_dir, steps: int = 400, n_examples: int = 6000, seed: int = 0, **model_kw):
    """A from-scratch chat model SFT'd on the task suite (the CPU demo's 'SFT model'), saved to ``out_dir``.

    Uses the SFT stage's own tokenization/packing and the shared trainer; returns ``(model, tokenizer)``.
    """
    from pathlib import Path

    from llmlab.model.checkpoint import load_checkpoint, save_checkpoint
    from llmlab.sft.datasets import Conversation, SFTBatchSource, encode_conversations
    from llmlab.train import TrainConfig, Trainer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return load_checkpoint(out_dir)
    tok = chat_tokenizer()
    recs = tasks.make_sft_examples(n_examples, seed=seed)
    convs = [Conversation(r["messages"], f"tasks:{i}") for i, r in enumerate(recs)]
    examples = encode_conversations(tok, convs, max_len=128)
    kw = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=160)
    kw.update(model_kw)
    torch.manual_seed(seed)
    model = Transformer(tiny_cfg(tok.vocab_size, **kw))
    src = SFTBatchSource(examples, batch_size=16, seq_len=128, pad_id=tok.pad_id, seed=seed)
    cfg = TrainConfig(
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=20,
        max_steps=steps,
        batch_size=16,
        eval_every=0,
        log_every=50,
        progress=False,
        tensorboard=False,
        plot=False,
        precision="fp32",
        spike_factor=0.0,
        peak_tflops=1.0,
        weight_decay=0.0,
    )
    Trainer(model, cfg, src).fit()
    model.eval()
    save_checkpoint(out_dir, model, tok)
    return model, tok
