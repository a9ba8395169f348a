"""Validating tool-call arguments against a tool's JSON schema (the subset tool schemas use).

Supported keywords: ``type`` (object, string, number, integer, boolean, array, null, or a list of them),
``properties``, ``required``, ``additionalProperties: false``, ``enum``, ``minimum``/``maximum``,
``minLength``/``maxLength``, ``items``, ``maxItems``. That covers every schema in :mod:`.tools`; a schema
using anything else is checked for the keywords above only. (No ``jsonschema`` dependency for ~60 lines.)

Errors read like ``arguments.value: expected number, got string '12 km'`` so that a model (or a person) can
fix the call from the message alone.
"""

from __future__ import annotations

import json
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "null": (type(None),),
}


def _type_ok(value: Any, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False  # JSON's true is not a number, although Python's bool is an int
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, (object,)))


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(value: Any, schema: dict[str, Any], path: str = "arguments") -> list[str]:
    """Every violation of ``schema`` by ``value`` (empty when valid)."""
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_type_ok(value, k) for k in kinds):
            got = (
                "integer" if isinstance(value, int) and not isinstance(value, bool) else type(value).__name__
            )
            got = {
                "str": "string",
                "float": "number",
                "dict": "object",
                "list": "array",
                "NoneType": "null",
            }.get(got, got)
            return [f"{path}: expected {'/'.join(kinds)}, got {got} {_show(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {_show(value)} is not one of {', '.join(map(_show, schema['enum']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: has {len(value)} characters, at most {schema['maxLength']} allowed")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: has {len(value)} items, at most {schema['maxItems']} allowed")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required property {key!r}")
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unknown property {key!r} (allowed: {', '.join(props) or 'none'})")
    return errors


def parse_arguments(
    raw: str | dict[str, Any], schema: dict[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """A call's arguments (a JSON string or an object) checked against ``schema``: (arguments, None) when
    valid, else (None, one message listing what is wrong)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            return None, f"arguments are not valid JSON ({exc.msg} at character {exc.pos})"
    errors = validate(raw, schema)
    if errors:
        return None, "invalid arguments: " + "; ".join(errors[:5])
    return raw, None
