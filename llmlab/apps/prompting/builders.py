"""Prompt builders: chat messages for zero-shot, few-shot and chain-of-thought prompting.

Every builder returns a :class:`Prompt`: a chat message list (rendered by the model's own chat template when
the engine encodes it, exactly as ``llmlab chat`` and the server do) plus an optional ``assistant_prefix``,
text the assistant turn is forced to start with. Zero-shot chain of thought (Kojima et al. 2022) puts its
trigger there (``"Let's think step by step."``), so the model continues a reasoning it has already begun
instead of being asked to reason.

- zero-shot: ``[system?] user: question + instruction``;
- few-shot: the exemplars as earlier user/assistant turns, then the question (the multi-turn form a chat
  model was tuned on, rather than one long user message);
- few-shot CoT (Wei et al. 2022): the same, each exemplar's reply being its worked solution followed by
  ``"The answer is N."``;
- zero-shot CoT: the zero-shot messages plus the trigger as the assistant prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmlab.errors import LLMLabError
from llmlab.infer.chat import render_chat

Message = dict[str, str]
COT_TRIGGER = "Let's think step by step."
TECHNIQUES = ("zero", "fewshot", "cot", "fewshot-cot", "self-consistency")


@dataclass(frozen=True)
class Exemplar:
    """One worked example: a question, its final answer and (for chain of thought) a worked solution."""

    question: str
    answer: str
    rationale: str = ""

    def reply(self, cot: bool) -> str:
        """The assistant turn: the bare answer, or the solution ending in ``The answer is N.``."""
        if not cot:
            return self.answer
        if not self.rationale:
            raise LLMLabError(
                f"exemplar {self.question[:40]!r}... has no worked solution for chain of thought"
            )
        return f"{self.rationale}\nThe answer is {self.answer}."


@dataclass
class Prompt:
    """Chat messages plus the text the assistant's reply is forced to begin with ('' for none)."""

    messages: list[Message]
    assistant_prefix: str = ""

    def engine_prompt(self, llm: Any) -> list[Message] | list[int]:
        """What ``LLM.generate`` takes: the messages, or their token ids followed by the prefix's tokens."""
        if not self.assistant_prefix:
            return self.messages
        _, ids = llm.encode_prompt(self.messages)
        # encode_batch: the prefix as plain text (no BOS, a literal special-token string stays text).
        return ids + llm.tokenizer.encode_batch([self.assistant_prefix], split_special_tokens=True)[0]

    def render(self, tokenizer: Any) -> str:
        """The prompt as text (special tokens spelled out): what the model reads, for display and tests."""
        return render_chat(tokenizer, self.messages) + self.assistant_prefix


def messages(user: str, system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> list[Message]:
    """``[system] + (user, assistant) * history + [user]`` as chat messages."""
    if not isinstance(user, str) or not user.strip():
        raise LLMLabError("the question is empty")
    out: list[Message] = [{"role": "system", "content": system}] if system else []
    for question, answer in history:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [*out, {"role": "user", "content": user}]


def _ask(question: str, instruction: str) -> str:
    return f"{question.strip()}\n{instruction}" if instruction else question.strip()


def zero_shot(question: str, instruction: str = "", system: str | None = None) -> Prompt:
    return Prompt(messages(_ask(question, instruction), system))


def few_shot(
    question: str,
    exemplars: Sequence[Exemplar],
    instruction: str = "",
    system: str | None = None,
    cot: bool = False,
) -> Prompt:
    """The exemplars as earlier turns (each asked with the same ``instruction``), then the question."""
    history = [(_ask(e.question, instruction), e.reply(cot)) for e in exemplars]
    return Prompt(messages(_ask(question, instruction), system, history))


def zero_shot_cot(
    question: str, instruction: str = "", system: str | None = None, trigger: str = COT_TRIGGER
) -> Prompt:
    return Prompt(messages(_ask(question, instruction), system), assistant_prefix=trigger)


def build(
    technique: str,
    question: str,
    exemplars: Sequence[Exemplar] = (),
    instruction: str = "",
    cot_instruction: str = "",
    system: str | None = None,
) -> Prompt:
    """The prompt of one technique (``self-consistency`` samples the zero-shot CoT prompt).

    ``instruction`` is the answer-format request of direct answers ("Answer with the number only.");
    ``cot_instruction`` replaces it for chain of thought ('End with "The answer is N."').
    """
    if technique == "zero":
        return zero_shot(question, instruction, system)
    if technique == "fewshot":
        return few_shot(question, exemplars, instruction, system)
    if technique in ("cot", "self-consistency"):
        return zero_shot_cot(question, cot_instruction, system)
    if technique == "fewshot-cot":
        return few_shot(question, exemplars, cot_instruction, system, cot=True)
    raise LLMLabError(f"unknown technique {technique!r} (one of {', '.join(TECHNIQUES)})")


def is_cot(technique: str) -> bool:
    return technique in ("cot", "fewshot-cot", "self-consistency")
