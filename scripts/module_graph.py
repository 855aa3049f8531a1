"""Print the package's module graph as docs/architecture.md shows it: every module of ``mtp_recipes`` with the
package modules it imports (any import statement, function-level and TYPE_CHECKING ones included), in layers
where each module imports only modules of lower layers.

    python scripts/module_graph.py            # the block docs/architecture.md holds (a test compares them)
    python scripts/module_graph.py --write    # rewrite that block in docs/architecture.md
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtp_recipes"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every package module ``path`` imports, resolved to the most specific module that exists."""
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
    return {m for m in found if m in MODULES and m != here}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layers(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 for one importing no package module, else one above its highest import."""
    layer: dict[str, int] = {}

    def of(module: str, seen: tuple[str, ...] = ()) -> int:
        if module in seen:
            raise ValueError(f"import cycle: {' -> '.join((*seen, module))}")
        if module not in layer:
            layer[module] = 1 + max((of(m, (*seen, module)) for m in edges[module]), default=-1)
        return layer[module]

    for module in edges:
        of(module)
    return layer


def render() -> str:
    edges = graph()
    layer = layers(edges)
    short = lambda m: m.removeprefix("mtp_recipes.") or "mtp_recipes"  # noqa: E731
    lines = []
    for level in range(max(layer.values()) + 1):
        lines.append(f"layer {level}")
        for module in sorted(m for m in edges if layer[m] == level):
            imports = ", ".join(sorted(short(m) for m in edges[module]))
            lines.append(f"  {short(module)}" + (f" <- {imports}" if imports else ""))
    return "\n".join(lines) + "\n"


def write_doc(doc: Path = PACKAGE.parent / "docs" / "architecture.md") -> None:
    """Replace the module-graph block of ``doc`` with :func:`render`'s output."""
    begin, end = "<!-- module graph: python scripts/module_graph.py -->\n```\n", "```\n<!-- end of module graph -->"
    text = doc.read_text()
    head, rest = text.split(begin, 1)
    doc.write_text(head + begin + render() + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv[1:]:
        write_doc()
    else:
        print(render(), end="")
