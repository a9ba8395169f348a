"""Train a byte-level BPE tokenizer (GPT-2 style) with the Rust ``tokenizers`` library.

Byte-level means the base vocabulary is the 256 byte values (``initial_alphabet`` = all of them, whether or
not the corpus shows them), so every string, in any script, with emoji or control characters, encodes and
decodes back exactly; no ``<unk>`` is ever needed. Text is split by GPT-2's pre-tokenization regex (words,
numbers, punctuation runs, whitespace) with ``add_prefix_space=False``, so ``decode(encode(s)) == s``.

The special tokens come first (ids 0..k-1, in the order given: ``<|bos|>`` 0, ``<|eos|>`` 1, ``<|pad|>`` 2,
``<|im_start|>`` 3, ``<|im_end|>`` 4 by default), then the 256 bytes, then the merges. ``vocab_size`` counts
all of them.

Special tokens in raw text: as in Hugging Face tokenizers, ``Tokenizer.encode("<|im_end|>")`` yields the
special id (chat templates are rendered to strings and need that). Pretraining data and other untrusted
text are encoded with ``split_special_tokens=True``, which spells such strings out as ordinary bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llmlab.errors import ConfigError, DataError
from llmlab.tokenizer import BOS, CHATML_TEMPLATE, DEFAULT_SPECIAL_TOKENS, EOS, IM_END, PAD, Tokenizer

N_BYTES = 256
MAX_VOCAB = 2**31 - 1


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = tuple(DEFAULT_SPECIAL_TOKENS),
    chat_template: str | None = CHATML_TEMPLATE,
    max_token_length: int | None = None,
    show_progress: bool = False,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (any iterable of strings, streamed).

    Args:
        vocab_size: final vocabulary size, including the special tokens and the 256 byte tokens. The
            result is smaller only if the corpus runs out of pairs seen ``min_frequency`` times.
        min_frequency: a pair must occur at least this often to be merged.
        special_tokens: added first, in order; the bos/eos/pad and chat markers by default.
        chat_template: Jinja chat template stored with the tokenizer (ChatML by default).
        max_token_length: longest token in characters (None: unbounded), e.g. to avoid ``=====`` tokens.
        length: number of texts, only for the progress bar.
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ConfigError(f"special_tokens has duplicates: {special_tokens}")
    floor = N_BYTES + len(special_tokens)
    if not floor <= vocab_size <= MAX_VOCAB:
        raise ConfigError(
            f"vocab_size must be at least {floor} (256 bytes + {len(special_tokens)} special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact (leading spaces belong to their token).
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=show_progress,
    )
    n_texts = 0

    def counted() -> Iterable[str]:
        nonlocal n_texts
        for text in texts:
            if not isinstance(text, str):
                raise DataError(f"train_tokenizer: expected str documents, got {type(text).__name__}")
            n_texts += 1
            yield text

    backend.train_from_iterator(counted(), trainer=trainer, length=length)
    if n_texts == 0:
        raise DataError("train_tokenizer: the corpus is empty")

    def pick(token: str) -> str | None:
        return token if token in special_tokens else None

    return Tokenizer(
        backend=backend,
        bos_token=pick(BOS),
        eos_token=pick(EOS),
        pad_token=pick(PAD),
        chat_template=chat_template,
        # Chat models trained on ChatML end their turn with <|im_end|>: generation stops there too.
        extra_stop_tokens=[IM_END] if IM_END in special_tokens else [],
    )


def tokenizer_stats(tok: Tokenizer, texts: Sequence[str], max_texts: int = 2000) -> dict[str, float]:
    """Compression of ``tok`` on (up to ``max_texts`` of) ``texts``: bytes and characters per token."""
    sample = list(texts[:max_texts])
    start = time.perf_counter()
    ids = tok.encode_batch(sample, split_special_tokens=True)
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(x) for x in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in sample)
    return {
        "tokens": float(n_tokens),
        "bytes_per_token": n_bytes / max(1, n_tokens),
        "chars_per_token": sum(len(t) for t in sample) / max(1, n_tokens),
        "encode_tokens_per_s": n_tokens / max(elapsed, 1e-9),
    }
