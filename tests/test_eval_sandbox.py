"""HumanEval's sandbox: a real problem's canonical solution passes; completions that read a file outside
their dir, open a socket, fork without end or sleep forever are contained and count as failures."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import torch
from _interop_helpers import tiny_tokenizer

from llmlab.eval import evaluate
from llmlab.eval.humaneval import check_completions, humaneval_metrics, load_problems
from llmlab.eval.sandbox import Limits, isolation, run_program
from llmlab.model import ModelConfig, Transformer

FAST = Limits(cpu_seconds=2, wall_seconds=4.0)
needs_namespaces = pytest.mark.skipif(
    isolation() == "rlimits", reason="no bwrap/unshare namespaces here: only resource limits are active"
)


def _problem():
    problems, bad = load_problems()
    assert not bad and len(problems) == 164
    return problems[0][1]


def test_canonical_solution_passes_and_a_wrong_one_fails():
    p = _problem()
    passed = check_completions([p], [[p["canonical_solution"], "    return None\n"]], limits=FAST)
    assert passed == [[True, False]]
    m = humaneval_metrics(passed)
    assert m["pass@1"] == 0.5 and m["isolation"] == isolation()


@needs_namespaces
def test_reading_a_file_outside_the_dir_fails(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-7431")
    secret.chmod(0o644)
    r = run_program(f"print(open({str(secret)!r}).read())", FAST)
    assert not r.passed and "TOP-SECRET-7431" not in r.output
    p = _problem()
    evil = f"    print(open({str(secret)!r}).read())\n" + p["canonical_solution"]
    assert check_completions([p], [[evil]], limits=FAST) == [[False]]


@needs_namespaces
def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    r = run_program(
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')", FAST
    )
    assert not r.passed and "connected" not in r.output
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def _sandbox_processes() -> int:
    r = subprocess.run(["pgrep", "-fc", "-I -S prog.py"], capture_output=True, text=True)
    return int(r.stdout.strip() or 0)


def test_fork_bomb_is_contained_and_cleaned_up():
    t0 = time.perf_counter()
    r = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    assert not r.passed and time.perf_counter() - t0 < FAST.wall_seconds + 3
    time.sleep(0.5)
    assert _sandbox_processes() == 0


def test_sleeping_forever_times_out():
    t0 = time.perf_counter()
    r = run_program("import time\ntime.sleep(1000)\n", Limits(cpu_seconds=2, wall_seconds=2.0))
    assert r.status == "timeout" and not r.passed and time.perf_counter() - t0 < 6


def test_humaneval_task_end_to_end_on_a_tiny_model():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=128)
    )
    res = evaluate(model.eval(), tasks=["humaneval"], limit=2, samples=2, tokenizer=tok, progress=False)[
        "results"
    ]
    h = res["humaneval"]
    assert h["pass@1"] == 0.0 and h["n"] == 2 and h["samples"] == 2 and h["truncated"] == 4
    assert h["isolation"] == isolation() and "pass@10" not in h
