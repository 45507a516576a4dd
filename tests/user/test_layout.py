"""The floor plan a newcomer relies on: every fastprefix import at module level (so `lint-imports` and a reader
see every arrow), no private name taken from another module, and test modules that import helpers, never each
other. The layer contract itself is `.importlinter`, checked by `make lint` (part of `make test`)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = [p for folder in ("fastprefix", "kernels", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]


def _name(path):
    return str(path.relative_to(ROOT))


def _is_fastprefix(node):
    """An import of a fastprefix module: relative, or absolute under ``fastprefix``."""
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "fastprefix"
    return any(alias.name.split(".")[0] == "fastprefix" for alias in node.names)


def _function_level_imports(tree):
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)) and _is_fastprefix(n)]
    return found


@pytest.mark.parametrize("path", PACKAGE, ids=_name)
def test_no_function_level_import_of_a_fastprefix_module(path):
    tree = ast.parse(path.read_text())
    bad = [f"line {n.lineno}: {ast.unparse(n)}" for n in _function_level_imports(tree)]
    assert not bad, f"{_name(path)} imports fastprefix modules inside functions: {bad}"


@pytest.mark.parametrize("path", [p for p in PACKAGE if not p.parts[-2] == "benchmarks"], ids=_name)
def test_no_private_name_taken_from_another_module(path):
    """``from .x import _private`` and ``module._private`` across modules: a name another module uses is public."""
    tree = ast.parse(path.read_text())
    # (``from . import _validate``: a package-private module, not a private name of another module)
    bad = [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
           and _is_fastprefix(n) and n.module is not None
           and any(a.name.startswith("_") and not a.name.startswith("__") for a in n.names)]
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and _is_fastprefix(n)
               for a in n.names}
    bad += [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in modules and n.attr.startswith("_")
            and not n.attr.startswith("__")]
    assert not bad, f"{_name(path)} uses another module's private names: {bad}"


def test_no_test_module_imports_another():
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    names = {p.stem for p in tests}
    bad = []
    for path in tests:
        for n in ast.walk(ast.parse(path.read_text())):
            mods = [n.module] if isinstance(n, ast.ImportFrom) and n.module else \
                [a.name for a in n.names] if isinstance(n, ast.Import) else []
            bad += [f"{_name(path)}: {m}" for m in mods if m.split(".")[0] in names]
    assert not bad, f"test modules import each other (move what they share into tests/helpers): {bad}"
