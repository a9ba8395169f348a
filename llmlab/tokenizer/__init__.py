"""Tokenizer: a thin, typed wrapper over a Hugging Face ``tokenizers.Tokenizer`` (``tokenizer.json``).

It adds what the pipeline needs on top of encode/decode: the bos/eos/pad ids, the chat role markers and the
chat template (a Jinja string, as in ``tokenizer_config.json`` or GGUF metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from llmlab.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves the chat template

# Special tokens of the tokenizers llmlab trains. ChatML-style role markers for chat models.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]
# The masked-LM objective's [MASK]. Not trained into tokenizers: :meth:`Tokenizer.add_mask_token` appends it
# after the existing vocabulary, so every other id (and every prepared token shard) stays valid.
MASK = "<|mask|>"

# ChatML, the chat format of Qwen2 and SmolLM2: every message is ``<|im_start|>{role}\n{content}<|im_end|>\n``;
# ``add_generation_prompt`` opens the assistant turn. Tokenizers trained by llmlab store it as their template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token: str | None = BOS
    eos_token: str | None = EOS
    pad_token: str | None = PAD
    chat_template: str | None = None
    # Extra ids that end generation (e.g. <|im_end|> for chat models whose eos differs).
    extra_stop_tokens: list[str] = field(default_factory=list)
    add_bos: bool = False
    mask_token: str | None = None  # set by add_mask_token() for MLM models

    # ------------------------------------------------------------------------------------ encode
    def encode(
        self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of ``text``.

        Like Hugging Face tokenizers, text that spells a special token (``"<|im_end|>"``) is encoded AS that
        special token by default: chat templates are rendered to a string and rely on this. For untrusted
        text (a user message, a document) pass ``split_special_tokens=True``: such strings are then encoded
        as ordinary characters, so the text cannot forge a role marker or an end of sequence.
        """
        backend = self.plain_backend() if split_special_tokens else self.backend
        ids = backend.encode(text, add_special_tokens=False).ids
        if (add_special_tokens or self.add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def plain_backend(self) -> HFTokenizer:
        """A copy of the backend that never matches special tokens in text (built once, then cached)."""
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self.__dict__["_plain"] = plain
        return plain

    def encode_batch(self, texts: list[str], split_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust backend (see :meth:`encode`)."""
        backend = self.plain_backend() if split_special_tokens else self.backend
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        pad = self._id(self.pad_token)
        return pad if pad is not None else self.eos_id

    @property
    def mask_id(self) -> int | None:
        return self._id(self.mask_token)

    def add_mask_token(self) -> int:
        """The id of :data:`MASK`, appended as a special token (id = old vocab size) when missing."""
        if self.backend.token_to_id(MASK) is None:
            self.backend.add_special_tokens([MASK])
            self.__dict__.pop("_plain", None)  # the cached plain backend predates the new token
        self.mask_token = MASK
        return self.backend.token_to_id(MASK)

    @property
    def stop_ids(self) -> list[int]:
        ids = [self.eos_id] + [self._id(t) for t in self.extra_stop_tokens]
        return sorted({i for i in ids if i is not None})

    # -------------------------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        meta = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "extra_stop_tokens": self.extra_stop_tokens,
            "add_bos_token": self.add_bos,
        }
        if self.mask_token is not None:
            meta["mask_token"] = self.mask_token
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` (or a directory holding one, plus ``tokenizer_config.json`` if present).

        ``tokenizer_config.json`` is read in either llmlab's or transformers' layout (special tokens may be
        strings or ``{"content": ...}`` dicts).
        """
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"{file}: tokenizer file not found")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{file}: not a valid tokenizer.json ({exc})") from exc
        meta: dict = {}
        cfg_file = directory / TOKENIZER_CONFIG_FILE
        if cfg_file.is_file():
            try:
                meta = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{cfg_file}:{exc.lineno}: invalid JSON ({exc.msg})") from exc

        def token(key: str) -> str | None:
            value = meta.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return value

        chat_template = meta.get("chat_template")
        template_file = directory / CHAT_TEMPLATE_FILE
        if chat_template is None and template_file.is_file():
            # transformers >= 4.43 saves the template beside tokenizer_config.json instead of inside it.
            chat_template = template_file.read_text(encoding="utf-8")
        tok = cls(
            backend=backend,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            pad_token=token("pad_token"),
            chat_template=chat_template,
            extra_stop_tokens=list(meta.get("extra_stop_tokens", [])),
            add_bos=bool(meta.get("add_bos_token", False)),
            mask_token=token("mask_token"),
        )
        if not meta:
            # A bare tokenizer.json: guess the special tokens from its added vocabulary.
            added = {t.content for t in backend.get_added_tokens_decoder().values()}
            tok.bos_token = next(
                (t for t in (BOS, "<s>", "<|endoftext|>", "<|begin_of_text|>") if t in added), None
            )
            tok.eos_token = next(
                (t for t in (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>") if t in added), None
            )
            tok.pad_token = next((t for t in (PAD, "<pad>") if t in added), None)
            if IM_END in added:
                tok.extra_stop_tokens = [IM_END]
        return tok
