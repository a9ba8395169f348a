"""Typed configs: presets, YAML, key=value overrides, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from llmlab.config import build_config
from llmlab.errors import ConfigError
from llmlab.model import MODEL_PRESETS, ModelConfig


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    flag: bool = False
    window: int | None = None


PRESETS = {"fast": Outer(name="fast", inner=Inner(steps=2))}


def test_preset_then_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("inner:\n  lr: 0.5\nflag: true\n")
    cfg = build_config(Outer, PRESETS, "fast", y, ["inner.steps=7", "tags=a,b", "window=null"])
    assert (cfg.name, cfg.inner.lr, cfg.inner.steps, cfg.flag, cfg.tags, cfg.window) == (
        "fast",
        0.5,
        7,
        True,
        ["a", "b"],
        None,
    )
    assert PRESETS["fast"].inner.steps == 2  # presets are never mutated


def test_scientific_ints_and_bools():
    cfg = build_config(Outer, overrides=["inner.steps=1e3", "flag=yes"])
    assert cfg.inner.steps == 1000 and cfg.flag is True


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["inner.nope=1"], "inner.nope"),
        (["bogus=1"], "bogus"),
        (["inner.steps=2.5"], "inner.steps"),
        (["flag=maybe"], "flag"),
        (["noequals"], "noequals"),
        (["name.sub=1"], "name"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(Outer, overrides=overrides)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        build_config(Outer, yaml_path=bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("inner:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*inner.momentum"):
        build_config(Outer, yaml_path=unknown)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_config(Outer, PRESETS, "huge")


def test_model_presets_validate_and_impossible_shape_is_named():
    for cfg in MODEL_PRESETS.values():
        cfg.validate()
    with pytest.raises(ConfigError, match="n_kv_heads"):
        build_config(ModelConfig, overrides=["n_heads=6", "n_kv_heads=4", "d_model=384"])


def test_list_override_accepts_a_yaml_list_with_commas_inside_items():
    from llmlab.config import set_key
    from llmlab.recipes.dpo import AlignConfig

    cfg = AlignConfig()
    set_key(cfg, "data", "tasks,hh-rlhf")
    assert cfg.data == ["tasks", "hh-rlhf"]
    set_key(cfg, "data", '["onpolicy:tasks:addition,json", tasks]')
    assert cfg.data == ["onpolicy:tasks:addition,json", "tasks"]


def test_alignment_presets_validate_and_take_overrides():
    from llmlab.recipes.dpo import ALIGN_PRESETS
    from llmlab.recipes.grpo import GRPO_PRESETS, GRPOConfig

    for cfg in [*ALIGN_PRESETS.values(), *GRPO_PRESETS.values()]:  # PPO's presets need a reward_model= first
        cfg.validate()
    cfg = build_config(GRPOConfig, GRPO_PRESETS, "tiny-grpo", None, ["train.max_steps=3", "group_size=4"])
    assert (cfg.train.max_steps, cfg.group_size, cfg.train.lr) == (3, 4, 4e-5)
    assert GRPO_PRESETS["tiny-grpo"].train.max_steps == 350  # the preset itself is never mutated
