"""Knowledge distillation of a small student from a teacher's logits, through the shared Trainer.

The main use is a **draft model for speculative decoding** (:mod:`llmlab.infer.speculative`): the draft must
share the target's tokenizer, be much cheaper per token, and propose what the target would emit. So:

- **The student is a shallow copy of the teacher.** Same width, heads and vocabulary; its embedding (tied
  output head) and final norm are copied from the teacher and, by default, frozen, and its blocks are copies
  of the teacher blocks listed in ``student_layers`` (layer dropping, as DistilBERT initialises from every
  other BERT layer). Sharing the teacher's head means the student only has to learn to put its last hidden
  state where the teacher's would be, which a short CPU run can do; training from random weights could not.
- **The loss is the teacher's whole next-token distribution,** not only the sampled token (:func:`kd_loss`,
  Hinton et al. 2015): forward KL from the teacher's softened distribution to the student's, times T²,
  optionally mixed with the usual cross-entropy on the data's tokens. Teacher logits are computed on the
  fly, under ``no_grad`` and the trainer's bf16 autocast; nothing is stored.
- **The data is what the target will be asked to continue:** chat-rendered Alpaca conversations (the shipped
  SFT set) and, with ``teacher_responses=N``, the teacher's own answers to N Alpaca prompts -- its output
  distribution, which is exactly what a draft has to predict. A bundled pretraining corpus works too.
  The last ``heldout`` Alpaca records are never trained on: evaluation and ``bench/speculative.py`` use them.

``run_distill(cfg, out)`` measures the student before and after (KL to the teacher and top-1 agreement on
the teacher's own greedy answers to held-out prompts, answer tokens only: the rate at which greedy
speculative decoding accepts a first draft token), trains, checks greedy speculative decoding with the
student as draft on held-out prompts (acceptance rate, output identical to the teacher alone), and writes
``out/final`` (an llmlab checkpoint with the teacher's tokenizer) and ``out/distill_report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab.errors import ConfigError
from llmlab.train.config import TrainConfig
from llmlab.train.logging import jsonable, write_report

if TYPE_CHECKING:  # torch stays out of the CLI's import path
    from torch import Tensor, nn

    from llmlab.model.transformer import Transformer
    from llmlab.sft.chat import TokenizedChat
    from llmlab.sft.datasets import Conversation
    from llmlab.train.trainer import EvalFn, LossFn, LossOutput

KD_ON = ("all", "assistant")


# ------------------------------------------------------------------------------------------- the loss
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Per-position distillation loss ``[...]`` (logits ``[..., V]``; 0 where ``mask`` is False).

    With ``p = softmax(z_teacher / T)`` and ``q = softmax(z_student / T)``::

        loss = (1 - alpha) * T² * KL(p ‖ q)  +  alpha * CE(softmax(z_student), labels)
        KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)

    Forward KL (teacher first) is the classic KD objective: it is the cross-entropy to the teacher's soft
    targets minus the teacher's entropy, so it is 0 exactly when the student matches the teacher. Its
    gradient in the student's logits is ``T (q - p)``; the ``T²`` factor keeps that gradient's scale
    independent of ``T`` (Hinton et al. 2015). The hard-label term is at ``T = 1`` and needs ``labels``
    (``-100`` = no label, contributes 0). All of it is computed in fp32.
    """
    import torch
    import torch.nn.functional as F

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    s = student_logits.float() / temperature
    p = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    # KL = H(p, q) - H(p). entr(p) = -p log p is 0 at p = 0, so a teacher that rules tokens out (-inf logits,
    # e.g. top-k sparse targets) gives no NaN.
    cross = -(p * torch.log_softmax(s, dim=-1)).sum(-1)
    entropy = torch.special.entr(p).sum(-1)
    loss = (1.0 - alpha) * temperature**2 * (cross - entropy)
    if alpha > 0:
        if labels is None:
            raise ValueError("alpha > 0 mixes in the hard-label cross-entropy, which needs labels")
        ce = F.cross_entropy(
            student_logits.float().reshape(-1, student_logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).reshape(labels.shape)
        loss = loss + alpha * ce
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    return loss


# ------------------------------------------------------------------------------------------ the config
@dataclass
class DistillConfig:
    teacher: str = "smollm2"  # llmlab checkpoint dir, HF dir, .gguf file, or "smollm2"
    # Teacher blocks copied into the student, in order; empty: ``student_depth`` evenly spaced blocks, the
    # first and the last included.
    student_layers: list[int] = field(default_factory=list)
    student_depth: int = 4
    freeze_embeddings: bool = True  # keep the copied (tied) embedding/head: the student shares its space
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the hard-label cross-entropy mixed into the KD loss
    kd_on: str = "all"  # which positions count: "all" tokens or "assistant" tokens only
    # data
    data: str = "alpaca"  # "alpaca" (shipped SFT set, chat-rendered) or a corpus name/path (data/corpora.py)
    max_examples: int | None = None  # cap on Alpaca references / corpus documents (0: teacher answers only)
    max_len: int = 256  # tokens per example (longer ones are cut on the right)
    heldout: int = 100  # the last N Alpaca records: never trained on; evaluation and bench prompts
    eval_examples: int = 32  # held-out prompts whose teacher answers measure KL / top-1 agreement
    teacher_responses: int = 0  # Alpaca training prompts answered by the teacher and added to the data
    response_tokens: int = 128  # max new tokens per teacher answer
    response_temperature: float = 0.0  # 0: the teacher's greedy answers (what greedy decoding will see)
    response_dtype: str = "bf16"  # the teacher copy that answers: bf16 (~2x faster on CPU) or fp32
    response_batch: int = 32  # requests the teacher decodes at once (continuous batching)
    # after training: greedy speculative decoding with the student as draft, on held-out prompts
    accept_prompts: int = 4  # 0: skip
    accept_tokens: int = 64
    accept_k: int = 4
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if not self.student_layers and self.student_depth < 1:
            raise ConfigError("config key 'student_depth' must be positive")
        if any(i < 0 for i in self.student_layers):
            raise ConfigError(f"config key 'student_layers' has a negative index: {self.student_layers}")
        if self.temperature <= 0:
            raise ConfigError(f"config key 'temperature' must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"config key 'alpha' must be in [0, 1], got {self.alpha}")
        if self.response_dtype not in ("bf16", "fp32"):
            raise ConfigError(
                f"config key 'response_dtype' must be bf16 or fp32, got {self.response_dtype!r}"
            )
        if self.kd_on not in KD_ON:
            raise ConfigError(f"config key 'kd_on' must be one of {list(KD_ON)}, got {self.kd_on!r}")
        if self.max_len < 2 or self.max_len - 1 > self.train.seq_len:
            raise ConfigError(
                f"config key 'max_len' ({self.max_len}) must be >= 2 and at most train.seq_len + 1 "
                f"({self.train.seq_len + 1})"
            )
        if self.heldout < 1 or self.eval_examples < 1 or self.eval_examples > self.heldout:
            raise ConfigError("need 1 <= eval_examples <= heldout")
        if self.accept_prompts > self.heldout:
            raise ConfigError("config key 'accept_prompts' must be at most 'heldout'")
        for name in ("teacher_responses", "accept_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name}' must be >= 0")
        for name in ("response_tokens", "response_batch", "accept_tokens", "accept_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name}' must be positive")


def _train(**kw: Any) -> TrainConfig:
    base = dict(
        weight_decay=0.0,  # the student starts from the teacher's weights: nothing to pull toward zero
        min_lr=0.0,
        warmup_steps=10,
        eval_every=50,
        save_every=50,
        keep_last=1,
        log_every=5,
        tensorboard=False,
    )
    return TrainConfig(**{**base, **kw})


DISTILL_PRESETS: dict[str, DistillConfig] = {
    # A 4-block draft for SmolLM2-135M-Instruct in about 14 minutes on one CPU core: ~4 to have the teacher
    # answer 640 Alpaca prompts (bf16), ~9 to train 210 x 1024 tokens on those answers and 640 Alpaca
    # references, KD on answer tokens only. Measured on a loaded 2-core machine: top-1 agreement with the
    # teacher's greedy answers to 32 held-out prompts 0.0004 -> 0.276 (384 answers + 384 references, lr 1e-3,
    # 200 steps: 0.259). Which blocks matters little: after 40 KD steps on Alpaca text, blocks 0,10,20,29 /
    # 0-3 / 0,1,28,29 / six spaced blocks agreed on 13.9 / 14.0 / 12.8 / 13.1% of answer tokens.
    "smollm2-draft": DistillConfig(
        teacher="smollm2",
        student_layers=[0, 10, 20, 29],
        kd_on="assistant",
        max_examples=640,
        teacher_responses=640,
        train=_train(lr=2e-3, max_steps=210, batch_size=4, seq_len=256, eval_every=50, save_every=50),
    ),
}


def qualify_key(key: str) -> str:
    """``max_steps`` -> ``train.max_steps``; dotted and top-level keys pass through."""
    from llmlab.config import qualify_key as qualify

    return qualify(DistillConfig, key, {"train": TrainConfig})


def load_distill_config(
    preset: str | None = None, yaml_path: str | None = None, overrides: list[str] | None = None
) -> DistillConfig:
    from llmlab.config import build_config, parse_overrides

    pairs = [f"{qualify_key(k)}={v}" for k, v in parse_overrides(overrides or [])]
    return build_config(DistillConfig, DISTILL_PRESETS, preset, yaml_path, pairs)


# ----------------------------------------------------------------------------------------- the student
def spaced_layers(n_teacher: int, depth: int) -> list[int]:
    """``depth`` evenly spaced block indices of an ``n_teacher``-block model, first and last included."""
    if depth >= n_teacher:
        return list(range(n_teacher))
    if depth == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (depth - 1)) for i in range(depth)]


def student_from_teacher(teacher: Transformer, layers: Sequence[int]) -> Transformer:
    """A teacher-shaped Transformer with ``len(layers)`` blocks, copied from the teacher's ``layers``.

    Embedding, tied/untied head and final norm are copied too, so student and teacher share a vocabulary and
    an output space (what speculative decoding and the KD loss both need).
    """
    from llmlab.model.transformer import Transformer

    n = teacher.cfg.n_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"student_layers: teacher layer {bad[0]} does not exist (the teacher has {n})")
    student = Transformer(dataclasses.replace(teacher.cfg, n_layers=len(layers)))
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        src = name
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            src = f"layers.{layers[int(i)]}.{rest}"
        state[name] = source[src].detach().float().clone()
    student.load_state_dict(state, strict=True)
    return student


# -------------------------------------------------------------------------------------------- the data
def alpaca_split(heldout: int) -> tuple[list[Conversation], list[Conversation]]:
    """Shipped Alpaca conversations: (training records, the last ``heldout`` records)."""
    from llmlab.sft.datasets import load_conversations

    convs = load_conversations("alpaca")
    if heldout >= len(convs):
        raise ConfigError(f"'heldout' ({heldout}) must be smaller than the {len(convs)} Alpaca records")
    return convs[:-heldout], convs[-heldout:]


def heldout_prompts(n: int, heldout: int = 100) -> list[list[dict[str, str]]]:
    """The first ``n`` held-out Alpaca prompts as chat messages (the user turn, without the answer)."""
    _, held = alpaca_split(heldout)
    return [c.messages[:-1] for c in held[:n]]


def _all_tokens(ex: TokenizedChat) -> TokenizedChat:
    from llmlab.sft.chat import TokenizedChat

    return TokenizedChat(list(ex.input_ids), list(ex.input_ids))


def chat_examples(
    tokenizer: Any, convs: Sequence[Conversation], max_len: int, kd_on: str
) -> list[TokenizedChat]:
    """Conversations in the teacher's chat template; labels mark the positions the KD loss counts."""
    from llmlab.sft.datasets import encode_conversations

    examples = encode_conversations(tokenizer, convs, max_len, "right")
    return [_all_tokens(e) for e in examples] if kd_on == "all" else examples


def corpus_examples(tokenizer: Any, corpus: str, max_len: int, max_docs: int | None) -> list[TokenizedChat]:
    """A pretraining corpus cut into windows of ``max_len`` tokens (every token counts)."""
    from llmlab.data.corpora import load_corpus
    from llmlab.sft.chat import TokenizedChat

    docs = load_corpus(corpus)[:max_docs]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out = []
    for doc in docs:
        ids = tokenizer.encode(doc) + eos
        for s in range(0, len(ids) - 1, max_len):
            window = ids[s : s + max_len]
            if len(window) >= 2:
                out.append(TokenizedChat(window, list(window)))
    if not out:
        raise ConfigError(f"corpus {corpus!r}: no training windows")
    return out


def teacher_answers(
    teacher: Transformer,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    max_tokens: int,
    temperature: float = 0.0,
    dtype: str = "fp32",
    batch: int = 32,
    seed: int = 0,
    cache: Path | None = None,
) -> tuple[list[dict[str, list[int]]], float]:
    """The teacher's answers to chat ``prompts``: ``[{"prompt": ids, "answer": ids}]`` and the seconds spent.

    Prompt and answer are the exact token ids the engine used (no re-tokenization), so the student sees the
    sequences the target produces. ``dtype="bf16"`` generates with a bf16 copy of the teacher: about twice
    as fast on a CPU with bf16 matmuls, and the answers are still the teacher's (most are token-identical to
    fp32 greedy ones; the rest part ways somewhere in the answer). Cached in ``cache`` (JSONL, first line the
    settings) so reruns and resumes do not generate again.
    """
    import copy

    import torch

    from llmlab.infer import LLM, SamplingParams
    from llmlab.sft.chat import prompt_ids

    key = {"n": len(prompts), "tokens": max_tokens, "temperature": temperature, "dtype": dtype, "seed": seed}
    if cache is not None and cache.is_file():
        lines = cache.read_text(encoding="utf-8").splitlines()
        if lines and json.loads(lines[0]) == key:
            return [json.loads(line) for line in lines[1:]], 0.0
    ids = [prompt_ids(tokenizer, m) for m in prompts]
    params = [
        SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i) for i in range(len(ids))
    ]
    model = copy.deepcopy(teacher).to(torch.bfloat16) if dtype == "bf16" else teacher
    llm = LLM.from_model(model, tokenizer, max_batch_size=batch)
    t0 = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=True)
    seconds = time.perf_counter() - t0
    records = [{"prompt": p, "answer": list(o.token_ids)} for p, o in zip(ids, outs)]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(key)] + [json.dumps(r) for r in records]
        cache.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return records, seconds


def answer_examples(records: Sequence[dict[str, list[int]]], max_len: int, kd_on: str) -> list[TokenizedChat]:
    """Prompt + answer token ids as examples; with ``kd_on="assistant"`` only answer positions count."""
    from llmlab.sft.chat import IGNORE_INDEX, TokenizedChat

    out = []
    for r in records:
        ids = (r["prompt"] + r["answer"])[:max_len]
        labels = list(ids) if kd_on == "all" else [IGNORE_INDEX] * len(r["prompt"]) + r["answer"]
        if len(ids) >= 2 and any(x != IGNORE_INDEX for x in labels[1 : len(ids)]):
            out.append(TokenizedChat(ids, labels[: len(ids)]))
    return out


# --------------------------------------------------------------------------------- loss for the Trainer
def make_kd_loss_fn(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """``loss_fn(student, batch)`` for the Trainer: the summed :func:`kd_loss` over positions with a label.

    The teacher runs under ``no_grad`` inside the trainer's autocast (bf16 on CPU and GPU). Metrics: ``kl``
    (at the training temperature) and ``top1`` (student argmax == teacher argmax, what greedy speculative
    decoding accepts), both per counted position.
    """
    import torch

    from llmlab.train.trainer import MODEL_KWARGS, LossOutput

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
        mask = batch["labels"] != -100
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"], **kwargs)
        s_logits = model(batch["input_ids"], **kwargs)
        per_pos = kd_loss(s_logits, t_logits, temperature, mask, batch["labels"], alpha)
        with torch.no_grad():
            weight = float(mask.sum())
            top1 = float(((s_logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum()) / max(weight, 1.0)
            kl = per_pos if alpha == 0 else kd_loss(s_logits, t_logits, temperature, mask)
            metrics = {"kl": float(kl.sum()) / max(weight, 1.0), "top1": top1}
        return LossOutput(per_pos.sum(), weight, metrics)

    return loss_fn


def make_eval_fn(teacher: nn.Module, batches: list[dict[str, Tensor]]) -> EvalFn:
    """Mean KL(teacher ‖ student) at T = 1 and top-1 agreement over fixed held-out batches."""
    import torch

    from llmlab.train.trainer import MODEL_KWARGS

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        kl_sum = agree = weight = 0.0
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
                mask = batch["labels"] != -100
                t_logits = teacher(batch["input_ids"], **kwargs)
                s_logits = model(batch["input_ids"], **kwargs)
                kl_sum += float(kd_loss(s_logits, t_logits, 1.0, mask).sum())
                agree += float(((s_logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum())
                weight += float(mask.sum())
        return {"kl": kl_sum / max(weight, 1.0), "top1": agree / max(weight, 1.0)}

    return evaluate


# ----------------------------------------------------------------------------- speculative decoding
def speculative_check(
    teacher: nn.Module,
    draft: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    k: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Greedy decoding of ``prompts`` by the teacher alone and with ``draft`` proposing ``k`` tokens a step.

    Returns the acceptance rate (accepted / proposed drafts), mean tokens per target forward, wall times
    (one request at a time) and whether the outputs are identical (they must be: greedy verification keeps
    exactly the target's argmax).
    """
    from llmlab.infer import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens)
    plain = LLM.from_model(teacher, tokenizer, max_batch_size=1, kv_cache_mb=64)
    spec = LLM.from_model(
        teacher,
        tokenizer,
        max_batch_size=1,
        kv_cache_mb=64,
        speculative={"method": "draft", "draft_model": draft, "num_tokens": k},
    )
    t0 = time.perf_counter()
    want = [plain.generate([p], params)[0].token_ids for p in prompts]
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = [spec.generate([p], params)[0].token_ids for p in prompts]
    t_spec = time.perf_counter() - t0
    st = spec.speculative.stats
    return {
        "k": k,
        "prompts": len(prompts),
        "acceptance": st["accepted"] / max(1, st["proposed"]),
        "tokens_per_step": st["emitted"] / max(1, st["steps"]),
        "identical": got == want,
        "tokens": sum(len(t) for t in want),
        "seconds_target_alone": t_plain,
        "seconds_speculative": t_spec,
    }


# --------------------------------------------------------------------------------------------- the run
def run_distill(cfg: DistillConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """The whole distillation run (see the module docstring); returns and writes the report."""
    import torch

    from llmlab.sft.datasets import SFTBatchSource, iterate_examples
    from llmlab.sft.recipe import load_base
    from llmlab.train import Trainer

    cfg.validate()
    out_dir = Path(out_dir)
    t_start = time.time()
    torch.manual_seed(cfg.train.seed)
    teacher, tokenizer = load_base(cfg.teacher)
    if tokenizer is None:
        raise ConfigError(f"{cfg.teacher}: the teacher has no tokenizer; the student must share it")
    teacher = teacher.float().eval().requires_grad_(False)
    if cfg.train.seq_len > teacher.cfg.max_seq_len:
        raise ConfigError(
            f"'train.seq_len' ({cfg.train.seq_len}) exceeds the teacher's max_seq_len ({teacher.cfg.max_seq_len})"
        )
    layers = list(cfg.student_layers) or spaced_layers(teacher.cfg.n_layers, cfg.student_depth)
    student = student_from_teacher(teacher, layers)
    if cfg.freeze_embeddings:
        student.embed_tokens.weight.requires_grad_(False)

    # ---- data
    train_convs, held = alpaca_split(cfg.heldout)
    train_ex: list[TokenizedChat] = []
    if cfg.data == "alpaca":
        if cfg.max_examples != 0:
            train_ex = chat_examples(tokenizer, train_convs[: cfg.max_examples], cfg.max_len, cfg.kd_on)
    else:
        train_ex = corpus_examples(tokenizer, cfg.data, cfg.max_len, cfg.max_examples)
    gen_seconds, gen_tokens = 0.0, 0
    if cfg.teacher_responses:
        records, gen_seconds = teacher_answers(
            teacher,
            tokenizer,
            [c.messages[:-1] for c in train_convs[: cfg.teacher_responses]],
            cfg.response_tokens,
            cfg.response_temperature,
            cfg.response_dtype,
            cfg.response_batch,
            cfg.train.seed,
            cache=out_dir / "teacher_responses.jsonl",
        )
        gen_tokens = sum(len(r["answer"]) for r in records)
        train_ex = train_ex + answer_examples(records, cfg.max_len, cfg.kd_on)
    if not train_ex:
        raise ConfigError("no training data: max_examples=0 needs teacher_responses > 0")
    # Held-out evaluation on the teacher's own fp32 greedy answers, answer positions only: there, top-1
    # agreement is the rate at which greedy speculative decoding accepts the student's first draft token.
    # (Template and prompt tokens would inflate it: the fixed system prompt is easy to predict.)
    eval_records, _ = teacher_answers(
        teacher,
        tokenizer,
        [c.messages[:-1] for c in held[: cfg.eval_examples]],
        cfg.response_tokens,
        batch=cfg.response_batch,
        cache=out_dir / "eval_answers.jsonl",
    )
    eval_ex = answer_examples(eval_records, cfg.max_len, "assistant")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    seq_len = cfg.train.seq_len
    eval_batches = list(iterate_examples(eval_ex, cfg.train.batch_size, seq_len, pad_id))
    source = SFTBatchSource(train_ex, cfg.train.batch_size, seq_len, pad_id, seed=cfg.train.seed)

    trainer = Trainer(
        student,
        cfg.train,
        source,
        loss_fn=make_kd_loss_fn(teacher, cfg.temperature, cfg.alpha),
        eval_fn=make_eval_fn(teacher, eval_batches),
        tokenizer=tokenizer,
        out_dir=out_dir,
        extra_config={"distill": jsonable(dataclasses.asdict(cfg))},
    )
    teacher.to(trainer.device)
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    report: dict[str, Any] = {
        "teacher": cfg.teacher,
        "teacher_params": teacher.num_params(),
        "student_params": student.num_params(),
        "student_params_non_embedding": student.num_params(exclude_embeddings=True),
        "student_trainable": n_trainable,
        "student_layers": layers,
        "data": {
            "source": cfg.data,
            "train_examples": len(train_ex),
            "train_tokens_available": sum(len(e.input_ids) for e in train_ex),
            "teacher_responses": cfg.teacher_responses,
            "teacher_response_tokens": gen_tokens,
            "teacher_response_seconds": gen_seconds,
            "eval_examples": len(eval_ex),
        },
        "before": trainer.evaluate(),  # the layer-dropped copy, untrained (logged as step 0)
    }
    if resume:
        trainer.resume()
    t_train = time.time()
    final = trainer.fit()
    train_seconds = time.time() - t_train
    report["train"] = {
        "steps": trainer.step,
        "tokens": trainer.tokens_seen,
        "seconds": train_seconds,
        "tokens_per_s": trainer.tokens_seen / max(train_seconds, 1e-9),
        "final_train_loss": final.get("loss"),
    }
    report["after"] = {"kl": final.get("val_kl"), "top1": final.get("val_top1")}
    if cfg.accept_prompts:
        student.eval()
        prompts = [c.messages[:-1] for c in held[: cfg.accept_prompts]]
        report["speculative"] = speculative_check(
            teacher.cpu(), student.cpu(), tokenizer, prompts, cfg.accept_k, cfg.accept_tokens
        )
    report["seconds"] = time.time() - t_start
    write_report(out_dir / "distill_report.json", report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run_distill`'s report."""

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    b, a, t, d = report["before"], report["after"], report["train"], report["data"]
    lines = [
        f"student: {report['student_params'] / 1e6:.1f}M params ({report['student_params_non_embedding'] / 1e6:.1f}M "
        f"outside the embedding; {report['student_trainable'] / 1e6:.1f}M trained), teacher layers "
        f"{report['student_layers']} of a {report['teacher_params'] / 1e6:.1f}M-param teacher",
        f"  data: {d['source']}, {d['train_examples']} examples"
        + (
            f" incl. {d['teacher_responses']} teacher answers ({d['teacher_response_tokens']:.0f} tokens, "
            f"{d['teacher_response_seconds']:.0f} s to generate)"
            if d["teacher_responses"]
            else ""
        ),
        f"  trained {t['steps']} steps, {t['tokens']:,} tokens in {t['seconds']:.0f} s ({t['tokens_per_s']:.0f} tok/s)",
        f"  on the teacher's answers to {d['eval_examples']} held-out prompts (answer tokens):",
        f"    KL(teacher||student) {f(b.get('kl'))} -> {f(a.get('kl'))}",
        f"    top-1 agreement      {f(b.get('top1'))} -> {f(a.get('top1'))}",
    ]
    if "speculative" in report:
        s = report["speculative"]
        lines.append(
            f"  greedy speculative decoding (k={s['k']}, {s['prompts']} held-out prompts, {s['tokens']} tokens): "
            f"acceptance {s['acceptance']:.3f}, {s['tokens_per_step']:.2f} tokens/step, "
            f"{s['seconds_target_alone'] / max(s['seconds_speculative'], 1e-9):.2f}x vs the teacher alone, "
            f"output identical: {s['identical']}"
        )
    return "\n".join(lines)
