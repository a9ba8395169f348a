"""Typed dataclass configs: named presets, YAML files and ``key=value`` overrides.

Every stage (pretrain, sft, align, ...) describes its settings as a dataclass. This module turns the three
ways a user can set them into one validated instance, and names the offending key when something is wrong:

    cfg = build_config(PretrainConfig, preset="tiny", yaml_path="my.yaml", overrides=["max_steps=100"])

Nested dataclasses are addressed with dots: ``model.n_layers=4``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmlab.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the field type ``tp``."""
    base, optional = _strip_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional or base is Any:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    if base is Any:
        return _parse_scalar(value) if isinstance(value, str) else value
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                try:
                    return int(value.replace("_", ""))
                except ValueError:
                    as_float = float(value)  # accept "1e4"; reject "2.5"
                    if not as_float.is_integer():
                        raise
                    return int(as_float)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base is str:
            return str(value)
        if origin is typing.Literal:
            allowed = typing.get_args(base)
            if value not in allowed:
                raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
            return value
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(base) or (Any,)
            if isinstance(value, str) and value.strip().startswith("["):
                value = yaml.safe_load(value)  # a YAML list: items may contain commas if quoted
                if not isinstance(value, list):
                    raise ValueError(value)
            elif isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            items = [coerce(v, item_tp, key) for v in value]
            return items if origin is list else tuple(items)
        if origin is dict or base is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if dataclasses.is_dataclass(base):
            if isinstance(value, base):
                return value
            if not isinstance(value, dict):
                raise ValueError(value)
            return from_dict(base, value, prefix=f"{key}.")
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {_type_name(base)}") from exc
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a dict, rejecting unknown keys by name."""
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        known = ", ".join(sorted(types_))
        hint = suggest(unknown[0], cls, prefix=prefix)
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'{hint} (known keys: {known})")
    kwargs = {k: coerce(v, types_[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    _validate(obj)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _validate(obj: Any) -> None:
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def set_key(obj: Any, dotted: str, raw: Any, prefix: str = "") -> None:
    """Set ``a.b.c`` on a (nested) dataclass instance, coercing ``raw`` to the field type."""
    head, _, rest = dotted.partition(".")
    types_ = _field_types(type(obj))
    if head not in types_:
        known = ", ".join(sorted(types_))
        hint = suggest(dotted, type(obj), prefix=prefix)
        raise ConfigError(f"unknown config key '{prefix}{head}'{hint} (known keys: {known})")
    if rest:
        child = getattr(obj, head)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"config key '{prefix}{head}' has no sub-keys (got '{prefix}{dotted}')")
        set_key(child, rest, raw, prefix=f"{prefix}{head}.")
        return
    setattr(obj, head, coerce(raw, types_[head], prefix + head))


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of ``cls``, nested sections dotted: ``["lr", "train.max_steps", ...]``."""
    keys = []
    for name, tp in _field_types(cls).items():
        base, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(base):
            keys += all_keys(base, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def suggest(key: str, cls: type, aliases: dict[str, str] | None = None, prefix: str = "") -> str:
    """`` (did you mean 'train.max_steps'?)`` for the known key closest to ``key``, or ``""`` (``prefix``: where
    ``cls`` sits in the whole config, e.g. ``"train."``)."""
    known = all_keys(cls) + list(aliases or {})
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != key]
    close = by_leaf or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a misspelt bare key: compare it with the last part of each key
        leaves = {k.rsplit(".", 1)[-1]: k for k in known}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)]
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def qualify_key(cls: type, key: str, aliases: dict[str, str] | None = None) -> str:
    """A flat override key resolved for ``cls``: an alias (``lora_r`` -> ``lora.r``), a dotted or top-level
    key as is, else the one nested section whose dataclass has the field (``max_steps`` ->
    ``train.max_steps``). An unknown key raises :class:`ConfigError` naming it and the closest known key; a
    bare key two sections share asks for the dotted form."""
    aliases = aliases or {}
    if key in aliases:
        return aliases[key]
    types_ = _field_types(cls)
    if "." in key or key in types_:
        return key
    owners = [k for k in all_keys(cls) if k.count(".") == 1 and k.split(".")[1] == key]
    if len(owners) == 1:
        return owners[0]
    if len(owners) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: use {' or '.join(repr(o) for o in owners)}")
    raise ConfigError(f"unknown config key '{key}'{suggest(key, cls, aliases)}")


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        pairs.append((key.strip(), value))
    return pairs


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return data


def _apply_mapping(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    for key, value in data.items():
        types_ = _field_types(type(obj))
        if key not in types_:
            known = ", ".join(sorted(types_))
            hint = suggest(key, type(obj), prefix=prefix)
            raise ConfigError(f"{source}: unknown config key '{prefix}{key}'{hint} (known keys: {known})")
        child = getattr(obj, key)
        if dataclasses.is_dataclass(child) and isinstance(value, dict):
            _apply_mapping(child, value, source, prefix=f"{prefix}{key}.")
        else:
            try:
                setattr(obj, key, coerce(value, types_[key], prefix + key))
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from exc


def build_config(
    cls: type[T],
    presets: dict[str, T] | None = None,
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    aliases: dict[str, str] | None = None,
) -> T:
    """Preset, then YAML, then ``key=value`` overrides; validated at the end.

    An override key may be bare when one nested section has it (``max_steps=5`` is ``train.max_steps=5``) or
    an alias (``aliases``, e.g. ``{"lora_r": "lora.r"}``); see :func:`qualify_key`."""
    if preset is not None:
        if not presets or preset not in presets:
            names = ", ".join(sorted(presets or {}))
            raise ConfigError(f"unknown preset '{preset}' (presets: {names})")
        cfg = dataclasses.replace(presets[preset])
        cfg = _deepcopy(cfg)
    else:
        cfg = cls()
    if yaml_path is not None:
        _apply_mapping(cfg, load_yaml(yaml_path), str(yaml_path))
    for key, value in parse_overrides(overrides or []):
        set_key(cfg, qualify_key(cls, key, aliases), value)
    _validate_tree(cfg)
    return cfg


def _deepcopy(obj: T) -> T:

    return copy.deepcopy(obj)


def _validate_tree(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate_tree(child)
    _validate(obj)
