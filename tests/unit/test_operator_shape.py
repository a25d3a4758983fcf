"""The operator's code stays in reviewable pieces (issue 20): no function over 80 lines, no
module of 600 lines or more, counted by the standard library's ``ast`` on the source files."""

from __future__ import annotations

import ast
from pathlib import Path

OPERATOR = Path(__file__).resolve().parents[2] / "operator" / "qlora_operator"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def modules() -> list[Path]:
    found = sorted(OPERATOR.rglob("*.py"))
    assert len(found) > 10, f"no operator modules under {OPERATOR}"
    return found


def test_no_operator_function_is_longer_than_80_lines():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(OPERATOR)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_operator_modules_stay_under_600_lines():
    big = {
        str(path.relative_to(OPERATOR)): len(path.read_text().splitlines())
        for path in modules()
        if len(path.read_text().splitlines()) >= MAX_MODULE_LINES
    }
    assert not big, big
