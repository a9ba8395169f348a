"""What a request returns: detokenizing, stop strings, streaming deltas and :class:`RequestOutput`.

The scheduler records tokens; this module turns them into text. A stop *token* is a token id (the
scheduler checks it); a stop *string* is text, so it is found here, after decoding, and may span several
tokens. While a request runs, text that may still become part of a stop string, or an incomplete UTF-8
character, is held back, so a stream never shows something the final text will not contain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmlab.infer.sampling import find_stop, stop_prefix_len
from llmlab.infer.scheduler import Request


@dataclass
class RequestOutput:
    """One request's result (or, while streaming, its state so far plus the newest ``delta_*``).

    ``token_ids`` holds every generated token, a final stop token included; ``text`` is their decoded text
    without the stop token or stop string. ``finish_reason`` is ``"stop"``, ``"length"``, ``"abort"`` or
    ``None`` while still running; ``stop_reason`` is the stop token id or stop string that ended it.
    ``logprobs`` (with ``SamplingParams.logprobs`` or ``top_logprobs``) has one log-probability per
    generated token; ``top_logprobs`` (with ``SamplingParams.top_logprobs=k``) one ``{token id: logprob}``
    dict of the ``k`` most likely tokens per generated token.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (at the last admission)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputProcessor:
    """Detokenizes requests, finds stop strings and builds :class:`RequestOutput` snapshots."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def decode(self, req: Request, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)

    def find_stop_string(self, req: Request) -> str | None:
        """After a new token: the stop string its text now contains (the text is cut before it), else None.

        Called by the scheduler for requests with stop strings (it then finishes them).
        """
        stops = req.params.stop_strings
        before = len(req.text)
        req.text = self.decode(req, req.output_ids)
        i = find_stop(req.text, stops, before)
        if i == -1:
            return None
        stop = next(s for s in stops if req.text.startswith(s, i))
        req.text = req.text[:i]
        req.text_final = True
        return stop

    def _final_text(self, req: Request) -> str:
        if not req.text_final:
            ids = req.output_ids
            if req.finish_reason == "stop" and isinstance(req.stop_reason, int):
                ids = ids[:-1]
            req.text = self.decode(req, ids)
            req.text_final = True
        return req.text

    def snapshot(self, req: Request) -> RequestOutput:
        """Current output of ``req`` with the text/tokens that are new since the last snapshot."""
        if req.finish_reason is None and not req.stream:
            text, visible = "", 0  # generate(): no text is decoded until the request finishes
        elif req.finish_reason is None:
            text = req.text if req.params.stop_strings else self.decode(req, req.output_ids)
            visible = len(text) - stop_prefix_len(text, req.params.stop_strings)
            while visible > 0 and text[visible - 1] == "\ufffd":
                visible -= 1
        else:
            text = self._final_text(req)
            visible = len(text)
        delta_text = text[req.emitted_text : visible] if visible > req.emitted_text else ""
        req.emitted_text = max(req.emitted_text, visible)
        delta_ids = req.output_ids[req.emitted_tokens :]
        req.emitted_tokens = len(req.output_ids)
        p = req.params
        return RequestOutput(
            request_id=req.id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_ids),
            text=text[:visible] if req.finish_reason is None else text,
            token_ids=list(req.output_ids),
            finish_reason=req.finish_reason,
            logprobs=list(req.logprobs) if p.wants_logprobs else None,
            stop_reason=req.stop_reason,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            top_logprobs=[dict(d) for d in req.top_logprobs] if p.top_logprobs > 0 else None,
            num_cached_tokens=req.num_cached_tokens,
        )
