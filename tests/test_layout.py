"""The layout ARCHITECTURE.md describes, checked on the source: evaluations/ imports nothing of the
library, adm_common/ imports neither package, and no chain of imports between modules closes a circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("guided_diffusion", "evaluations", "adm_common")


def modules():
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known) -> set[str]:
    """The package modules ``path`` imports, wherever in the file (function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def test_evaluations_and_adm_common_stand_alone():
    known = modules()
    for name, path in known.items():
        used = imports(path, known)
        if name.startswith("evaluations"):
            assert not [u for u in used if u.startswith("guided_diffusion")], name
        if name.startswith("adm_common"):
            assert not [u for u in used if not u.startswith("adm_common")], name


def test_no_import_circle_between_modules():
    known = modules()
    graph = {name: {u for u in imports(path, known) if u != name and u not in PACKAGES} for name, path in known.items()}
    state, stack = {}, []

    def visit(node):  # depth-first; a grey node met again closes a circle
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "grey":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "black"

    for node in sorted(graph):
        if node not in state:
            visit(node)
