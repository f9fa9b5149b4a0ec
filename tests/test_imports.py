"""The import graph: no cycles and no module importing a layer above its own
(leaves <- models <- config <- checkpoint <- runtime <- data <- inference <- weights <- engine <- use
<- analysis <- cli), with no exception list.

The graph is the one that runs: every import counts, at module level or inside a function (a cycle
hidden behind a function-local import is still a cycle, it only fails later), and importing
``a.b.c`` also runs the package ``a.b``'s ``__init__`` (``from resnetlab.engine import checkpoint``
runs ``engine/__init__``, which imports ``fit``). ``if TYPE_CHECKING:`` blocks do not run and do
not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "resnetlab"
# Lowest first. "use" is everything at the top of the package that is not listed elsewhere.
LAYERS = ["leaf", "models", "config", "checkpoint", "runtime", "data", "inference", "weights", "engine", "use",
          "analysis", "cli"]
# Modules whose layer is not their folder's: opening a trained network (inference, its calibration
# temperature, the output-file rules) sits below model.init_from, which training starts from
# (weights' package, init_from and the zoo it names); publishing and building weights use runs.
PLACES = {"resnetlab.inference": "inference", "resnetlab.calibration": "inference", "resnetlab.outputs": "runtime",
          "resnetlab.weights": "weights", "resnetlab.weights.init_from": "weights", "resnetlab.weights.zoo": "weights"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


def _leaves(edges: dict[str, set[str]], packages: set[str]) -> set[str]:
    """Modules that import nothing of the package (``version``, ``exit_codes``, the data-source
    registry), and package ``__init__``s that import only such modules (a lazy ``__init__``).
    Importing one runs nothing of any layer, so any layer may import it."""
    leaves = {m for m, targets in edges.items() if not targets}
    while True:
        more = {m for m in packages - leaves if edges[m] <= leaves}
        if not more:
            return leaves
        leaves |= more


def _layer(module: str, leaves: set[str]) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: its __init__ re-exports from every layer
        return LAYERS.index("cli")
    if module in leaves:
        return LAYERS.index("leaf")
    if module in PLACES:
        return LAYERS.index(PLACES[module])
    top = parts[1]
    if top == "weights":  # publish, build: they use trained runs
        return LAYERS.index("use")
    if top in LAYERS:
        return LAYERS.index(top)
    if top == "__main__":
        return LAYERS.index("cli")
    return LAYERS.index("use")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules that importing ``module`` (and calling its functions) runs."""
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    skip = _type_checking_nodes(tree)
    named: set[str] = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - n.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in n.names:
                sub = f"{base}.{alias.name}"
                named.add(sub if sub in mods else base)
        elif isinstance(n, ast.Import):
            named.update(a.name for a in n.names)
    found = set()
    for target in named & set(mods):
        parts = target.split(".")
        # the packages on the way run their __init__ first, unless `module` lives inside them
        # (then they are already running: importing a sibling is not a cycle through them)
        for i in range(2, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in mods and mod != module and not module.startswith(mod + "."):
                found.add(mod)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, f, mods) for m, f in mods.items()}


def _cycles(edges: dict[str, set[str]]) -> list[str]:
    cycles = set()

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt in path:
                cycles.add(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in done:
                visit(nxt, [*path, nxt], done)
        done.add(node)

    done: set[str] = set()
    for m in sorted(edges):
        visit(m, [m], done)
    return sorted(cycles)


def test_no_import_cycles_even_behind_function_local_imports() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(cycles)


def test_no_upward_imports() -> None:
    edges = _graph()
    leaves = _leaves(edges, {m for m, f in _modules().items() if f.name == "__init__.py"})
    upward = sorted(f"{m} imports {t}" for m, targets in edges.items() for t in targets
                    if t != "resnetlab" and _layer(t, leaves) > _layer(m, leaves))
    assert not upward, "\n".join(upward)


def test_the_checker_sees_package_inits_and_function_local_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "resnetlab"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("from resnetlab.engine.fit import fit\n")
    (pkg / "engine" / "fit.py").write_text("from resnetlab import weights\n")
    (pkg / "engine" / "checkpoint.py").write_text("")
    (pkg / "weights.py").write_text("def f():\n    from resnetlab.engine import checkpoint\n")
    mods = {}
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(tmp_path).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    edges = {m: _imports(m, f, mods) for m, f in mods.items()}
    assert "resnetlab.engine" in edges["resnetlab.weights"]  # the package __init__ that runs
    assert _cycles(edges)  # weights -> engine/__init__ -> fit -> weights, behind a local import
    packages = {m for m, f in mods.items() if f.name == "__init__.py"}
    assert _leaves(edges, packages) == {"resnetlab", "resnetlab.engine.checkpoint"}  # import nothing


def test_one_module_writes_tensorboard_event_files() -> None:
    """TensorBoard events have one owner, engine.runlog (RunLog): no other module opens a writer
    or adds scalars, so the tags and the step axis cannot drift apart between two writers."""
    writers = []
    for name, path in _modules().items():
        text = path.read_text()
        if not any(word in text for word in ("SummaryWriter", "add_scalar", "FileWriter")):
            continue  # parse only the files that could hold a writer (parsing all takes seconds)
        for node in ast.walk(ast.parse(text)):
            called = node.func if isinstance(node, ast.Call) else None
            shown = (called.attr if isinstance(called, ast.Attribute)
                     else called.id if isinstance(called, ast.Name) else None)
            if shown in ("SummaryWriter", "add_scalar", "add_scalars", "FileWriter"):
                writers.append(name)
    assert writers and set(writers) == {"resnetlab.engine.runlog"}, writers
