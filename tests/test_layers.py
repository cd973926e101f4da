"""The package's layers (README "Layout"): no import cycle, every internal import at module top
level, and each layer imports only the layers below it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# layer -> the layers (and first-party packages) it may import; errors is importable by all
ALLOWED = {
    "rsmbench.errors": set(),
    "rsmbench.core": {"rsmbench.core", "methods"},  # the registry discovers methods/ (plugins)
    "rsmbench.data": {"rsmbench.core", "rsmbench.data"},
    "rsmbench.run": {"rsmbench.core", "rsmbench.data", "rsmbench.run", "rewards", "methods"},
    # the estimator study is a study of the gmm task: it reads the task file through run.tasks
    "rsmbench.harness": {"rsmbench.core", "rsmbench.data", "rsmbench.harness", "rsmbench.run.tasks"},
    "rsmbench.analysis": {"rsmbench.core", "rsmbench.data", "rsmbench.run", "rsmbench.harness",
                          "rsmbench.analysis"},
    "rsmbench.cli": {"rsmbench"},
    "rsmbench.commands": {"rsmbench"},  # commands compose the layers (plan, run, analyse)
    "rsmbench.__main__": {"rsmbench.cli"},  # `python -m rsmbench`
    "rsmbench": set(),  # the package's own __init__
    "methods": {"rsmbench.core", "rsmbench.data", "methods"},
    "rewards": {"rsmbench.core", "rsmbench.data", "rewards"},
}


def _modules():
    mods = {}
    for pkg in ("rsmbench", "methods", "rewards"):
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = p
    return mods


def _imports(path: Path, mods):
    """[(module-level?, line, imported first-party module)]"""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import submodule` imports the submodule
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in mods] or [node.module]
        else:
            continue
        out += [(id(node) in top, node.lineno, n) for n in names if n in mods]
    return out


def _layer(name: str) -> str:
    return max((k for k in ALLOWED if name == k or name.startswith(k + ".")), key=len)


def test_no_cycle_and_no_import_inside_a_function():
    mods = _modules()
    graph = {m: set() for m in mods}
    lazy = []
    for m, p in mods.items():
        for at_top, line, target in _imports(p, mods):
            if not at_top:
                lazy.append(f"{m}:{line} imports {target}")
            elif target != m:
                graph[m].add(target)
    assert not lazy, "internal imports inside functions: " + "; ".join(lazy)
    state = {}

    def visit(v, stack):
        state[v] = 1
        for w in graph[v]:
            if state.get(w) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(w):] + [w]))
            if w not in state:
                visit(w, stack + [w])
        state[v] = 2

    for v in graph:
        if v not in state:
            visit(v, [v])


def test_each_layer_imports_only_the_layers_below():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        allowed = ALLOWED[_layer(m)]
        for _, line, target in _imports(p, mods):
            if target.startswith("rsmbench.errors") or target == "rsmbench":
                continue
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{m}:{line} imports {target}")
    assert not bad, "; ".join(bad)
