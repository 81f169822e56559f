"""Check the import graph of the project's own modules (ablations/, senet/): cycles, upward imports, private reach.

    python bench/import_cycles.py [--root DIR]

Every import counts: at module level, inside a function (a lazy import still ties two modules
together) and under `if TYPE_CHECKING:` (annotations tie them too, and such a cycle becomes a real
one the day the import is needed at run time). Four rules, each listed with file and line:

1. layers: every module belongs to one layer, in this order (lowest first)
       util, errors < senet < config < data < train < tracking < run < report < cli
   (ablations.util*, ablations.errors | senet* | ablations.config* | ablations.data* | ablations.train* |
   ablations.tracking*, ablations.record | ablations.run* | ablations.report* | ablations.cli*;
   ablations/__init__.py is neutral). A module outside every layer is reported, so that a new module must take its place.
2. upward imports: a module may import from its own layer or a lower one, never a higher one.
3. private imports across packages: no module takes a `_name` (a name, or a module in a dotted
   path, starting with one underscore) from a module of another package, by `from M import _x`,
   `import M._x` or `M._x` on an imported module. A package here is ablations.X (a subpackage or a
   single-file module such as ablations.tracking) or senet; inside one, private names are shared freely.
4. cycles: every elementary cycle, each listed once, starting from its smallest module name.

Prints each violation and a count per rule, the cycles last; exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("ablations", "senet")

# Lowest first; a module's layer is the first entry one of whose prefixes names it or a package above it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("util/errors", ("ablations.util", "ablations.errors")),
    ("senet", ("senet",)),
    ("config", ("ablations.config",)),
    ("data", ("ablations.data",)),
    ("train", ("ablations.train",)),
    ("tracking", ("ablations.tracking", "ablations.record")),
    ("run", ("ablations.run",)),
    ("report", ("ablations.report",)),
    ("cli", ("ablations.cli",)),
)
NEUTRAL = frozenset({"ablations"})  # the top package's __init__: re-exports only


@dataclass(frozen=True)
class Edge:
    """`src` imports project module `dst` at `path`:`line`."""

    src: str
    dst: str
    path: str
    line: int


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: list[Edge] = field(default_factory=list)
    private: list[tuple[str, int, str, str]] = field(default_factory=list)  # (path, line, importer, what)

    def adjacency(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = {m: set() for m in self.modules}
        for e in self.edges:
            adj[e.src].add(e.dst)
        return adj


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """Index into LAYERS, or None (neutral, or in no layer)."""
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(_under(module, p) for p in prefixes):
            return i
    return None


def package_of(module: str) -> str:
    """The unit private names are shared within: ablations.X (first two parts) or senet."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "ablations" else parts[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


class _Collector(ast.NodeVisitor):
    """The imports of one file, resolved to project modules, and any private name taken from another package."""

    def __init__(self, graph: Graph, mod: str, path: Path, root: Path) -> None:
        self.graph, self.mod, self.rel = graph, mod, str(path.relative_to(root))
        self.package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        self.aliases: dict[str, str] = {}  # local name -> the dotted path it stands for

    def _project_module(self, dotted: str) -> str | None:
        """The longest project module that `dotted` names (a.b.c -> a.b if c is a name in a.b)."""
        while dotted and dotted not in self.graph.modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def _edge(self, dotted: str, line: int) -> None:
        target = self._project_module(dotted)
        if target and target != self.mod:
            self.graph.edges.append(Edge(self.mod, target, self.rel, line))

    def _check_private(self, dotted: str, line: int) -> None:
        """Flag a private part of `dotted` (a.b._c, a._b.c) that lies in another package."""
        parts = dotted.split(".")
        for i in range(1, len(parts)):
            if _is_private(parts[i]) and package_of(".".join(parts[:i])) != package_of(self.mod) \
                    and self._project_module(".".join(parts[:i])):
                self.graph.private.append((self.rel, line, self.mod, ".".join(parts[: i + 1])))
                return

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._edge(a.name, node.lineno)
            self._check_private(a.name, node.lineno)
            if a.asname:
                self.aliases[a.asname] = a.name
            else:
                top = a.name.partition(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from .x import y
            pkg = self.package.split(".")
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
        self._edge(base, node.lineno)
        self._check_private(base, node.lineno)
        for a in node.names:
            if a.name == "*":
                continue
            self._edge(f"{base}.{a.name}", node.lineno)
            self._check_private(f"{base}.{a.name}", node.lineno)
            self.aliases[a.asname or a.name] = f"{base}.{a.name}"

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # module._name on an imported project module (`tracking._pid_alive(...)`)
        chain: list[str] = []
        value: ast.expr = node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.aliases and _is_private(node.attr):
            dotted = ".".join([self.aliases[value.id], *reversed(chain)])
            owner = dotted.rpartition(".")[0]
            if owner in self.graph.modules:
                self._check_private(dotted, node.lineno)
        self.generic_visit(node)


def collect(root: Path) -> Graph:
    files = {module_name(root, p): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    graph = Graph(files)
    for mod, path in files.items():
        _Collector(graph, mod, path, root).visit(ast.parse(path.read_text(), str(path)))
    return graph


def imports_of(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    return collect(root).adjacency()


def unlayered(graph: Graph) -> list[str]:
    return [m for m in sorted(graph.modules) if m not in NEUTRAL and layer_of(m) is None]


def upward(graph: Graph) -> list[Edge]:
    """Imports from a lower layer into a higher one, one per (importer, imported, line)."""
    out = []
    for e in sorted(set(graph.edges), key=lambda e: (e.src, e.line, e.dst)):
        lo, hi = layer_of(e.src), layer_of(e.dst)
        if lo is not None and hi is not None and hi > lo:
            out.append(e)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each listed once, starting from its smallest module name."""
    found: list[list[str]] = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append(path[:])
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def report(root: Path) -> int:
    """Print every violation, a count per rule and the cycles last; the number of violations."""
    graph = collect(root)
    names = [n for n, _ in LAYERS]
    loose = unlayered(graph)
    for m in loose:
        print(f"  {graph.modules[m].relative_to(root)}: {m} is in no layer ({' < '.join(names)})")
    print(f"{len(loose)} modules outside the layers")
    up = upward(graph)
    for e in up:
        print(f"  {e.path}:{e.line}: {e.src} ({names[layer_of(e.src) or 0]}) imports {e.dst} "
              f"({names[layer_of(e.dst) or 0]})")
    print(f"{len(up)} upward imports")
    private = sorted(set(graph.private))
    for path, line, mod, what in private:
        print(f"  {path}:{line}: {mod} takes {what}")
    print(f"{len(private)} private imports across packages")
    found = cycles(graph.adjacency())
    for c in found:
        print(" -> ".join(c + [c[0]]))
    print(f"{len(found)} import cycles")
    return len(loose) + len(up) + len(private) + len(found)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the repository root")
    return 1 if report(Path(p.parse_args().root)) else 0


if __name__ == "__main__":
    sys.exit(main())
