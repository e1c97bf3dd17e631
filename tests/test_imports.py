"""The import graph of the package, read with ``ast`` (every import, also those inside functions):
the runtime never imports the tools, and the CLI is in no import cycle."""
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
