"""Chat prompts and the terminal chat loop behind ``llmlab chat``.

Messages are rendered with the tokenizer's own Jinja chat template (or llmlab's ChatML) by
:mod:`llmlab.sft.chat`, the same renderer SFT trains with, so a model is prompted exactly as it was tuned.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from llmlab.errors import LLMLabError

HELP = "commands: /reset (clear history), /system TEXT (set the system prompt), /exit"


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render a message list to prompt text (special tokens as text; see :func:`encode_chat` for its ids)."""
    from llmlab.sft.chat import render, template_for

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LLMLabError(f"chat message {i} must have 'role' and 'content'")
    return render(
        messages,
        template_for(tokenizer),
        add_generation_prompt=add_generation_prompt,
        bos_token=getattr(tokenizer, "bos_token", None),
        eos_token=getattr(tokenizer, "eos_token", None),
    )


def encode_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> tuple[str, list[int]]:
    """Prompt text and token ids of a message list, without adding BOS (as :func:`render_chat`).

    Unlike encoding :func:`render_chat`'s text, message content is encoded as plain text: a user message
    that spells ``<|im_end|>`` and ``<|im_start|>assistant`` cannot close its turn and forge an assistant turn.
    """
    from llmlab.sft.chat import encode_chat_prompt, template_for

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LLMLabError(f"chat message {i} must have 'role' and 'content'")
    return encode_chat_prompt(
        tokenizer,
        messages,
        template_for(tokenizer),
        add_generation_prompt=add_generation_prompt,
        add_bos=False,
        where="chat",
    )


def chat_stop_ids(tokenizer: Any) -> list[int]:
    """Ids that end an assistant turn: the tokenizer's stop ids plus ``<|im_end|>`` when it exists."""
    ids = set(getattr(tokenizer, "stop_ids", []) or [])
    im_end = tokenizer.token_to_id("<|im_end|>") if hasattr(tokenizer, "token_to_id") else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


class ChatSession:
    """Multi-turn history with a system prompt; :meth:`send` streams the assistant's reply."""

    def __init__(self, llm: Any, params: Any, system: str | None = None):
        self.llm = llm
        self.params = params
        self.system = system
        self.history: list[dict[str, str]] = []
        self.last_finish_reason: str | None = None  # "length" when the last reply hit max_tokens

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history = []

    def send(self, user_text: str, on_delta: Callable[[str], None] = lambda s: None) -> str:
        """Add a user turn, stream the reply through ``on_delta``, record and return it."""
        import dataclasses

        self.history.append({"role": "user", "content": user_text})
        params = dataclasses.replace(
            self.params,
            stop_token_ids=sorted(
                set(self.params.stop_token_ids or []) | set(chat_stop_ids(self.llm.tokenizer))
            ),
        )
        reply = ""
        try:
            for out in self.llm.stream(self.messages(), params):
                if out.delta_text:
                    on_delta(out.delta_text)
                reply = out.text
                self.last_finish_reason = out.finish_reason
        except BaseException:
            self.history.pop()  # a failed or interrupted turn leaves no trace
            raise
        self.history.append({"role": "assistant", "content": reply})
        return reply


def run_chat(
    llm: Any, params: Any, system: str | None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout
) -> int:
    """The REPL: reads lines, streams replies, handles /reset, /system TEXT, /exit."""
    session = ChatSession(llm, params, system)
    print(HELP, file=stdout)
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            print(file=stdout)
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            session.reset()
            print("(history cleared)", file=stdout)
            continue
        if line.startswith("/system"):
            session.system = line[len("/system") :].strip() or None
            session.reset()
            print(f"(system prompt {'set' if session.system else 'cleared'}; history cleared)", file=stdout)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=stdout)
            continue
        try:
            session.send(line, lambda s: (stdout.write(s), stdout.flush()))
        except LLMLabError as exc:
            print(f"\nerror: {exc}", file=stdout)
            continue
        except KeyboardInterrupt:
            print("\n(interrupted)", file=stdout)
            continue
        print(file=stdout)
        if session.last_finish_reason == "length":  # a silent cut reads like a finished answer
            print(
                f"(reply cut at the max_tokens limit of {params.max_tokens}; raise it with max_tokens=N)",
                file=stdout,
            )
