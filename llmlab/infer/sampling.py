"""Sampling parameters and the logits pipeline: penalties, temperature, top-k, top-p, min-p, sampling.

Every filter is a pure function over ``logits [B, V]`` (float32) that returns new logits with removed tokens
set to ``-inf``. Their semantics follow transformers' logits processors (which the tests compare against):

- repetition penalty (CTRL / HF): a token already in the prompt or output has its logit divided by the
  penalty when positive and multiplied by it when negative;
- presence / frequency penalties (OpenAI): ``logit -= presence * [count > 0] + frequency * count`` over the
  *generated* tokens only;
- temperature, then top-k (ties with the k-th logit survive), top-p (smallest set whose mass reaches p, at
  least one token), min-p (tokens whose probability is below ``min_p * max_prob`` are dropped).

The order is penalties -> temperature -> top-k -> top-p -> min-p, as in transformers' ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.errors import LLMLabError

NEG_INF = float("-inf")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for ``top_logprobs``

# ``(generated token ids so far, 1-D float32 logits over the vocabulary) -> logits`` (may modify in place).
LogitsProcessor = Callable[[list[int], Tensor], Tensor]


@dataclass
class SamplingParams:
    """How to sample one request (vLLM-style names).

    ``temperature=0`` is greedy decoding. ``seed`` makes one request reproducible on its own, whatever else is
    in the batch. ``stop`` strings end generation and are cut from the text (the tokens stay in
    ``token_ids``); ``stop_token_ids`` add to the tokenizer's own stop ids unless ``ignore_eos``.
    ``logprobs=True`` returns the log-probability of each chosen token: under the raw model distribution
    (``logprobs_mode="raw"``, what RL needs for the policy) or under the processed sampling distribution
    (``"processed"``: after penalties, temperature and filters). ``top_logprobs=k`` (0..20) also returns, per
    generated token, the ``k`` most likely tokens and their log-probabilities (same ``logprobs_mode``).
    ``logits_processors`` are called as ``proc(generated_ids, logits_row)`` before penalties, temperature and
    filters, greedy included (constrained decoding uses them); they are not compared, hashed or serialized.

    Every field is checked on construction: a bad value raises one :class:`LLMLabError` naming it.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 32
    seed: int | None = None
    stop: list[str] | None = None  # a single string is accepted too
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    logprobs_mode: str = "raw"
    skip_special_tokens: bool = True
    top_logprobs: int = 0
    logits_processors: list[LogitsProcessor] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        """The parameters as plain data (``logits_processors`` are code, not data: left out)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "logits_processors"}

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise :class:`LLMLabError` naming the first bad parameter."""

        def bad(msg: str) -> LLMLabError:
            return LLMLabError(f"sampling parameter {msg}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"'{name}' must be a finite number, got {value!r}")
        for name in ("max_tokens", "top_k", "top_logprobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(f"'{name}' must be an integer, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"'seed' must be an integer or None, got {self.seed!r}")
        for name in ("ignore_eos", "logprobs", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"'{name}' must be true or false, got {getattr(self, name)!r}")
        if self.max_tokens <= 0:
            raise bad(f"'max_tokens' must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise bad(f"'temperature' must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"'top_p' must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad(f"'top_k' must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"'min_p' must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise bad(f"'repetition_penalty' must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(f"'{name}' must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs_mode not in ("raw", "processed"):
            raise bad(f"'logprobs_mode' must be 'raw' or 'processed', got {self.logprobs_mode!r}")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise bad(f"'stop' must be a string or a list of strings, got {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise bad("'stop' must be non-empty strings")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise bad(f"'stop_token_ids' must be a list of token ids, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids or []:
            if (
                isinstance(t, bool)
                or not isinstance(t, int)
                or t < 0
                or (vocab_size is not None and t >= vocab_size)
            ):
                raise bad(f"'stop_token_ids' has unknown token id {t!r} (vocabulary size {vocab_size})")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        procs = self.logits_processors
        if procs is not None and (
            not isinstance(procs, (list, tuple)) or not all(callable(p) for p in procs)
        ):
            raise bad(f"'logits_processors' must be a list of callables, got {procs!r}")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


# Named sampling settings for the CLI (``--preset``); flags and key=value overrides apply on top.
SAMPLING_PRESETS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(),
    "sample": SamplingParams(temperature=0.7, top_p=0.9, max_tokens=256),
    "creative": SamplingParams(temperature=1.0, top_p=0.95, min_p=0.05, max_tokens=512),
}


# ----------------------------------------------------------------------------------------- filters
def _col(value: float | Tensor, logits: Tensor) -> Tensor | float:
    """A per-row parameter as a ``[B, 1]`` column (scalars pass through)."""
    if isinstance(value, Tensor):
        return value.to(logits.device, logits.dtype).view(-1, 1)
    return value


def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    return logits / _col(temperature, logits)


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep tokens whose logit is >= the k-th largest (``top_k <= 0`` keeps all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: drop the low tail whose cumulative probability is <= ``1 - top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL penalty on tokens in ``seen [B, N]`` (ids, any repeats; prompt and output)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI penalties from ``counts [B, V]``: how often each token was *generated* so far."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def process_logits(
    logits: Tensor, params: SamplingParams, prompt_ids: Sequence[int] = (), output_ids: Sequence[int] = ()
) -> Tensor:
    """The whole pipeline for one request's logits ``[V]`` or ``[1, V]`` given its token history: the
    request's logits processors, then penalties -> temperature -> top-k -> top-p -> min-p.

    Greedy requests only get the penalties (temperature and filters cannot change the argmax).
    A temperature or repetition penalty so close to 0 that the division overflows float32 is redone in
    float64, where the ratios stay finite and the distribution keeps its (then one-hot) shape.
    """
    x = _process(logits.float(), params, prompt_ids, output_ids)
    tiny_divisor = (not params.greedy and params.temperature < 1e-6) or params.repetition_penalty < 1e-6
    if tiny_divisor and bool((torch.isnan(x) | torch.isposinf(x)).any()):
        x = _process(logits.double(), params, prompt_ids, output_ids)
    return x


def _process(
    logits: Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> Tensor:
    x = logits.reshape(1, -1)
    if params.logits_processors:
        row = x[0].clone()  # a copy: the raw logits must survive in-place edits (raw logprobs read them)
        for proc in params.logits_processors:
            row = proc(list(output_ids), row)
        x = row.to(logits.dtype).reshape(1, -1)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([list(prompt_ids) + list(output_ids)], dtype=torch.long, device=x.device)
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(output_ids):
        out = torch.tensor(list(output_ids), dtype=torch.long, device=x.device)
        counts = torch.bincount(out, minlength=x.shape[-1])[None, : x.shape[-1]]
        x = apply_presence_frequency(x, counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return x
    x = apply_temperature(x, params.temperature)
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


def sample_from(processed: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Draw one token id from processed logits ``[1, V]`` (argmax when greedy)."""
    if params.greedy:
        return int(processed.argmax(dim=-1))
    probs = F.softmax(processed, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        # The logits overflowed (a temperature near 0, a penalty near 0 dividing them): the distribution's
        # limit puts all its mass on the largest logits, so take the argmax instead of failing.
        return int(torch.nan_to_num(processed.float(), nan=float("-inf")).argmax(dim=-1))
    if generator is not None:  # seeded generators live on the CPU, so a seed draws alike on every device
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def chosen_logprob(raw: Tensor, processed: Tensor, token: int, params: SamplingParams) -> float:
    """Log-probability of ``token`` under the raw model or the processed sampling distribution."""
    src = raw if params.logprobs_mode == "raw" else processed
    src = src.float().reshape(-1)
    return float(src[token] - torch.logsumexp(src, dim=-1))


def top_logprobs(raw: Tensor, processed: Tensor, k: int, params: SamplingParams) -> dict[int, float]:
    """The ``k`` most likely tokens and their log-probabilities (raw or processed, as ``chosen_logprob``);
    tokens a filter removed (``-inf``) are left out."""
    src = raw if params.logprobs_mode == "raw" else processed
    logp = torch.log_softmax(src.float().reshape(-1), dim=-1)
    values, ids = torch.topk(logp, min(k, logp.numel()))
    return {i: v for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v != NEG_INF}


def find_stop(text: str, stops: Sequence[str], search_from: int) -> int:
    """Index where the first stop string in ``text`` starts (searching from ``search_from``), else -1.

    ``search_from`` lets callers look only at the tail that new tokens could have completed; a stop string
    that spans several tokens is still found because the search window reaches back ``len(stop) - 1``
    characters before the new text.
    """
    best = -1
    for s in stops:
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string (held back when
    streaming, so a stop string is never emitted in part)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
