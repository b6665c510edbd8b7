"""The package's imports go one way: no cycles, no upward import, no private name imported across modules.

Every ``import`` in the package is read with ``ast`` (function-level ones included) and resolved to the diffrt
module it names. A lazy package ``__init__`` that loads modules by name (``diffrt.core.lazy.lazy_attributes`` or
``importlib.import_module``) counts as importing each module named, relative to it, in one of its strings
(``".onnx_export"``, ``"..artifacts"``); anywhere else a dynamic import is refused, since this test could not
see what it loads.

Layers are folders, lowest first (a module may import its own layer and the layers below):
  0 core       ``diffrt.core``, ``diffrt.samplers``: schedules, samplers, denoisers, tokenization, checks, helpers
  1 models     ``diffrt.models``: components, families, sources, adapters (LoRA, inversion), ControlNets
  2 libraries  ``diffrt.kernels``, ``diffrt.export``: Triton kernels and their patcher, ONNX / TensorRT export
  3 backends   ``diffrt.backends``: run the graphs; each builds what it needs from the libraries
  4 pipeline   ``diffrt.pipeline``: requests, the denoising loop, outputs
  5 assembly   ``diffrt`` (its ``__init__``) and ``diffrt.api``: ``diffrt.load``
  6 tools      ``diffrt.bench``, ``diffrt.train``, ``diffrt.serve``
  7 cli        ``diffrt.cli``: argument parsing only
A module's layer is that of the longest folder prefix above; a module in no folder of the table is a failure.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

FOLDERS = {
    "diffrt.core": "core", "diffrt.samplers": "core",
    "diffrt.models": "models",
    "diffrt.kernels": "libraries", "diffrt.export": "libraries",
    "diffrt.backends": "backends",
    "diffrt.pipeline": "pipeline",
    "diffrt": "assembly", "diffrt.api": "assembly",
    "diffrt.bench": "tools", "diffrt.train": "tools", "diffrt.serve": "tools",
    "diffrt.cli": "cli",
}  # fmt: skip
LAYER_NAMES = ("core", "models", "libraries", "backends", "pipeline", "assembly", "tools", "cli")


def package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a folder mapped to a subpackage wins)."""
    found: dict[str, Path] = {}
    dirs = package_dirs()
    for package, folder in sorted(dirs.items(), key=lambda item: item[0].count(".")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if any(name == other or name.startswith(other + ".") for other in dirs if other != package
                   and other.startswith(package + ".")):  # fmt: skip
                continue  # e.g. runtime/ holds no diffrt.kernels files, but be safe
            found[name] = path
    return found


def layer(module: str) -> int:
    """The layer of a module: that of the longest folder prefix in FOLDERS (``diffrt`` itself only for the
    package's ``__init__``: a module directly in ``runtime/`` other than ``api`` has no layer)."""
    prefixes = [p for p in FOLDERS if module == p or (p != "diffrt" and module.startswith(p + "."))]
    if not prefixes:
        raise AssertionError(f"{module} is in no layer folder: put it in one of {sorted(set(FOLDERS))}")
    return LAYER_NAMES.index(FOLDERS[max(prefixes, key=len)])


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


DYNAMIC_IMPORTS = ("import_module", "lazy_attributes")
LAZY_HELPER = "diffrt.core.lazy"  # the one module that imports by name, for the package __init__ files that call it


def _called(call: ast.Call) -> str | None:
    return getattr(call.func, "attr", None) or getattr(call.func, "id", None)


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported diffrt module, imported name or None, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target, None, node.lineno) if target in known else (base, alias.name, node.lineno))
        elif isinstance(node, ast.Call) and _called(node) in DYNAMIC_IMPORTS and module != LAZY_HELPER:
            if not is_package:
                raise AssertionError(f"{path}:{node.lineno}: dynamic import; use a static one")
            strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            targets = {_resolve(module, True, len(s) - len(s.lstrip(".")), s.lstrip(".")) for s in strings}
            found += [(t, None, node.lineno) for t in sorted(targets) if t in known]
    return [(target, name, line) for target, name, line in found if target == "diffrt" or
            target.startswith("diffrt.")]  # fmt: skip


def _owner(target: str, known: set[str]) -> str:
    """The module an imported dotted name lives in (``diffrt.x.y`` may be a name in module ``diffrt.x``)."""
    while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def problems() -> list[str]:
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = defaultdict(set)
    issues: list[str] = []
    for module, path in sorted(found.items()):
        for target, name, line in imports(module, path, known):
            target = _owner(target, known)
            where = f"{path.relative_to(ROOT)}:{line}"
            private = [part for part in target.split(".") if part.startswith("_") and not part.startswith("__")]
            if name and name.startswith("_") and not name.startswith("__"):
                private.append(name)
            if private and target != module:
                issues.append(f"{where}: {module} imports the private {'.'.join(private)} from {target}")
            if target == module:
                continue
            if layer(target) > layer(module):
                issues.append(f"{where}: {module} ({LAYER_NAMES[layer(module)]}) imports {target} "
                              f"({LAYER_NAMES[layer(target)]}), a layer above")  # fmt: skip
            graph[module].add(target)
    issues = list(dict.fromkeys(issues))  # one line per import statement
    for what, edges in (("modules", graph), ("packages", package_graph(graph))):
        for component in cycles(edges):
            example = " -> ".join(_cycle_through(component, edges))
            issues.append(f"import cycle among the {what} {', '.join(component)} (for example {example})")
    return issues


def package_of(module: str) -> str:
    """A subpackage's modules collapse to the subpackage (``diffrt.bench.fid`` -> ``diffrt.bench``)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Imports between subpackages and top-level modules: a cycle here is one between packages (train -> bench
    -> train), even when no single module closes it."""
    collapsed: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        collapsed[package_of(module)] |= {package_of(t) for t in targets} - {package_of(module)}
    return collapsed


def _is_ancestor_package(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each holds a cycle.

    A subpackage's module importing its package ``__init__`` (or the reverse) is left out: Python runs a
    package's ``__init__`` before any of its modules anyway, so such an edge adds no ordering of its own."""
    edges = {m: {t for t in ts if not (_is_ancestor_package(t, m) or _is_ancestor_package(m, t))}
             for m, ts in graph.items()}  # fmt: skip
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return result


def _cycle_through(component: list[str], graph) -> list[str]:
    """A concrete cycle inside a strongly connected component, for the message."""
    members = set(component)
    edges = {m: set(graph.get(m, ())) & members for m in members}
    start, path, seen = component[0], [component[0]], {component[0]}
    while True:
        nxt = sorted(w for w in edges[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return [*path, start]
        fresh = [w for w in nxt if w not in seen]
        if not fresh:
            i = path.index(nxt[0])
            return [*path[i:], nxt[0]]
        path.append(fresh[0])
        seen.add(fresh[0])


def test_imports_go_one_way_without_cycles_or_private_names():
    issues = problems()
    assert not issues, f"{len(issues)} import problem(s):\n" + "\n".join(issues)


def test_the_checker_sees_function_level_upward_imports_and_cycles(tmp_path):
    """The checker itself: a function-level upward import and a two-module cycle are both reported."""
    (tmp_path / "a.py").write_text("def f():\n    from diffrt.bench import harness\n")
    assert imports("diffrt.core.schedules", tmp_path / "a.py", {"diffrt.bench.harness"}) == [
        ("diffrt.bench.harness", None, 2)
    ]
    assert layer("diffrt.bench.harness") > layer("diffrt.core.schedules")
    lazy = tmp_path / "pkg" / "__init__.py"
    lazy.parent.mkdir()
    lazy.write_text("from ..lazy import lazy_attributes\n"
                    "__getattr__ = lazy_attributes(__name__, {'f': '..bench.fid'})\n")  # fmt: skip
    assert ("diffrt.bench.fid", None, 2) in imports("diffrt.samplers", lazy, {"diffrt.bench.fid", "diffrt.core.lazy"})
    graph = {"diffrt.x": {"diffrt.y"}, "diffrt.y": {"diffrt.x"}, "diffrt.z": {"diffrt.x"}}
    assert cycles(graph) == [["diffrt.x", "diffrt.y"]]
    assert _cycle_through(["diffrt.x", "diffrt.y"], graph) == ["diffrt.x", "diffrt.y", "diffrt.x"]


if __name__ == "__main__":
    issues = problems()
    print("\n".join(issues) or "no problems")
    print(f"{len(issues)} problem(s)")
