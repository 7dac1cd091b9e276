"""The package's shape, held: every module small enough to read in one sitting and saying what it is for, every
package saying what belongs in it. The import layers themselves are `make lint`'s (import-linter, the
contracts in pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zero2merged"
MODULES = sorted(PACKAGE.rglob("*.py"))
# The bound of issue 22: a module past it has grown a second job; split it by job, not by line count.
MAX_LINES = 400


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_fits_the_bound_and_names_its_job(module):
    lines = module.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"{module.name}: {len(lines)} lines (bound {MAX_LINES}): split it by job"
    if module.name != "__main__.py":
        assert ast.get_docstring(ast.parse(module.read_text())), f"{module}: no docstring saying what it is for"


def test_tests_mirror_the_package():
    """A module's tests are found under the name of its package: tests/<package>/ for each package."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    tests = {p.parent.name for p in PACKAGE.parent.glob("tests/*/__init__.py")}
    assert packages <= tests, f"packages without a tests/ folder: {sorted(packages - tests)}"


# Imported inside a function on purpose: the command line's, so that --help does not wait for torch.
LAZY_FOR_START_UP = ("cli.py", "__init__.py")


@pytest.mark.parametrize(
    "module", [m for m in MODULES if m.name not in LAZY_FOR_START_UP], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_module_imports_its_own_package_inside_a_function(module):
    """An import of zero2merged inside a function hides a loop from Python, not from the reader (issue 22)."""
    hidden = [
        f"line {node.lineno}: {node.module or ''}"
        for function in ast.walk(ast.parse(module.read_text()))
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "zero2merged"
    ]
    assert not hidden, f"{module.name} imports its own package inside a function: {hidden}"
