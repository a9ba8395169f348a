"""The agent's tools: JSON-schema'd functions with a Python implementation each.

- ``calculator``: arithmetic evaluated by walking the expression's AST (numbers, + - * / // % **, a few math
  functions); never ``eval``. Huge powers and long expressions are refused.
- ``unit_convert``: length, mass, time, volume and temperature by a fixed table.
- ``python``: a program run by :func:`llmlab.eval.sandbox.run_program` (namespaces where the kernel allows them,
  resource limits, a wall-clock timeout); its printed output is the observation.
- ``read_file``: a text file under a workspace directory (paths and symlinks that leave it are refused).
- ``rag_search``: passages from a retrieval index (any object with ``search(query, k)``; see :mod:`.rag`).

A tool returns its observation as text; a tool's failure is an observation too (``error: ...``), so the loop
goes on and the model can correct itself. :meth:`Tool.spec` is the OpenAI ``tools`` entry.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmlab.errors import LLMLabError
from llmlab.eval.sandbox import Limits, run_program


class ToolError(Exception):
    """A tool could not do what was asked; the message becomes the observation."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[[dict[str, Any]], str]
    timeout_s: float = 10.0
    own_timeout: bool = False  # the tool enforces its own timeout (the sandbox kills the program)

    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def __call__(self, args: dict[str, Any]) -> str:
        """Run the tool on validated ``args``: its output, or ``error: ...`` (failure or timeout)."""
        try:
            if self.own_timeout:
                return self.fn(args)
            # A pure-Python tool cannot be killed: on timeout its thread is abandoned, not waited for.
            pool = ThreadPoolExecutor(max_workers=1)
            try:
                return pool.submit(self.fn, args).result(timeout=self.timeout_s)
            except FutureTimeout:
                return f"error: {self.name} timed out after {self.timeout_s:g} s"
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        except ToolError as exc:
            return f"error: {exc}"


# ---- calculator ---------------------------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION = 300


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6 and right > 4):
            raise ToolError("exponent too large")  # 9**9**9 would take minutes and gigabytes
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords:
            raise ToolError(f"{node.func.id}() takes no keyword arguments")
        return _FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args])
    what = type(node).__name__ if not isinstance(node, ast.Name) else f"name {node.id!r}"
    raise ToolError(
        f"unsupported {what}: use numbers, + - * / // % ** ( ) and {', '.join([*_FUNCTIONS, *_CONSTANTS])}"
    )


def format_number(value: float) -> str:
    """An int as itself; a float with up to 10 significant digits (no float noise such as 0.30000000000000004)."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.10g}"


def calculate(expression: str) -> str:
    """``expression`` evaluated by its AST (see the module doc); raises :class:`ToolError`."""
    expression = expression.strip().replace("^", "**").replace("×", "*").replace(",", "")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"cannot parse {expression!r}: {exc.msg}") from None
    try:
        return format_number(_evaluate(tree))
    except (ZeroDivisionError, ValueError, OverflowError, TypeError) as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from None


# ---- unit_convert -------------------------------------------------------------------------------------------

# unit -> (dimension, factor to the dimension's base unit)
UNITS: dict[str, tuple[str, float]] = {
    "meter": ("length", 1.0),
    "kilometer": ("length", 1000.0),
    "centimeter": ("length", 0.01),
    "millimeter": ("length", 0.001),
    "mile": ("length", 1609.344),
    "yard": ("length", 0.9144),
    "foot": ("length", 0.3048),
    "inch": ("length", 0.0254),
    "kilogram": ("mass", 1.0),
    "gram": ("mass", 0.001),
    "pound": ("mass", 0.45359237),
    "ounce": ("mass", 0.028349523125),
    "second": ("time", 1.0),
    "minute": ("time", 60.0),
    "hour": ("time", 3600.0),
    "day": ("time", 86400.0),
    "liter": ("volume", 1.0),
    "milliliter": ("volume", 0.001),
    "gallon": ("volume", 3.785411784),
    "celsius": ("temperature", 1.0),
    "fahrenheit": ("temperature", 1.0),
    "kelvin": ("temperature", 1.0),
}


def _to_celsius(value: float, unit: str) -> float:
    return {"celsius": value, "fahrenheit": (value - 32) * 5 / 9, "kelvin": value - 273.15}[unit]


def _from_celsius(value: float, unit: str) -> float:
    return {"celsius": value, "fahrenheit": value * 9 / 5 + 32, "kelvin": value + 273.15}[unit]


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (both keys of :data:`UNITS`)."""
    (dim_a, fa), (dim_b, fb) = UNITS[from_unit], UNITS[to_unit]
    if dim_a != dim_b:
        raise ToolError(f"cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
    if dim_a == "temperature":
        return _from_celsius(_to_celsius(value, from_unit), to_unit)
    return value * fa / fb


# ---- files and retrieval ------------------------------------------------------------------------------------

MAX_FILE_CHARS = 8000


def read_workspace_file(workspace: Path, relative: str) -> str:
    """A text file under ``workspace`` (refusing absolute paths, ``..`` and symlinks that leave it)."""
    root = workspace.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise ToolError(f"{relative!r} is outside the workspace; paths are relative to it")
    if not target.is_file():
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:20]
        raise ToolError(f"no file {relative!r} in the workspace (files: {', '.join(names) or 'none'})")
    data = target.read_bytes()[: MAX_FILE_CHARS * 4]
    if b"\0" in data[:4096]:
        raise ToolError(f"{relative!r} is a binary file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"{relative!r} is not UTF-8 text") from None
    return text if len(text) <= MAX_FILE_CHARS else text[:MAX_FILE_CHARS] + "\n[... truncated]"


class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        """Best passages first, each ``{"id", "source", "text"}``."""
        ...


# ---- the tool set -------------------------------------------------------------------------------------------

TOOL_NAMES = ("calculator", "unit_convert", "python", "read_file", "rag_search")
DEFAULT_TOOLS = ("calculator", "unit_convert", "python")


def _python_tool(limits: Limits) -> Callable[[dict[str, Any]], str]:
    def run(args: dict[str, Any]) -> str:
        r = run_program(args["code"], limits)
        output = r.output.strip() or "(no output: print() the result)"
        if r.status == "timeout":
            return f"error: python timed out after {limits.wall_seconds:g} s and was killed\n{output}"
        if not r.passed:
            return f"error: python exited with status {r.returncode}\n{output}"
        return output

    return run


def _rag_tool(retriever: Retriever) -> Callable[[dict[str, Any]], str]:
    def run(args: dict[str, Any]) -> str:
        hits = retriever.search(args["query"], int(args.get("k", 3)))
        if not hits:
            return "no passages found"
        return "\n".join(
            f"[{h.get('id', i + 1)}] ({h.get('source', '?')}) {h['text']}" for i, h in enumerate(hits)
        )

    return run


def make_tools(
    names: list[str] | tuple[str, ...] = DEFAULT_TOOLS,
    *,
    workspace: str | Path | None = None,
    retriever: Retriever | None = None,
    python_limits: Limits | None = None,
    timeout_s: float = 10.0,
) -> list[Tool]:
    """The named tools, ready to call. ``read_file`` needs ``workspace``; ``rag_search`` needs ``retriever``."""
    unknown = [n for n in names if n not in TOOL_NAMES]
    if unknown:
        raise LLMLabError(f"unknown tool {unknown[0]!r} in --tools (known: {', '.join(TOOL_NAMES)})")
    limits = python_limits or Limits(cpu_seconds=5, wall_seconds=timeout_s, memory_bytes=512 << 20)
    tools: list[Tool] = []
    for name in names:
        if name == "calculator":
            tools.append(
                Tool(
                    "calculator",
                    "Evaluate an arithmetic expression, e.g. '(37*24-158)/2'. Supports + - * / // % ** and "
                    "sqrt, log, exp, round, abs, min, max.",
                    {
                        "type": "object",
                        "properties": {"expression": {"type": "string", "maxLength": MAX_EXPRESSION}},
                        "required": ["expression"],
                        "additionalProperties": False,
                    },
                    lambda a: calculate(a["expression"]),
                    timeout_s,
                )
            )
        elif name == "unit_convert":
            unit = {"type": "string", "enum": list(UNITS)}
            tools.append(
                Tool(
                    "unit_convert",
                    "Convert a value between units of length, mass, time, volume or temperature.",
                    {
                        "type": "object",
                        "properties": {"value": {"type": "number"}, "from_unit": unit, "to_unit": unit},
                        "required": ["value", "from_unit", "to_unit"],
                        "additionalProperties": False,
                    },
                    lambda a: format_number(convert(float(a["value"]), a["from_unit"], a["to_unit"])),
                    timeout_s,
                )
            )
        elif name == "python":
            tools.append(
                Tool(
                    "python",
                    "Run a Python program in a sandbox (no network, no files outside its own dir) and return "
                    "what it prints. Use print() for the result.",
                    {
                        "type": "object",
                        "properties": {"code": {"type": "string", "maxLength": 4000}},
                        "required": ["code"],
                        "additionalProperties": False,
                    },
                    _python_tool(limits),
                    limits.wall_seconds,
                    own_timeout=True,
                )
            )
        elif name == "read_file":
            if workspace is None:
                raise LLMLabError("tool read_file needs a workspace directory (--workspace DIR)")
            root = Path(workspace)
            if not root.is_dir():
                raise LLMLabError(f"workspace {str(root)!r} is not a directory")
            tools.append(
                Tool(
                    "read_file",
                    "Read a text file of the workspace by its relative path.",
                    {
                        "type": "object",
                        "properties": {"path": {"type": "string", "maxLength": 300}},
                        "required": ["path"],
                        "additionalProperties": False,
                    },
                    lambda a, root=root: read_workspace_file(root, a["path"]),
                    timeout_s,
                )
            )
        elif name == "rag_search":
            if retriever is None:
                raise LLMLabError(
                    "tool rag_search needs an index (--index INDEX, built by `llmlab rag index`)"
                )
            tools.append(
                Tool(
                    "rag_search",
                    "Search the document index; returns the best passages with their sources.",
                    {
                        "type": "object",
                        "properties": {
                            "query": {"type": "string", "maxLength": 300},
                            "k": {"type": "integer", "minimum": 1, "maximum": 10},
                        },
                        "required": ["query"],
                        "additionalProperties": False,
                    },
                    _rag_tool(retriever),
                    timeout_s,
                )
            )
    return tools
