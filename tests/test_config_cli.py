"""One command-line convention across verbs: outputs never overwritten silently, --debug anywhere, --version,
key=value / --set overrides with bare keys and suggestions, --base, the public API listing."""

from __future__ import annotations

import argparse
import json

import pytest

import llmlab
from llmlab.cli import build_parser, main, split_debug
from llmlab.config import build_config
from llmlab.errors import ConfigError, LLMLabError
from llmlab.outputs import check_output

# Every verb that writes an output, with the arguments that reach the output check (the check runs before
# the command does anything else, so the model paths need not exist).
WRITERS = [
    ["pretrain", "--out", "{out}"],
    ["sft", "--out", "{out}"],
    ["distill", "--out", "{out}"],
    ["rm", "--out", "{out}"],
    ["align", "--out", "{out}"],
    ["ppo", "--out", "{out}"],
    ["grpo", "--out", "{out}"],
    ["data", "prepare", "--corpus", "x", "--tokenizer", "t", "--out", "{out}"],
    ["tokenizer", "train", "--corpus", "x", "--vocab-size", "300", "--out", "{out}"],
    ["quantize", "src", "{out}"],
    ["convert", "src", "{out}"],
]


def _previous_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


@pytest.mark.parametrize("argv", WRITERS, ids=lambda a: " ".join(a[:2]))
def test_no_verb_writes_over_a_previous_run(argv, tmp_path, capsys):
    out = _previous_run(tmp_path)
    assert main([a.format(out=out) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds a previous run; pass" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "m", "--prompt", "hi", "--out", "{out}"],
        ["data", "clean", "--corpus", "x", "--out", "{out}"],
    ],
    ids=["generate", "data clean"],
)
def test_file_outputs_are_not_overwritten_either(argv, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    assert main([a.format(out=out) for a in argv]) == 2
    assert f"{out}: exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "old\n"


def test_resume_and_overwrite(tmp_path):
    out = _previous_run(tmp_path)
    check_output(out, resume=True, resumable=True)  # continuing a run is fine
    assert (out / "metrics.jsonl").is_file()
    check_output(out, overwrite=True)  # replacing it removes the old run, so nothing stale survives
    assert not out.exists()
    check_output(tmp_path / "new")  # nothing there: fine
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"x")
    with pytest.raises(LLMLabError, match="does not look like an llmlab output"):
        check_output(stranger, overwrite=True)
    assert (stranger / "cat.jpg").is_file()


def test_resumable_verbs_name_resume(tmp_path, capsys):
    out = _previous_run(tmp_path)
    assert main(["sft", "--out", str(out)]) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert main(["align", "--out", str(out)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err


def test_debug_is_accepted_after_the_verb(tmp_path, capsys):
    assert split_debug(["align", "--debug", "x"]) == (["align", "x"], True)
    assert split_debug(["generate", "--", "--debug"]) == (["generate", "--", "--debug"], False)
    out = _previous_run(tmp_path)
    with pytest.raises(LLMLabError):  # --debug after the verb: the traceback, not the one-line message
        main(["align", "--out", str(out), "--debug"])
    assert main(["align", "--out", str(out)]) == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"llmlab {llmlab.__version__}"


def test_bare_keys_work_for_align_and_suggest_the_full_key():
    from llmlab.recipes.dpo import AlignConfig

    cfg = build_config(AlignConfig, overrides=["max_steps=5", "lr=1e-4"])
    assert cfg.train.max_steps == 5 and cfg.train.lr == 1e-4
    with pytest.raises(
        ConfigError, match=r"unknown config key 'max_step' \(did you mean 'train.max_steps'\?\)"
    ):
        build_config(AlignConfig, overrides=["max_step=5"])
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        build_config(AlignConfig, overrides=["train.max_step=5"])


def test_base_is_the_one_spelling_of_the_start_model():
    parser = build_parser()
    args = parser.parse_args(["align", "--base", "ckpt", "--out", "o", "beta=0.2", "--set", "lr=1e-5"])
    assert args.base == "ckpt" and args.overrides == ["beta=0.2"] and args.set_overrides == ["lr=1e-5"]
    assert parser.parse_args(["distill", "--teacher", "t", "--out", "o"]).base == "t"  # the old spelling
    assert parser.parse_args(["sft", "--base", "b", "--out", "o"]).base == "b"
    from llmlab.recipes.dpo import AlignConfig

    assert build_config(AlignConfig, overrides=["base=x"], aliases={"base": "model"}).model == "x"


def test_help_shows_defaults(capsys):
    for verb, shown in (
        ("generate", "max tokens 32"),
        ("chat", "temperature 0.7, top-p 0.9, max tokens 256"),
    ):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert shown in " ".join(capsys.readouterr().out.split())


def test_help_defaults_match_the_sampling_presets():
    from llmlab.infer.cli import SAMPLING_DEFAULTS
    from llmlab.infer.sampling import SAMPLING_PRESETS

    for name, shown in SAMPLING_DEFAULTS.items():
        assert {k: getattr(SAMPLING_PRESETS[name], k) for k in shown} == shown


def test_int4_beside_int8():
    from llmlab.infer.cli import llm_options

    parser = build_parser()
    assert llm_options(parser.parse_args(["generate", "m", "--prompt", "x", "--int4"]))["fast"] == "int4"
    assert llm_options(parser.parse_args(["generate", "m", "--prompt", "x", "--int8"]))["fast"] == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "m", "--prompt", "x", "--int4", "--int8"])


def test_prompt_records_carry_id_and_their_own_sampling(tmp_path):
    from llmlab.errors import DataError
    from llmlab.infer.cli import read_prompts, record_params
    from llmlab.infer.sampling import SamplingParams

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a1", "prompt": "hi", "max_tokens": 3}) + "\n" + '{"prompt": "yo"}\n')
    recs = read_prompts(path)
    assert recs[0]["id"] == "a1" and recs[0]["sampling"] == {"max_tokens": 3} and "id" not in recs[1]
    base = SamplingParams(max_tokens=32)
    assert record_params(base, recs[0]["sampling"], "p").max_tokens == 3 and base.max_tokens == 32
    with pytest.raises(DataError, match="p: .*temperature"):
        record_params(base, {"temperature": "hot"}, "p")
    path.write_text('{"prompt": "hi", "tempreture": 1}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: unknown key 'tempreture'"):
        read_prompts(path)


def test_public_api_is_listed():
    assert "load" in dir(llmlab) and "evaluate" in llmlab.__all__ and "LLM" in dir(llmlab)
    assert all(not name.startswith("_") or name == "__version__" for name in dir(llmlab))


def test_training_verbs_end_with_run_report_and_next_command(tmp_path):
    from llmlab.outputs import run_summary

    text = run_summary(tmp_path, "final/", "x_report.json", "llmlab chat RUN")
    assert text.splitlines() == [
        f"run:    {tmp_path}  (final/)",
        f"report: {tmp_path / 'x_report.json'}",
        "next:   llmlab chat RUN",
    ]


def test_namespace_for_unknown_command_still_prints_help():
    assert isinstance(build_parser(), argparse.ArgumentParser)


def test_generate_carries_ids_honours_record_sampling_and_says_when_cut(tmp_path, capsys):
    from _align_helpers import chat_tokenizer, tiny_model

    from llmlab.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "m", tiny_model(seed=0), chat_tokenizer())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"id": "q1", "prompt": "hello", "max_tokens": 2, "ignore_eos": True})
        + "\n"
        + json.dumps({"id": 7, "prompt": "bye", "max_tokens": 5, "ignore_eos": True})
        + "\n"
    )
    assert main(["generate", str(ckpt), "--prompts", str(prompts), "--no-fast"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(x) for x in captured.out.strip().splitlines()]
    assert [r["id"] for r in rows] == ["q1", 7]
    assert [len(r["token_ids"]) for r in rows] == [2, 5]  # each record's own max_tokens
    assert "2 of 2 outputs were cut at the max_tokens limit (2, 5)" in captured.err
