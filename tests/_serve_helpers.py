"""Shared by the server tests: an engine whose "model" answers a reply the test chooses."""

from __future__ import annotations

import dataclasses

from llmlab.infer import LLM


class Forced:
    """Makes an engine answer ``reply`` (token by token, through the normal sampler) to every request."""

    def __init__(self, llm: LLM):
        self.llm, self.reply = llm, "Hello!"
        self._add = llm.add_request
        llm.add_request = self.add_request

    def add_request(self, prompt, params=None, request_id=None):
        ids = self.llm.tokenizer.encode(self.reply)
        stop = self.llm.stop_ids[0]

        def force(generated, logits):
            k = len(generated)
            logits.fill_(float("-inf"))
            logits[ids[k] if k < len(ids) else stop] = 0.0
            return logits

        params = dataclasses.replace(params, logits_processors=[force], max_tokens=len(ids) + 1)
        return self._add(prompt, params, request_id)
