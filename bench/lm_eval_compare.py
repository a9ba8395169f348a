"""llmlab's harness against lm-evaluation-harness itself, on the same records, in one run.

lm-eval 0.4.13 lives in a bench-only venv OUTSIDE the repo (see --lmeval-python); this script writes local
task YAMLs (``dataset_path: json``) over JSONL exports of the bundled records, parsed by llmlab's own parser,
with lm-eval's prompt templates (the YAMLs mirror lm-eval's arc/piqa/boolq/winogrande/openbookqa/siqa/
truthfulqa/gsm8k tasks; WinoGrande and TruthfulQA MC2 use copies of lm-eval's own helper functions). Then:

1. ``lm_eval --model hf --model_args pretrained=HF_DIR,dtype=float32 --log_samples`` on them;
2. ``llmlab.evaluate`` on the same model (the same HF dir) with the same ``--limit``;
3. prints both metrics side by side, and per question the largest |log-likelihood difference| and how many
   predictions differ.

    python bench/lm_eval_compare.py --model /root/.cache/llmlab-bench/smollm2-hf --limit 200 --gsm8k-limit 10

Set up once (outside the repo)::

    python3 -m venv /root/.cache/llmlab-bench/lmeval-venv
    flock /tmp/llmlab-pip.lock /root/.cache/llmlab-bench/lmeval-venv/bin/pip install torch==2.13.0
    flock /tmp/llmlab-pip.lock /root/.cache/llmlab-bench/lmeval-venv/bin/pip install lm-eval==0.4.13
    .venv/bin/python -m llmlab convert smollm2 /root/.cache/llmlab-bench/smollm2-hf --to hf
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import subprocess
import time
from pathlib import Path

from llmlab.eval import evaluate
from llmlab.eval.mc_tasks import TRUTHFULQA_PREAMBLE, build_truthfulqa
from llmlab.eval.records import EVAL_ASSETS, parse_choice_record, read_json_records

BENCH = Path("/root/.cache/llmlab-bench")
MC_TASKS = ["arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "openbookqa", "social_iqa",
            "truthfulqa_mc1", "truthfulqa_mc2"]  # fmt: skip
PLAIN = {  # task -> (doc_to_text, metrics): lm-eval's templates over the parsed fields
    "arc_easy": ("Question: {{question}}\\nAnswer:", ["acc", "acc_norm"]),
    "arc_challenge": ("Question: {{question}}\\nAnswer:", ["acc", "acc_norm"]),
    "piqa": ("Question: {{question}}\\nAnswer:", ["acc", "acc_norm"]),
    "openbookqa": ("{{question}}", ["acc", "acc_norm"]),
    "social_iqa": ("Q: {{question}}\\nA:", ["acc"]),
}
UTILS = """import numpy as np

def wino_doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]

def wino_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()

def wino_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in [doc["option1"], doc["option2"]]]

def process_results_mc2(doc, results):  # lm-eval 0.4.13 tasks/truthfulqa/utils.py
    ll, _ = zip(*results)
    probs = np.exp(np.array(ll))
    probs_norm = probs / np.sum(probs)
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": np.sum(probs_norm[labels == 1])}
"""


def _yaml(task: str, data: Path, body: str) -> str:
    return f"task: lc_{task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}"


def _metrics(names: list[str]) -> str:
    return "metric_list:\n" + "".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in names
    )


def write_tasks(out: Path) -> None:
    """JSONL exports of the bundled records and lm-eval task YAMLs over them."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "lc_utils.py").write_text(UTILS)
    for task in ["arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "openbookqa", "social_iqa"]:
        recs, _ = read_json_records(EVAL_ASSETS / f"{task}_test.json.gz")
        rows = [parse_choice_record(r, w) for w, r in recs]
        data = out / f"{task}.jsonl"
        with open(data, "w") as f:
            for p in rows:
                if task == "winogrande":
                    doc = {"sentence": p["question"], "option1": p["options"][0], "option2": p["options"][1],
                           "answer": str(p["gold"] + 1)}  # fmt: skip
                elif task == "boolq":
                    doc = {"question": p["question"].rstrip("?"), "label": int(p["gold"] == "true")}
                else:
                    doc = {"question": p["question"], "options": p["options"], "gold": p["gold"]}
                f.write(json.dumps(doc) + "\n")
        if task == "winogrande":
            body = ("output_type: multiple_choice\ndoc_to_text: !function lc_utils.wino_doc_to_text\n"
                    "doc_to_target: !function lc_utils.wino_doc_to_target\n"
                    "doc_to_choice: !function lc_utils.wino_doc_to_choice\n" + _metrics(["acc"]))  # fmt: skip
        elif task == "boolq":
            body = ('output_type: multiple_choice\ndoc_to_text: "Question: {{question}}?\\nAnswer:"\n'
                    'doc_to_target: label\ndoc_to_choice: ["no", "yes"]\n' + _metrics(["acc"]))  # fmt: skip
        else:
            text, metrics = PLAIN[task]
            body = (f'output_type: multiple_choice\ndoc_to_text: "{text}"\ndoc_to_target: gold\n'
                    f'doc_to_choice: "{{{{options}}}}"\n' + _metrics(metrics))  # fmt: skip
        (out / f"lc_{task}.yaml").write_text(_yaml(task, data, body))
    # TruthfulQA: mc1/mc2 targets built from the CSV exactly as llmlab builds them.
    docs1, _ = build_truthfulqa(1)
    docs2, _ = build_truthfulqa(2)
    data = out / "truthfulqa.jsonl"
    with open(data, "w") as f:
        for d1, d2 in zip(docs1, docs2, strict=True):
            question = d1.requests[0][0].split("\n\nQ: ")[-1].removesuffix("\nA:")
            labels = [1] * d2.n_true + [0] * (len(d2.choices) - d2.n_true)
            f.write(json.dumps({"question": question, "mc1_targets": {"choices": d1.choices},
                                "mc2_targets": {"choices": d2.choices, "labels": labels}}) + "\n")  # fmt: skip
    preamble = json.dumps(TRUTHFULQA_PREAMBLE + "\n\nQ: ")[1:-1]
    text = f'doc_to_text: "{preamble}{{{{question}}}}\\nA:"\n'
    for mc in (1, 2):
        extra = "process_results: !function lc_utils.process_results_mc2\n" if mc == 2 else ""
        body = (f"output_type: multiple_choice\n{text}doc_to_target: 0\n"
                f'doc_to_choice: "{{{{mc{mc}_targets.choices}}}}"\n{extra}' + _metrics(["acc"]))  # fmt: skip
        (out / f"lc_truthfulqa_mc{mc}.yaml").write_text(_yaml(f"truthfulqa_mc{mc}", data, body))
    # GSM8K: lm-eval's gsm8k.yaml with local test/train files (its default seeded few-shot sampler).
    gsm = (
        f"task: lc_gsm8k\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {out / 'gsm8k_test.jsonl'}\n    train: {out / 'gsm8k_train.jsonl'}\n"
        "test_split: test\nfewshot_split: train\noutput_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        '    ignore_case: true\n    ignore_punctuation: false\n    regexes_to_ignore:\n      - ","\n      - "\\\\$"\n'
        '      - "(?s).*#### "\n      - "\\\\.$"\n'
        'generation_kwargs:\n  until:\n    - "Question:"\n    - "</s>"\n    - "<|im_end|>"\n  do_sample: false\n'
        "  temperature: 0.0\nnum_fewshot: 5\nfilter_list:\n  - name: strict-match\n    filter:\n"
        '      - function: regex\n        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"\n      - function: take_first\n'
        "  - name: flexible-extract\n    filter:\n      - function: regex\n        group_select: -1\n"
        '        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"\n      - function: take_first\n'
    )
    for split, src in (
        ("test", EVAL_ASSETS / "gsm8k_test.jsonl.gz"),
        ("train", EVAL_ASSETS.parent / "sft" / "gsm8k_train.jsonl.gz"),
    ):
        (out / f"gsm8k_{split}.jsonl").write_bytes(gzip.decompress(src.read_bytes()))
    (out / "lc_gsm8k.yaml").write_text(gsm)


def run_lm_eval(
    python: str, model: str, tasks: list[str], limit: int, task_dir: Path, out: Path, batch: int
) -> tuple[dict, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cmd = [python, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--include_path", str(task_dir), "--tasks", ",".join(f"lc_{t}" for t in tasks), "--device", "cpu",
           "--batch_size", str(batch), "--limit", str(limit), "--output_path", str(out), "--log_samples"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - t0
    files = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    return json.loads(Path(files[-1]).read_text()), seconds


def lm_eval_samples(out: Path, task: str) -> list[dict]:
    files = sorted(
        glob.glob(str(out / "**" / f"samples_lc_{task}_*.jsonl"), recursive=True), key=os.path.getmtime
    )
    rows = [json.loads(line) for line in Path(files[-1]).read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=str(BENCH / "smollm2-hf"), help="HF model dir (llmlab convert ... --to hf)"
    )
    ap.add_argument("--lmeval-python", default=str(BENCH / "lmeval-venv" / "bin" / "python"))
    ap.add_argument("--tasks", default=",".join(MC_TASKS))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--gsm8k-limit", type=int, default=10, help="0: skip GSM8K")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", type=Path, default=BENCH / "lm_eval_compare")
    ap.add_argument("--json", type=Path, default=None, help="write both tools' numbers here")
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    write_tasks(args.work / "tasks")
    report: dict = {"limit": args.limit, "gsm8k_limit": args.gsm8k_limit, "tasks": {}}

    theirs, lm_seconds = run_lm_eval(args.lmeval_python, args.model, tasks, args.limit, args.work / "tasks",
                                     args.work / "out", args.batch_size)  # fmt: skip
    t0 = time.perf_counter()
    ours = evaluate(args.model, tasks=tasks, limit=args.limit, batch_size=args.batch_size, log_samples=True)
    our_seconds = time.perf_counter() - t0
    print(
        f"\n{'task':<16} {'metric':<10} {'lm-eval':>8} {'llmlab':>8} {'diff(pt)':>9} {'max|dLL|':>9} {'pred≠':>6} {'n':>5}"
    )
    for task in tasks:
        lm = theirs["results"][f"lc_{task}"]
        samples = lm_eval_samples(args.work / "out", task)
        our_lls = [s["loglikelihoods"] for s in ours["samples"][task]]
        max_dll, differ = 0.0, 0
        for s, mine in zip(samples, our_lls, strict=True):
            their = [float(r[0]) for r in s["filtered_resps"]]
            max_dll = max(max_dll, max(abs(a - b) for a, b in zip(their, mine, strict=True)))
            differ += int(
                max(range(len(their)), key=their.__getitem__) != max(range(len(mine)), key=mine.__getitem__)
            )
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" not in lm or metric not in ours["results"][task]:
                continue
            a, b = float(lm[f"{metric},none"]), float(ours["results"][task][metric])
            report["tasks"].setdefault(task, {})[metric] = {"lm_eval": a, "llmlab": b}
            print(
                f"{task:<16} {metric:<10} {a:>8.4f} {b:>8.4f} {100 * (b - a):>+9.2f} {max_dll:>9.2e} {differ:>6} {len(samples):>5}"
            )
        report["tasks"][task]["max_abs_loglik_diff"] = max_dll
        report["tasks"][task]["argmax_disagreements"] = differ
    report["seconds"] = {"lm_eval_mc": lm_seconds, "llmlab_mc": our_seconds}
    print(f"time for the MC tasks: lm-eval {lm_seconds:.0f}s (incl. model load), llmlab {our_seconds:.0f}s")

    if args.gsm8k_limit:
        theirs, lm_s = run_lm_eval(args.lmeval_python, args.model, ["gsm8k"], args.gsm8k_limit, args.work / "tasks",
                                   args.work / "out", args.batch_size)  # fmt: skip
        t0 = time.perf_counter()
        ours = evaluate(args.model, tasks=["gsm8k"], limit=args.gsm8k_limit, batch_size=args.batch_size)
        our_s = time.perf_counter() - t0
        lm = theirs["results"]["lc_gsm8k"]
        for ours_key, lm_key in (("exact_match_strict", "exact_match,strict-match"),
                                 ("exact_match_flexible", "exact_match,flexible-extract")):  # fmt: skip
            a, b = float(lm[lm_key]), float(ours["results"]["gsm8k"][ours_key])
            report["tasks"].setdefault("gsm8k", {})[ours_key] = {"lm_eval": a, "llmlab": b}
            print(f"{'gsm8k':<16} {ours_key:<22} lm-eval {a:.4f}  llmlab {b:.4f}  (n={args.gsm8k_limit})")
        samples = lm_eval_samples(args.work / "out", "gsm8k")
        report["gsm8k_lm_eval_first_answer"] = samples[0]["resps"][0][0][:300]
        report["seconds"].update({"lm_eval_gsm8k": lm_s, "llmlab_gsm8k": our_s})
        print(f"time for GSM8K: lm-eval {lm_s:.0f}s, llmlab {our_s:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
