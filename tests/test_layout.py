"""The core never names a model family: everything family-specific lives in ``mtp_recipes/families/``."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtp_recipes"
FAMILY_WORDS = re.compile(r"nemotron|deepseek|step3p[57]|minimax|mamba", re.IGNORECASE)


def docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def names_in(tree: ast.AST) -> list[tuple[int, str]]:
    """Identifiers, imported modules and string values (docstrings and comments are prose, not code)."""
    skip = docstring_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((node.lineno, node.name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [getattr(node, "module", None) or "", *(alias.name for alias in node.names)]
            out.append((node.lineno, " ".join(modules)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            out.append((node.lineno, node.value))
    return out


def test_no_family_named_outside_families():
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {text[:60]!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if "families" not in path.relative_to(PACKAGE).parts
        for line, text in names_in(ast.parse(path.read_text()))
        if FAMILY_WORDS.search(text)
    ]
    assert found == []


def test_the_scan_would_find_a_family_name():
    tree = ast.parse('from mtp_recipes.families.nemotron_h import x\nmode = "deepseek"\n')
    assert [text for _, text in names_in(tree) if FAMILY_WORDS.search(text)] == [
        "mtp_recipes.families.nemotron_h x",
        "deepseek",
    ]
