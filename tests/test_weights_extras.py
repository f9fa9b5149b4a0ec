"""Installing as a user: every import a command needs is covered by the core dependencies plus
the extra README.md names for that command (its "Install with pip" table), and every extra the
table names exists in pyproject.toml and is shown in a `pip install` line.

The imports are found statically: from the command's ``run_<name>`` function, every resnetlab
module it imports (at any depth, inside functions too) is followed; third-party top-level
imports are collected, except those guarded by ``except ImportError`` (optional features that
say how to enable themselves) and ``if TYPE_CHECKING:`` blocks. Import names are mapped to their
distributions with ``importlib.metadata.packages_distributions()``; a distribution counts as
covered when the extra (or the core) installs it, directly or as a dependency of one it names.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from resnetlab.cli import COMMANDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the tomli package (a dev dependency there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0])


def _dependencies() -> tuple[set[str], dict[str, set[str]]]:
    """Core distribution names and, per extra, the names it installs (self-references resolved)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    raw = project["optional-dependencies"]

    def expand(extra: str) -> set[str]:
        out = set()
        for req in raw[extra]:
            m = re.match(r"resnetlab\[([\w,]+)\]", req.replace(" ", ""))
            if m:
                for inner in m.group(1).split(","):
                    out |= expand(inner)
            else:
                out.add(_requirement_name(req))
        return out

    return core, {extra: expand(extra) for extra in raw}


def _readme_extras() -> dict[str, str]:
    """``command -> extra`` from the README's table of rows ``| `resnetlab CMD ...` | `[extra]` |``."""
    rows = re.findall(r"^\|\s*`resnetlab (\w+)[^`]*`\s*\|\s*`\[(\w+)\]`", (ROOT / "README.md").read_text(), re.M)
    return dict(rows)


def _module_file(module: str) -> Path | None:
    base = SRC / Path(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``try: ... except ImportError`` or ``if TYPE_CHECKING:``."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                or isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") == "ImportError" for e in h.type.elts)
                for h in parent.handlers):
            return True
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        node = parent
    return False


def _imports(tree: ast.AST, package: str) -> set[str]:
    """Dotted names of everything ``tree`` imports, guarded imports left out."""
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    found = set()
    for node in ast.walk(tree):
        if _guarded(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


@functools.cache
def _parsed(file: Path) -> ast.Module:
    return ast.parse(file.read_text())


def _function_node(tree: ast.Module, name: str) -> ast.AST | None:
    """The module-level function or class ``name``, or the method ``Class.method``."""
    body: list[ast.stmt] = tree.body
    node: ast.AST | None = None
    for part in name.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        body = node.body  # type: ignore[attr-defined]
    return node


def _module_names(tree: ast.Module) -> set[str]:
    """Names of the module's own functions and classes."""
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _targets(node: ast.AST, package: str, module: str, top_only: bool) -> tuple[set[str], set[tuple[str, str | None]]]:
    """(third-party top-level modules, resnetlab (module, function-or-None) items) that ``node``
    imports; with ``top_only`` function and class bodies are skipped."""
    if top_only:
        body = [n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]  # type: ignore[attr-defined]
        node = ast.Module(body=body, type_ignores=[])
    outside: set[str] = set()
    items: set[tuple[str, str | None]] = set()
    for name in _imports(node, package):
        top = name.split(".")[0]
        if top != "resnetlab":
            if top not in sys.stdlib_module_names and top != "__future__":
                outside.add(top)
        elif _module_file(name) is not None:
            items.add((name, None))
        elif _module_file(name.rsplit(".", 1)[0]) is not None:  # `from resnetlab.x import f`
            items.add((name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]))
    # functions and classes of the same module a function names run with it (a module's own
    # top level, tables of commands say, only defines them)
    if not top_only:
        tree = _parsed(_module_file(module))  # type: ignore[arg-type]
        local = _module_names(tree)
        items |= {(module, n.id) for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in local}
    return outside, items


@functools.cache
def _visit(module: str, func: str | None) -> tuple[frozenset[str], frozenset[tuple[str, str | None]],
                                                 frozenset[str], frozenset[tuple[str, str]]]:
    """What reaching ``func`` of ``module`` (None: its top level) brings: third-party modules,
    resnetlab items, attribute names used, and the methods of a class (used on demand)."""
    file = _module_file(module)
    if file is None:
        return frozenset(), frozenset(), frozenset(), frozenset()
    package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = _parsed(file)
    node = tree if func is None else _function_node(tree, func)
    if node is None:  # a name the module re-exports or defines by assignment: its top level
        node, func = tree, None
    methods: set[tuple[str, str]] = set()
    if isinstance(node, ast.ClassDef):  # its bases and class attributes now, methods on use
        methods = {(module, f"{func}.{m.name}") for m in node.body
                   if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
        node = ast.Module(body=[m for m in node.body if not isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))],
                          type_ignores=[])
    found, items = _targets(node, package, module, top_only=func is None)
    items.add((module, None))
    attrs = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    if func is not None:  # module-level tables (REPRODUCE = {...}) of functions a function names
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        local = _module_names(tree)
        for stmt in tree.body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and any(
                    isinstance(t, ast.Name) and t.id in names
                    for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])):
                items |= {(module, n.id) for n in ast.walk(stmt) if isinstance(n, ast.Name) and n.id in local}
    return frozenset(found), frozenset(items), frozenset(attrs), frozenset(methods)


def third_party_imports(command: str) -> set[str]:
    """Top-level third-party modules ``resnetlab COMMAND`` may import: module-level imports of
    every resnetlab module reached, and the imports inside the functions it can reach (the
    command's own, then those it imports by name and what they name in their module). A class
    reached brings its methods whose names the reached code uses as attributes (``.predict_batch``)
    or that Python calls itself (dunders), not the others (a backend's ``explain`` stays out of
    ``predict``)."""
    run = COMMANDS[command][1]
    todo: set[tuple[str, str | None]] = {(run.__module__, run.__name__)}
    seen: set[tuple[str, str | None]] = set()
    outside: set[str] = set()
    attrs: set[str] = set()
    methods: set[tuple[str, str]] = set()
    while todo:
        while todo:
            item = todo.pop()
            if item in seen:
                continue
            seen.add(item)
            found, items, used, more = _visit(*item)
            outside |= found
            todo |= items - seen
            attrs |= used
            methods |= more
        todo = {(m, f) for m, f in methods if (m, f) not in seen
                and (f.rsplit(".", 1)[1] in attrs or f.rsplit(".", 1)[1].startswith("__"))}
    return outside


@functools.cache
def _installed_closure(dist: str) -> frozenset[str]:
    """``dist`` and what it requires (installed, without its own extras), transitively: an
    extra that installs uvicorn also installs h11."""
    from importlib.metadata import PackageNotFoundError, requires

    out, todo = set(), [_norm(dist)]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in reqs if "extra ==" not in r]
    return frozenset(out)


def test_every_command_import_is_covered_by_its_readme_extra() -> None:
    core, extras = _dependencies()
    named = _readme_extras()
    assert named, "README.md has no `| `resnetlab CMD` | `[extra]` |` table"
    dists = {k: {_norm(d) for d in v} for k, v in packages_distributions().items()}
    problems = []
    for command in COMMANDS:
        allowed = set().union(*(_installed_closure(d) for d in core | extras.get(named.get(command, ""), set())))
        for module in sorted(third_party_imports(command)):
            providers = dists.get(module, {_norm(module)})
            if not providers & allowed:
                where = f"the [{named[command]}] extra" if command in named else "the core dependencies"
                problems.append(f"resnetlab {command} imports {module} ({', '.join(sorted(providers))}), "
                                f"not in {where}")
    assert not problems, "\n".join(problems)


def test_readme_extras_exist_and_are_shown() -> None:
    _, extras = _dependencies()
    readme = (ROOT / "README.md").read_text()
    for command, extra in _readme_extras().items():
        assert command in COMMANDS, f"README names an extra for an unknown command {command!r}"
        assert extra in extras, f"README names [{extra}] for {command}; pyproject has no such extra"
        assert f"resnetlab[{extra}]" in readme, f"no `pip install 'resnetlab[{extra}]'` in README.md"
    # the dev extra installs every extra the tests exercise
    assert extras["export"] | extras["serve"] | extras["tensorboard"] <= extras["dev"]


def test_serve_and_explain_need_their_extra() -> None:
    """The check has teeth: the serving stack is outside the core dependencies."""
    core, extras = _dependencies()
    assert "starlette" in third_party_imports("serve") and "captum" in third_party_imports("explain")
    assert not {"starlette", "uvicorn", "captum", "python-multipart"} & core
    assert {"starlette", "uvicorn", "captum"} <= extras["serve"]


def test_without_tensorboard_a_run_says_so_once(tmp_path: Path, monkeypatch, caplog) -> None:
    import logging

    from resnetlab.config import Config
    from resnetlab.engine.dist import DistInfo
    from resnetlab.engine.runlog import open_tensorboard

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with caplog.at_level(logging.INFO, logger="resnetlab"):
        assert open_tensorboard(Config(), tmp_path, DistInfo()) is None
    said = [r.getMessage() for r in caplog.records if "TensorBoard logging is off" in r.getMessage()]
    assert len(said) == 1 and "pip install 'resnetlab[tensorboard]'" in said[0]
    assert not (tmp_path / "tb").exists()


def test_lesson_ships_and_copies(tmp_path: Path, capsys) -> None:
    from resnetlab.cli import main

    assert main(["lesson", str(tmp_path)]) == 0
    assert (tmp_path / "lesson.ipynb").read_bytes() == (ROOT / "docs" / "lesson.ipynb").read_bytes()
    assert main(["lesson", str(tmp_path)]) == 2  # never overwritten without --force
    assert "exists" in capsys.readouterr().err
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "notebooks/*.ipynb" in project["tool"]["setuptools"]["package-data"]["resnetlab"]


def test_lesson_copy_takes_a_data_source(tmp_path: Path, capsys) -> None:
    """`resnetlab lesson --data fashion_mnist` sets the copy's DATA default; nothing else changes."""
    import json

    from resnetlab.cli import main

    assert main(["lesson", str(tmp_path), "--data", "fashion_mnist"]) == 0
    copy = json.loads((tmp_path / "lesson.ipynb").read_text())
    shipped = json.loads((ROOT / "docs" / "lesson.ipynb").read_text())
    changed = [(a, b) for a, b in zip(shipped["cells"], copy["cells"], strict=True) if a != b]
    assert len(changed) == 1 and "parameters" in changed[0][1]["metadata"]["tags"]
    assert 'DATA = os.environ.get("RESNETLAB_LESSON_DATA", "fashion_mnist")' in "".join(changed[0][1]["source"])
    assert main(["lesson", str(tmp_path / "b"), "--data", "fashion"]) == 2
    err = capsys.readouterr().err
    assert "--data must be one of" in err and "'fashion'" in err and not (tmp_path / "b").exists()
