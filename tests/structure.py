"""A static check of the package's import structure (tests/test_structure.py).

Reads every module of the distribution from the source folders that pyproject.toml's
``[tool.setuptools.package-dir]`` maps to import names, parses it (nothing is
imported or run) and reports:

* import cycles: strongly connected components of the graph "module A imports module
  B", counting imports anywhere in a module (also inside functions: a lazy import is
  still a cycle, only a later one), except under ``if TYPE_CHECKING:``. A package's
  ``__init__`` importing its own submodules is an edge like any other; the implicit
  import of a parent package is not.
* private imports: ``from mnemax.x import _name`` (or ``from .x import _name``) and
  ``mod._name`` on a module bound by an import, from another module of the package.
* upward imports: the layers are ranked kernels < layers < zoo < configs < train and a
  module may import only its own layer or lower ones.
* cross-platform imports: a module of one accelerator (its last name starting with or
  ending in ``gpu`` or ``tpu``, e.g. ``chunked_gpu``, ``tpu_channel``) importing a module of
  the other; what both platforms' kernels share lives in neutral modules (``common``,
  ``chunked_pallas``).
* heavy imports: the training stack (optax, orbax, TFDS, grain, ml_collections, absl,
  torch, ...) anywhere in kernels and layers, and at module level in the zoo (which must
  import without the ``train`` extra; a function may import orbax lazily).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import tomllib

LAYER_RANK = {"kernels": 0, "layers": 1, "zoo": 2, "configs": 3, "train": 4}
HEAVY = ("optax", "orbax", "tensorflow", "tensorflow_datasets", "grain", "ml_collections", "absl", "torch",
         "tensorboardX", "tqdm", "matplotlib", "transformers")


@dataclasses.dataclass(frozen=True)
class Module:
    name: str  # the dotted import name, e.g. mnemax.kernels.dispatch
    path: str
    layer: str  # the source folder at the top of its package-dir mapping (kernels, layers, ...)
    is_package: bool


def package_dirs(root: str) -> dict[str, str]:
    """pyproject's package-dir table: import name -> folder (relative to ``root``)."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


def modules(root: str, mapping: dict[str, str] | None = None) -> dict[str, Module]:
    """Every .py file under the mapped folders, by import name."""
    mapping = package_dirs(root) if mapping is None else mapping
    found: dict[str, Module] = {}
    for pkg, folder in mapping.items():
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            rel = os.path.relpath(dirpath, base)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            if any(prefix.startswith(other + ".") and len(other) > len(pkg) for other in mapping):
                continue  # a folder mapped under a longer name of its own (mnemax.layers inside mnemax)
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                is_pkg = fn == "__init__.py"
                name = prefix if is_pkg else f"{prefix}.{fn[:-3]}"
                found[name] = Module(name, os.path.join(dirpath, fn), folder.split("/")[0], is_pkg)
    return found


@dataclasses.dataclass
class Report:
    edges: dict[str, set[str]]
    cycles: list[list[str]]
    private: list[str]
    upward: list[str]
    heavy: list[str]
    cross_platform: list[str] = dataclasses.field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return ([f"import cycle: {' -> '.join(c + [c[0]])}" for c in self.cycles] + self.private + self.upward
                + self.heavy + self.cross_platform)


def platform(name: str) -> str | None:
    """"gpu" or "tpu" for a module of one accelerator's kernels (by its last name), else None."""
    last = name.rpartition(".")[2]
    for p in ("gpu", "tpu"):
        if last == p or last.startswith(p + "_") or last.endswith("_" + p):
            return p
    return None


def _under_type_checking(node, parents) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _in_function(node, parents) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return True
    return False


def check(root: str, mapping: dict[str, str] | None = None) -> Report:
    mods = modules(root, mapping)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private, upward, heavy, cross = [], [], [], []
    for mod in mods.values():
        tree = ast.parse(open(mod.path).read(), mod.path)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        module_aliases: set[str] = set()
        where = lambda node: f"{os.path.relpath(mod.path, root)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or _under_type_checking(node, parents):
                continue
            targets: list[tuple[str, str | None]] = []  # (module, imported name or None)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets.append((alias.name, None))
                    if alias.name in mods:
                        module_aliases.add(alias.asname or alias.name.split(".")[0])
            else:
                if node.level:
                    base = mod.name if mod.is_package else mod.name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in mods:
                        targets.append((sub, None))
                        module_aliases.add(alias.asname or alias.name)
                    else:
                        targets.append((source, alias.name))
            for target, name in targets:
                top = target.split(".")[0]
                if top in HEAVY and mod.layer in ("kernels", "layers"):
                    heavy.append(f"{where(node)}: {mod.layer} imports {target}")
                elif top in HEAVY and mod.layer == "zoo" and not _in_function(node, parents):
                    heavy.append(f"{where(node)}: the zoo imports {target} at module level")
                if target not in mods:
                    continue
                if target != mod.name:
                    edges[mod.name].add(target)
                if name is not None and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{where(node)}: private name {name} imported from {target}")
                ours, theirs = platform(mod.name), platform(target)
                if ours and theirs and ours != theirs:
                    cross.append(f"{where(node)}: {ours} module {mod.name} imports {target} ({theirs})")
                if LAYER_RANK[mods[target].layer] > LAYER_RANK[mod.layer]:
                    upward.append(f"{where(node)}: {mod.layer} module {mod.name} imports {target} ({mods[target].layer})")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{where(node)}: private name {node.value.id}.{node.attr} of another module")
    return Report(edges, _cycles(edges), private, upward, heavy, cross)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


MUTABLE_CALLS = ("dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque")


def module_mutables(root: str, layer: str = "kernels", mapping: dict[str, str] | None = None) -> list[str]:
    """Module-level mutable containers (dict/list/set displays, comprehensions or
    constructor calls, bound at the top level of a module of ``layer``) and ``global``
    statements: state a kernel could read while tracing, outside its jit cache key."""
    found = []
    for mod in modules(root, mapping).values():
        if mod.layer != layer:
            continue
        tree = ast.parse(open(mod.path).read(), mod.path)
        where = lambda node: f"{os.path.relpath(mod.path, root)}:{node.lineno}"  # noqa: E731
        for node in tree.body:
            value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
            mutable = isinstance(value, ast.Dict | ast.List | ast.Set | ast.DictComp | ast.ListComp | ast.SetComp) or (
                isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in MUTABLE_CALLS)
            if mutable and not (isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"]):
                found.append(f"{where(node)}: module-level mutable {ast.unparse(node).splitlines()[0][:80]}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                found.append(f"{where(node)}: global {', '.join(node.names)}")
    return found
