"""Shared fixtures for the inference tests: a small byte-level BPE tokenizer and tiny random models."""

from __future__ import annotations

from functools import lru_cache

import torch

from llmlab.model import KVCache, ModelConfig, Transformer
from llmlab.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are "
    "all resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius "
    "Marcius is chief enemy to the people. All: We know't, we know't. First Citizen: Let us kill him, and "
    "we'll have corn at our own price. Is't a verdict? All: No more talking on't; let it be done: away, away! "
    "Second Citizen: One word, good citizens. Once upon a time there was a little girl who loved the sea. "
)


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """Byte-level BPE (~290 ids) with llmlab's special tokens and ChatML template defaults."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=DEFAULT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator([TEXT] * 4, trainer)
    return Tokenizer(hf, extra_stop_tokens=["<|im_end|>"])


def model(seed: int = 0, **overrides) -> Transformer:
    """A tiny random model with peaked outputs (init_std 0.2), so greedy argmaxes have clear margins."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=tokenizer().vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96
    )
    kw.update(init_std=0.2)
    kw.update(overrides)
    return Transformer(ModelConfig(**kw)).eval()


def reference_greedy(m: Transformer, prompt: list[int], max_tokens: int, stop_ids=()) -> list[int]:
    """Plain one-request greedy loop over the contiguous KV cache and the model's own forward."""
    cache = KVCache(m.cfg, 1, len(prompt) + max_tokens)
    out: list[int] = []
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_tokens):
            tok = int(m(x, cache=cache)[0, -1].argmax())
            out.append(tok)
            if tok in stop_ids:
                break
            x = torch.tensor([[tok]])
    return out


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 20, vocab: int = 250) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(5, vocab, (L,), generator=g).tolist() for L in lens]


def one_thread():
    """Run a test module's tiny models on one thread: with the machine's 2 cores shared by other processes,
    two OpenMP threads per tiny op wait on each other and run 10-20x slower than one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
