"""Imports flow one way: no cycle among the top-level modules, and no project import hidden inside a function
(which is how a cycle hides). Reads the code with ast; imports nothing of the project."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# "file:module" pairs allowed to import a project module inside a function (none today; add one only for a heavy
# optional dependency, and say which in a comment at the import)
ALLOWED_LAZY: set[str] = set()
# the layers: a module may import only modules before it in this list (the README's file table shows the imports)
ORDER = ["common", "ranks", "data", "world", "tokenizer", "model", "checkpoint", "draw", "metrics", "train",
         "train_dynamics", "train_world", "train_tokenizer", "foundation", "bootstrap", "arms", "search", "eval",
         "runner", "report", "experiments", "reproduce", "bench", "rehearse"]


def project_imports() -> tuple[dict[str, set[str]], list[str]]:
    """({module: project modules it imports}, ["file.py:line imports module inside a function", ...])."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    edges, lazy = {m: set() for m in mods}, []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            for n in names:
                if n in mods and n != m:
                    edges[m].add(n)
                    if id(node) not in top and f"{p.name}:{n}" not in ALLOWED_LAZY:
                        lazy.append(f"{p.name}:{node.lineno} imports {n} inside a function")
    return edges, lazy


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    edges, _ = project_imports()
    assert "train" in edges and "common" in edges  # the modules were found
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_project_import_inside_a_function():
    _, lazy = project_imports()
    assert not lazy, "\n".join(lazy)


def test_imports_follow_the_readme_layers():
    edges, _ = project_imports()
    assert not (new := sorted(set(edges) - set(ORDER))), f"add {new} to ORDER"
    upward = [f"{m} imports {n}" for m in ORDER for n in sorted(edges.get(m, ())) if ORDER.index(n) > ORDER.index(m)]
    assert not upward, "imports against the layers: " + "; ".join(upward)


def test_reproduce_reads_as_one_pipeline():
    """reproduce.py is the paper's pipeline in order (STYLE.md: like nanochat's speedrun.sh); the stages beside it live
    in experiments.py and the machinery in runner.py, so it stays at most 700 lines."""
    n = (ROOT / "reproduce.py").read_text().count("\n")
    assert n <= 700, f"reproduce.py has {n} lines (at most 700: move harness groups to experiments.py or runner.py)"
