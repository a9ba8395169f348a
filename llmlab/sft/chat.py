"""Chat templates, rendering and assistant-only loss masks.

A conversation is a list of ``{"role": ..., "content": ...}`` messages. It is rendered to text with a Jinja
chat template -- llmlab's ChatML template (``<|im_start|>role\\n...<|im_end|>\\n``) for models we train, or a
checkpoint's own template (``tokenizer.chat_template``, e.g. SmolLM2's from its GGUF metadata) -- and then
tokenized once.

**Which tokens count for the loss.** Only assistant content and the end marker that closes it (the first
stop token after it, e.g. ``<|im_end|>``) get a label; every system/user token and every template token
(role headers, the newline after the end marker, a default system prompt) gets ``-100``. The spans are found
without knowing anything about the template:

1. If the template marks assistant text with ``{% generation %} ... {% endgeneration %}`` (transformers'
   convention), those blocks are the spans.
2. Otherwise render each prefix incrementally: the text that ``messages[:i+1]`` adds to
   ``messages[:i]`` rendered *with the generation prompt* is exactly assistant turn ``i`` plus the template's
   end text. Inside that diff the content is located, and the span runs to the end of the first stop
   token after it. Templates that rewrite earlier turns (not prefix-stable) fall back to searching each
   assistant content in order in the full render.

Token labels then come from the tokenizer's character offsets: a token counts when it overlaps a span.

**Message content is always plain text.** The template's own control tokens (``<|im_start|>``,
``<|im_end|>``, a bos) encode as their special ids, but a message that merely *contains* such a string is
encoded as ordinary byte-level tokens: otherwise a user could close their turn and open a forged assistant
turn (prompt injection), and the forged turn would even be counted by the assistant-only mask. Before
rendering, special-token strings inside content are bracketed by two Unicode noncharacters; after rendering
the brackets are removed and the text is encoded with special-token matching switched off between the
template's control tokens. A conversation without such strings takes the plain single-``encode`` path, so its
ids are exactly what they always were.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from llmlab.errors import DataError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100

# llmlab's ChatML template. Unknown roles stop with an error instead of being rendered silently.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ' (the template knows system, user, assistant)') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Sentinels substituted for {% generation %} blocks; private-use code points never appear in real text.
_GEN_START, _GEN_END = "\ue000", "\ue001"
# Brackets around special-token strings found in message content while the template renders. Unicode
# noncharacters are never assigned and "not for interchange"; content that contains them is rejected.
_LIT_START, _LIT_END = "\ufdd0", "\ufdd1"


class TemplateError(DataError):
    """The chat template refused a conversation (unknown role, bad order) or failed to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2  # only for a model's own Jinja template (ChatML renders without it); slow to import
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Templates come from checkpoints we did not write: render them sandboxed, as transformers does.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    src = template.replace("{% generation %}", _GEN_START).replace("{% endgeneration %}", _GEN_END)
    src = src.replace("{%- generation -%}", _GEN_START).replace("{%- endgeneration -%}", _GEN_END)
    # The sentinels must reach the output as text: wrap them in expression blocks.
    src = src.replace(_GEN_START, "{{ '" + _GEN_START + "' }}").replace(_GEN_END, "{{ '" + _GEN_END + "' }}")
    try:
        return env.from_string(src)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template line {exc.lineno}: {exc.message}") from exc


def render(
    messages: Sequence[dict[str, Any]],
    template: str = CHATML_TEMPLATE,
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """Render a conversation to text with a Jinja chat template."""
    return _strip_sentinels(_render_raw(messages, template, add_generation_prompt, bos_token, eos_token))


def _render_raw(messages, template, add_generation_prompt, bos_token, eos_token) -> str:
    import jinja2  # see _compile: loaded only when a Jinja template is rendered

    try:
        return _compile(template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except TemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template failed: {exc}") from exc


def _strip_sentinels(text: str) -> str:
    return text.replace(_GEN_START, "").replace(_GEN_END, "")


def template_for(tokenizer: Any) -> str:
    """A tokenizer's own chat template, else llmlab's ChatML."""
    return getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def validate_messages(messages: Any, where: str = "conversation") -> list[dict[str, str]]:
    """Check a conversation's shape: a non-empty list of known roles with string content and an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})"
            )
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to learn from)")
    return out


# --------------------------------------------------------------------------------------- loss spans
def assistant_spans(
    messages: Sequence[dict[str, Any]],
    template: str,
    stop_strings: Sequence[str] = (),
    bos_token: str | None = None,
    eos_token: str | None = None,
    where: str = "conversation",
) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans ``[start, end)`` that count for the loss."""
    kw = {"bos_token": bos_token, "eos_token": eos_token}
    raw = _render_raw(messages, template, False, **kw)
    if _GEN_START in raw:
        return _generation_spans(raw)
    text = raw
    spans: list[tuple[int, int]] = []
    prefix_stable = True
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], template, add_generation_prompt=True, **kw)
        upto = render(messages[: i + 1], template, add_generation_prompt=False, **kw)
        if not (upto.startswith(before) and text.startswith(upto)):
            prefix_stable = False
            break
        spans.append(_content_span(upto, len(before), len(upto), m["content"], stop_strings))
    if not prefix_stable:
        spans = _search_spans(text, messages, stop_strings, where)
    return text, spans


def _content_span(text: str, start: int, end: int, content: str, stops: Sequence[str]) -> tuple[int, int]:
    """Within ``text[start:end]`` (one assistant turn plus template text), the content and its end marker."""
    diff = text[start:end]
    needle = content.strip()
    at = diff.find(needle) if needle else 0
    if at < 0:
        return start, end  # the template rewrote the content: count the whole turn
    c_start, c_end = start + at, start + at + len(needle)
    # Extend to the end of the first stop string after the content (e.g. <|im_end|>); drop template text after.
    best = None
    for s in stops:
        j = text.find(s, c_end, end)
        if j >= 0 and (best is None or j < best[0]):
            best = (j, j + len(s))
    if best is not None:
        return c_start, best[1]
    return c_start, end


def _search_spans(text: str, messages, stops, where: str) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        needle = m["content"].strip()
        at = text.find(needle, cursor)
        if at < 0:
            raise TemplateError(f"{where}: cannot locate an assistant turn in the rendered chat template")
        span = _content_span(text, at, len(text), needle, stops)
        spans.append(span)
        cursor = span[1]
    return spans


def _generation_spans(raw: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the generation sentinels and return the spans they enclosed (in the cleaned text)."""
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    start = 0
    for ch in raw:
        if ch == _GEN_START:
            start = len(text)
        elif ch == _GEN_END:
            spans.append((start, len(text)))
        else:
            text.append(ch)
    return "".join(text), spans


@dataclass
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where the token does not count

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def tokenize_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    template: str | None = None,
    where: str = "conversation",
) -> TokenizedChat:
    """Token ids of a rendered conversation and per-token labels (the token itself, or -100).

    ``labels[t]`` says whether token ``t`` is a target; shifting for next-token prediction happens in
    batching (the label of position ``t`` is token ``t + 1``).
    """
    template = template or template_for(tokenizer)
    stops = [s for s in [tokenizer.eos_token, *getattr(tokenizer, "extra_stop_tokens", [])] if s]
    if template == CHATML_TEMPLATE and "<|im_end|>" not in stops:
        stops.append("<|im_end|>")
    shielded = _shield(messages, _special_strings(tokenizer), where)
    try:
        text, spans = assistant_spans(
            shielded, template, stops, tokenizer.bos_token, tokenizer.eos_token, where
        )
    except TemplateError as exc:
        msg = str(exc)
        raise TemplateError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    text, literals, index = _unmark(text)
    if index is not None:
        spans = [(index[s], index[e]) for s, e in spans]
    ids, offsets = _encode(tokenizer, text, literals)
    labels = [IGNORE_INDEX] * len(ids)
    # A token counts when it overlaps a span: a BPE token may straddle the span start (" Hello" after "A:").
    k = 0
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and s < spans[k][1] and max(e, s + 1) > spans[k][0]:
            labels[t] = ids[t]
    if tokenizer.add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids, labels = [tokenizer.bos_id, *ids], [IGNORE_INDEX, *labels]
    return TokenizedChat(ids, labels)


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str | None = None) -> list[int]:
    """Token ids of a conversation rendered with the generation prompt (what a model continues)."""
    return encode_chat_prompt(tokenizer, messages, template)[1]


def encode_chat_prompt(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    template: str | None = None,
    add_generation_prompt: bool = True,
    add_bos: bool = True,
    where: str = "conversation",
) -> tuple[str, list[int]]:
    """The rendered prompt text and its token ids, message content encoded as plain text.

    ``add_bos`` prepends the tokenizer's bos when it asks for one (``tokenizer.add_bos``) and the template
    did not already render it.
    """
    shielded = _shield(messages, _special_strings(tokenizer), where)
    raw = render(
        shielded,
        template or template_for(tokenizer),
        add_generation_prompt,
        tokenizer.bos_token,
        tokenizer.eos_token,
    )
    text, literals, _ = _unmark(raw)
    ids, _ = _encode(tokenizer, text, literals)
    if (
        add_bos
        and tokenizer.add_bos
        and tokenizer.bos_id is not None
        and (not ids or ids[0] != tokenizer.bos_id)
    ):
        ids = [tokenizer.bos_id, *ids]
    return text, ids


# ------------------------------------------------------------------------- content as plain text
def _special_strings(tokenizer: Any) -> tuple[str, ...]:
    """The special tokens the backend would match in text (non-special added tokens match either way)."""
    added = tokenizer.backend.get_added_tokens_decoder().values()
    return tuple(sorted({t.content for t in added if t.special and t.content}))


@lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first: at one position the longer token wins, as in the backend's own matcher.
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def _shield(
    messages: Sequence[dict[str, Any]], specials: tuple[str, ...], where: str
) -> list[dict[str, Any]]:
    """The messages with every special-token string inside their content bracketed by the literal markers."""
    pattern = _special_pattern(specials) if specials else None
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            if _LIT_START in content or _LIT_END in content:
                # Unbracketed markers would let content turn the template's control tokens into text.
                raise TemplateError(
                    f"{where}: message {i} contains a reserved character (U+FDD0 or U+FDD1, Unicode noncharacters)"
                )
            if pattern is not None and pattern.search(content):
                m = {**m, "content": pattern.sub(lambda x: _LIT_START + x.group(0) + _LIT_END, content)}
        out.append(m)
    return out


def _unmark(raw: str) -> tuple[str, list[tuple[int, int]], list[int] | None]:
    """Remove the literal markers: the clean text, the bracketed regions in it, and the map from indices of
    ``raw`` to indices of the clean text (None when there was nothing to remove)."""
    if _LIT_START not in raw:
        return raw, [], None
    clean: list[str] = []
    regions: list[tuple[int, int]] = []
    index: list[int] = []
    start: int | None = None
    for ch in raw:
        index.append(len(clean))
        if ch == _LIT_START:
            start = len(clean)
        elif ch == _LIT_END:
            if start is not None:
                regions.append((start, len(clean)))
            start = None
        else:
            clean.append(ch)
    index.append(len(clean))
    return "".join(clean), regions, index


def _encode(
    tokenizer: Any, text: str, literals: Sequence[tuple[int, int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``text``; special-token strings inside ``literals`` encode as plain text.

    The backend's own encoding finds the control tokens (the special tokens outside every literal region);
    the text between two control tokens is encoded with special-token matching off. The backend itself
    encodes the pieces between special tokens independently, so this only changes the literal regions.
    """
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if not literals:
        return ids, offsets
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    controls = [
        (t, (s, e))
        for t, (s, e) in zip(ids, offsets)
        if t in special and not any(s < b and e > a for a, b in literals)
    ]
    plain = tokenizer.plain_backend()
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    cursor = 0
    for t, (s, e) in [*controls, (None, (len(text), len(text)))]:
        if s > cursor:
            piece = plain.encode(text[cursor:s], add_special_tokens=False)
            out_ids += piece.ids
            out_offsets += [(a + cursor, b + cursor) for a, b in piece.offsets]
        if t is not None:
            out_ids.append(t)
            out_offsets.append((s, e))
        cursor = max(cursor, e)
    return out_ids, out_offsets
