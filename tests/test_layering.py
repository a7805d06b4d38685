"""The package's import structure: no module imports (directly or through others) one that imports it, and the
only imports deferred into functions are the ones listed here with their reason, so a cycle cannot hide behind
one either."""
import ast
from pathlib import Path

import sparsecc

ROOT = Path(sparsecc.__file__).parent
DEFERRED = {    # module -> sparsecc modules it may import inside a function, and why
    "sparsecc.cli": {"sparsecc.export.artifact", "sparsecc.export.iree"},   # `sparsecc inspect` starts without torch
    "sparsecc.ops.device": {"sparsecc.codegen.triton"},        # triton is optional: imported where a Triton kernel runs
}


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def _targets(module: str, node: ast.ImportFrom | ast.Import) -> set[str]:
    """The sparsecc modules an import statement of `module` loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
    return {f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names} & set(MODULES)


def _imports(deferred: bool) -> dict[str, set[str]]:
    out = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 and (id(n) not in top) == deferred and not _type_checking_only(tree, n)]
        out[module] = set().union(*(_targets(module, n) for n in nodes)) - {module}
    return out


def _type_checking_only(tree: ast.Module, node) -> bool:
    return any(isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test) and node in ast.walk(n)
               for n in tree.body)


def test_no_import_cycles():
    edges = _imports(deferred=False)
    for module in MODULES:                       # a package's own submodules are its parts, not a cycle
        edges[module] = {t for t in edges[module] if not t.startswith(module + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2
    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_only_the_listed_imports_are_deferred():
    deferred = {m: t for m, t in _imports(deferred=True).items() if t}
    assert deferred == DEFERRED
