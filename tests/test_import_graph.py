"""The layering rule of docs/architecture.md, checked on the source: core <- {compress, exporters, runtime,
eval} <- {bench, pipeline} <- the CLI. Imports inside functions count too (they are dependencies all the
same), so a lazy import cannot hide an upward edge."""

import ast
from pathlib import Path

import edgeprune

PACKAGE = Path(edgeprune.__file__).parent
STAGES = ("compress", "exporters", "runtime", "eval", "bench", "pipeline")
APPLICATION = ("cli", "catalog_cli")  # the top-level command line: may import everything
HEAVY = ("torch", "transformers", "optimum", "datasets", "accelerate")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "edgeprune"


def _internal(targets: set[str]) -> set[str]:
    return {t for t in targets if t in GRAPH}


def test_core_imports_no_stage_and_no_application():
    bad = [(m, t) for m, targets in GRAPH.items() if _layer(m) == "core"
           for t in _internal(targets) if _layer(t) not in ("core", "edgeprune")]
    assert not bad, f"core must not import a stage: {bad}"


def test_runtime_imports_neither_torch_side_stages_nor_torch():
    bad = [(m, t) for m, targets in GRAPH.items() if _layer(m) == "runtime" for t in targets
           if _layer(t) in ("compress", "exporters", "eval", "bench", "pipeline") and t.startswith("edgeprune.")
           or t.split(".")[0] in HEAVY]
    assert not bad, f"runtime must stay torch-free and below the exporters: {bad}"


def test_stages_do_not_import_the_application_layer():
    bad = [(m, t) for m, targets in GRAPH.items() if _layer(m) in ("core",) + STAGES
           for t in _internal(targets) if _layer(t) in APPLICATION]
    assert not bad, f"stages must not import the top-level CLI: {bad}"


def test_no_cycles_between_layers():
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        for target in _internal(targets):
            a, b = _layer(module), _layer(target)
            if a != b and "edgeprune" not in (a, b):
                edges.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(a for a in edges if reaches(a, a, {a}))
    assert not cycles, f"layers on an import cycle: {cycles} (edges {edges})"


def test_no_cycles_between_modules_at_import_time():
    """Module-level imports only: a cycle there breaks depending on which module is imported first."""
    top: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names: set[str] = set()
        # Registration imports after the last definition (``importance`` importing ``flap`` so it registers)
        # run once the module is complete, so importing either module first works: not counted as a cycle.
        last_definition = max((i for i, n in enumerate(tree.body) if isinstance(n, (ast.FunctionDef, ast.ClassDef))),
                              default=len(tree.body))
        for node in tree.body[:last_definition]:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.update({node.module} | {f"{node.module}.{alias.name}" for alias in node.names})
        module = _module_name(path)
        # a package's own submodules (registration imports in __init__) are not a cycle
        top[module] = {t for t in _internal(names) if t != module and not t.startswith(module + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(top.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if not state.get(target) and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(top):
        if not state.get(module):
            cycle = visit(module)
            assert cycle is None, f"import cycle at module level: {' -> '.join(cycle)}"


def test_one_inference_session_construction_site():
    sites = [_module_name(p) for p in PACKAGE.rglob("*.py") if "InferenceSession(" in p.read_text()]
    assert sites == ["edgeprune.core.onnxio"], sites
