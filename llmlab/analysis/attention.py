"""How a stage changed attention and outputs, on fixed instruction prompts with a keyword.

Each probe is a chat prompt (the model's template) whose instruction holds a keyword ("Reverse", "Sort",
"Count", "Summarize", "Translate" ...) followed by a reference answer. Attention maps come from the model's
own forward with ``return_attention=True`` (the explicit path, checked equal to SDPA). Per layer and head:

- **entropy**: mean over answer-token queries of ``-sum_j p_j log p_j`` (nats);
- **keyword mass**: attention from answer tokens onto the keyword's tokens; **rest mass**: onto the other prompt
  tokens (answer tokens and the query's own past answer excluded from both);
- **JS divergence**: Jensen-Shannon divergence between the before and after attention rows of every query,
  averaged (same token ids through both models).

Output distributions: ``KL(p_after || p_before)`` of next-token distributions at every position of the probes,
and each model's entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Probe:
    instruction: str
    keyword: str
    answer: str


PROBES = (
    Probe("Reverse the letters: k d a. Answer with the reversed letters, separated by spaces.", "Reverse", "a d k"),
    Probe("Sort from smallest to largest: 9, 4, 7. Answer with the sorted numbers, separated by commas.", "Sort",
          "4, 7, 9"),
    Probe("How many words are in this text: sun moon star? Answer with the number only.", "words", "3"),
    Probe("Convert 3 km to m. Answer with the number only.", "Convert", "3000"),
    Probe("Count the letters in: b o a t. Answer with the number only.", "Count", "4"),
    Probe("Summarize in one sentence: The cat sat on the mat all day and slept.", "Summarize", "A cat slept."),
    Probe("Translate to French: good morning.", "Translate", "bonjour"),
    Probe("What is 12 + 7? Answer with the number only.", "+", "19"),
)  # fmt: skip


def encode_probe(tokenizer: Any, probe: Probe) -> tuple[list[int], list[int], range]:
    """``(ids, keyword positions, answer positions)`` of a probe rendered with the chat template."""
    from llmlab.sft.chat import prompt_ids

    prompt = prompt_ids(tokenizer, [{"role": "user", "content": probe.instruction}])
    answer = tokenizer.encode(probe.answer)
    text = tokenizer.decode(prompt, skip_special_tokens=False)
    start = text.rfind(probe.keyword)
    end = start + len(probe.keyword)
    keyword, prev = [], 0
    for i in range(len(prompt)):  # each token's character span in the decoded prompt
        cur = len(tokenizer.decode(prompt[: i + 1], skip_special_tokens=False))
        if start >= 0 and prev < end and cur > start:
            keyword.append(i)
        prev = cur
    return prompt + answer, keyword, range(len(prompt), len(prompt) + len(answer))


@torch.no_grad()
def attention_maps(model: nn.Module, ids: list[int]) -> tuple[Tensor, list[Tensor]]:
    """Logits ``[T, V]`` and per-layer attention ``[H, T, T]`` of one sequence (fp32, eval mode)."""
    logits, attn = model(torch.tensor([ids]), return_attention=True)
    return logits[0].float(), [a[0].float() for a in attn]


def js_divergence(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions along the last dim."""
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return (a * ((a + eps).log() - (b + eps).log())).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def head_stats(attn: list[Tensor], keyword: list[int], answer: range) -> dict[str, Tensor]:
    """Per layer x head: entropy, keyword mass and rest-of-prompt mass of the answer-token queries."""
    rows = list(answer)
    prompt_len = answer.start
    rest = [j for j in range(prompt_len) if j not in set(keyword)]
    ent, kw, other = [], [], []
    for a in attn:
        r = a[:, rows, :]  # [H, A, T]
        ent.append(-(r * (r + 1e-12).log()).sum(-1).mean(-1))
        kw.append(r[:, :, keyword].sum(-1).mean(-1) if keyword else torch.zeros(a.shape[0]))
        other.append(r[:, :, rest].sum(-1).mean(-1))
    return {"entropy": torch.stack(ent), "keyword_mass": torch.stack(kw), "rest_mass": torch.stack(other)}


def compare_attention(before: nn.Module, after: nn.Module, tokenizer: Any, probes=PROBES) -> dict[str, Any]:
    """Attention and output-distribution statistics of two models on the probes (see the module docstring)."""
    acc: dict[str, list[Tensor]] = {}
    kls, ent_b, ent_a, used = [], [], [], []
    for probe in probes:
        ids, keyword, answer = encode_probe(tokenizer, probe)
        if not keyword or len(ids) > before.cfg.max_seq_len:
            continue
        used.append(
            {"instruction": probe.instruction, "keyword": probe.keyword, "keyword_tokens": len(keyword)}
        )
        logits_b, attn_b = attention_maps(before, ids)
        logits_a, attn_a = attention_maps(after, ids)
        for tag, attn in (("before", attn_b), ("after", attn_a)):
            for k, v in head_stats(attn, keyword, answer).items():
                acc.setdefault(f"{k}_{tag}", []).append(v)
        js = torch.stack([js_divergence(b, a).mean(-1) for b, a in zip(attn_b, attn_a)])  # [L, H]
        acc.setdefault("js", []).append(js)
        lp_b, lp_a = logits_b.log_softmax(-1), logits_a.log_softmax(-1)
        kls.append((lp_a.exp() * (lp_a - lp_b)).sum(-1).mean())
        ent_b.append(-(lp_b.exp() * lp_b).sum(-1).mean())
        ent_a.append(-(lp_a.exp() * lp_a).sum(-1).mean())
    if not used:
        return {}

    def mean(key: str) -> list[list[float]]:
        return torch.stack(acc[key]).mean(0).tolist()

    out: dict[str, Any] = {"prompts": used, "js_divergence": mean("js")}
    for k in ("entropy", "keyword_mass", "rest_mass"):
        out[k] = {"before": mean(f"{k}_before"), "after": mean(f"{k}_after")}
    out["outputs"] = {
        "kl_after_before": float(torch.stack(kls).mean()),
        "entropy_before": float(torch.stack(ent_b).mean()),
        "entropy_after": float(torch.stack(ent_a).mean()),
    }
    return out


def attention_sentence(att: dict[str, Any]) -> str:
    """What the attention numbers say, stated plainly, whichever way they go."""
    if not att:
        return "no probe fitted the model's context: no attention analysis"

    def avg(grid: list[list[float]]) -> float:
        flat = [x for row in grid for x in row]
        return sum(flat) / len(flat)

    kb, ka = avg(att["keyword_mass"]["before"]), avg(att["keyword_mass"]["after"])
    eb, ea = avg(att["entropy"]["before"]), avg(att["entropy"]["after"])
    js = att["js_divergence"]
    layer, head = max(
        ((i, j) for i in range(len(js)) for j in range(len(js[0]))), key=lambda ij: js[ij[0]][ij[1]]
    )
    direction = "about the same" if abs(ka - kb) < 0.001 else "more" if ka > kb else "less"
    return (
        f"Answer tokens put {100 * kb:.1f}% -> {100 * ka:.1f}% of their attention on the instruction keyword "
        f"({direction} after the stage than before); mean head entropy {eb:.2f} -> {ea:.2f} nats; the head that changed most "
        f"is layer {layer} head {head} (JS {js[layer][head]:.3f}, mean {avg(js):.3f}); next-token KL(after||before) "
        f"{att['outputs']['kl_after_before']:.3f} nats, output entropy {att['outputs']['entropy_before']:.2f} -> "
        f"{att['outputs']['entropy_after']:.2f}."
    )
