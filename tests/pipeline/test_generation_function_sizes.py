"""The generation package stays readable: no function longer than 60 lines, and the pipeline's `__call__` a thin
wrapper that builds the request (under 30 lines, its docstring and signature included)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ldm" / "generation"
MAX_LINES = 60
MAX_CALL_LINES = 29


def function_lengths() -> dict[str, int]:
    """'file:function' -> lines from its `def` (or first decorator) to its last line, for every function."""
    lengths = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - first + 1
    return lengths


def test_no_function_of_the_generation_package_is_longer_than_60_lines():
    lengths = function_lengths()
    assert len(lengths) > 50  # the scan sees the package
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_the_pipeline_call_is_a_thin_wrapper():
    assert function_lengths()["pipeline.py:__call__"] <= MAX_CALL_LINES
