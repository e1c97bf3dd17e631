"""The import graph of the package, read with ``ast`` (every import, also those inside functions
and under ``if TYPE_CHECKING``): no import cycle anywhere, every import points down the layers
(docs/architecture.md), the runtime never imports the tools."""
import ast
import subprocess
import sys
from pathlib import Path

import billing_module

PACKAGE_DIR = Path(billing_module.__file__).resolve().parent
TOOLS = "billing_module.tools"


def _modules():
    """{dotted module name: path} for every module of the package."""
    out = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ("billing_module",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name, path, known):
    """The package's modules that ``name`` imports, relative imports resolved."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:      # "billing_module.x.name" -> "billing_module.x"
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def _graph():
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_no_runtime_module_imports_the_tools():
    graph = _graph()
    offenders = {name: sorted(t for t in targets if t == TOOLS or t.startswith(TOOLS + "."))
                 for name, targets in graph.items() if not (name == TOOLS or name.startswith(TOOLS + "."))}
    offenders = {name: tools for name, tools in offenders.items() if tools}
    assert not offenders, offenders
    # and what ast cannot see (importlib): loading the runtime and the CLI's parser loads no tool
    code = ("import sys, billing_module.init, billing_module.server, billing_module.cli as cli\n"
            "cli.build_parser()\n"
            f"print(sorted(m for m in sys.modules if m.startswith('{TOOLS}')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(PACKAGE_DIR.parent))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_tools_are_still_reached_through_the_cli():
    from billing_module import cli
    for command, (module, _) in cli.PASS_THROUGH.items():
        assert module.startswith(TOOLS + "."), (command, module)
        assert (PACKAGE_DIR / "tools" / (module.rsplit(".", 1)[1] + ".py")).is_file(), module


def _reaches(graph, start, goal):
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        for nxt in graph.get(name, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_the_cli_is_in_no_import_cycle():
    graph = _graph()
    assert "billing_module.sync.cli" in graph["billing_module.cli"]
    for name in ("billing_module.cli", "billing_module.sync.cli", "billing_module.cli_options"):
        assert not _reaches(graph, name, name), f"{name} imports itself through other modules"


def _cycles(graph):
    """The strongly connected components of more than one module, and modules importing themselves."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    # a package importing its own submodule is the same edge as any other here (stricter than
    # counting only sibling modules), so api/__init__ <-> api/handlers would show
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["e"]]


# Layers, lowest first; a module may import its own layer and the layers below, never one above.
# The longest matching prefix names a module's layer; every module must match one.
FOUNDATION, DB, DOMAIN, SERVICES, ROOT, EDGES = range(6)
LAYERS = {
    # used by every layer, importing nothing above: errors, ids, time, files of the package
    "errors": FOUNDATION, "ids": FOUNDATION, "jsontext": FOUNDATION, "clock": FOUNDATION, "resources": FOUNDATION,
    "datadir": FOUNDATION, "version": FOUNDATION,
    "db": DB,
    "money": DOMAIN, "pricing": DOMAIN, "provider_usage": DOMAIN, "validation": DOMAIN, "config": DOMAIN,
    "accounting": SERVICES, "failures": SERVICES, "ledger": SERVICES, "catalog": SERVICES,
    "reports": SERVICES, "products": SERVICES, "sync": SERVICES, "auth": SERVICES, "apikeys": SERVICES,
    "cache": SERVICES, "http": SERVICES, "codes": SERVICES, "session_store": SERVICES, "throttle": SERVICES,
    "page_users": SERVICES, "statements": SERVICES, "alerts": SERVICES, "budgets": SERVICES,
    "metrics": SERVICES,
    "core": ROOT, "services": ROOT,
    "": EDGES, "init": EDGES, "inprocess": EDGES, "server": EDGES, "cli": EDGES, "cli_options": EDGES,
    "sync.cli": EDGES, "api": EDGES, "demo": EDGES, "tools": EDGES,
    "sessions": EDGES, "guard": EDGES, "bricks": EDGES, "statement_export": EDGES,
}
LAYER_NAMES = ("foundation", "db", "domain", "services", "composition root", "edges")


def layer_of(module):
    name = module[len("billing_module."):] if module.startswith("billing_module.") else ""
    while name not in LAYERS:
        if "." not in name:
            raise KeyError(f"{module} has no layer in tests/test_imports.py LAYERS")
        name = name.rpartition(".")[0]
    return LAYERS[name]


def test_every_module_has_a_layer():
    for module in _graph():
        layer_of(module)


def test_imports_point_down_the_layers():
    upward = sorted(f"{m} ({LAYER_NAMES[layer_of(m)]}) imports {t} ({LAYER_NAMES[layer_of(t)]})"
                    for m, targets in _graph().items() for t in targets if layer_of(t) > layer_of(m))
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("billing_module.db.schema") < layer_of("billing_module.accounting")
    assert layer_of("billing_module.sync.cli") == EDGES and layer_of("billing_module.sync.base") == SERVICES
    assert layer_of("billing_module") == EDGES
