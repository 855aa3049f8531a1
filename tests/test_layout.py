"""The package's layout rules: the core never names a model family, the import rules hold (no cycle, checkpoint
I/O and families below the model, commands apart, transformers through its public API or hf_compat), and the
architecture doc draws the module graph as it is."""

import ast
import importlib.util
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


# ---- the import rules ------------------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every mtp_recipes module ``path`` imports, anywhere in it (function level and TYPE_CHECKING blocks too),
    each resolved to the most specific module that exists (``from pkg import mod`` names ``pkg.mod``)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES}


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}
COMMANDS = {f"mtp_recipes.{c}" for c in ("finetune", "evaluate", "plan", "report", "regenerate", "plot", "check")}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_cycle():
    """Not even through TYPE_CHECKING-only or function-level imports."""
    cycles = sorted(m for m in GRAPH if m in reachable(m))
    assert cycles == []


def test_checkpoint_and_families_import_neither_the_model_nor_lora():
    for module in GRAPH:
        if module.startswith(("mtp_recipes.checkpoint", "mtp_recipes.families")):
            assert not reachable(module) & {"mtp_recipes.model", "mtp_recipes.lora"}, module


def test_the_trainer_imports_no_command_and_commands_import_no_other_command():
    trainer = ["mtp_recipes.recipe", *(m for m in GRAPH if m.startswith("mtp_recipes.train."))]
    for module in trainer:
        assert not reachable(module) & COMMANDS, module
    for command in COMMANDS:
        assert not GRAPH[command] & COMMANDS, command  # the configs' location comes from mtp_recipes.config


def test_the_import_graph_is_read_whole():
    """The scan sees function-level, TYPE_CHECKING and relative imports (the rules above would miss them)."""
    assert "mtp_recipes.model" in GRAPH["mtp_recipes.evaluate"] or "mtp_recipes.config" in GRAPH["mtp_recipes.evaluate"]
    assert "mtp_recipes.data.packing" in GRAPH["mtp_recipes.data.build"]  # a relative import
    assert "mtp_recipes.lora" in GRAPH["mtp_recipes.config"]  # a function-level import


# transformers: its public top-level names anywhere; the modeling (and configuration) module of a model only in the
# family that wraps it; anything else only in hf_compat.py, one function each.
def transformers_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "transformers"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
            found += [(node.lineno, f"{node.module}:{a.name}") for a in node.names]
    return found


def allowed_transformers_import(name: str, in_families: bool) -> bool:
    import transformers

    module, _, item = name.partition(":")
    if module == "transformers":
        return bool(item) and not item.startswith("_") and hasattr(transformers, item)
    parts = module.split(".")
    if in_families and parts[:2] == ["transformers", "models"] and len(parts) in (3, 4):
        model = parts[2]
        leaf = parts[3] if len(parts) == 4 else item
        return leaf in (f"modeling_{model}", f"configuration_{model}") or (len(parts) == 3 and item[:1].isupper())
    return False


def test_transformers_is_reached_through_its_public_api_or_hf_compat():
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "hf_compat.py"
        for line, name in transformers_imports(path)
        if not allowed_transformers_import(name, "families" in path.relative_to(PACKAGE).parts)
    ]
    assert found == []


def test_the_transformers_guard_would_catch_an_internal():
    assert allowed_transformers_import("transformers:PretrainedConfig", False)
    assert not allowed_transformers_import("transformers.masking_utils:create_causal_mask", True)
    assert not allowed_transformers_import("transformers:_something", False)
    assert allowed_transformers_import("transformers.models.deepseek_v3:modeling_deepseek_v3", True)
    assert not allowed_transformers_import("transformers.models.deepseek_v3:modeling_deepseek_v3", False)
    assert allowed_transformers_import("transformers.models.nemotron_h.modeling_nemotron_h:NemotronHMamba2Mixer", True)
    assert not allowed_transformers_import("transformers.models.deepseek_v3.tokenization_deepseek:X", True)


def test_the_architecture_doc_draws_the_module_graph_as_it_is():
    spec = importlib.util.spec_from_file_location("module_graph", PACKAGE.parent / "scripts" / "module_graph.py")
    module_graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module_graph)
    assert module_graph.graph() == {m: imports - {m} for m, imports in GRAPH.items()}  # the same reading
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    block = doc.split("<!-- module graph: python scripts/module_graph.py -->\n```\n", 1)[1].split("```", 1)[0]
    assert block == module_graph.render(), "run python scripts/module_graph.py and paste its output"


def test_no_function_is_over_60_lines_unless_its_docstring_says_why():
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 60
        and "Longer than 60 lines" not in (ast.get_docstring(node) or "")
    ]
    assert long == []


def test_the_recipe_stays_short():
    assert len((PACKAGE / "recipe.py").read_text().splitlines()) < 300
