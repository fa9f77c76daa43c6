"""The package's shape: one direction of dependency between its layers, no import cycles,
and Flower imported only by the few modules of the Flower adapters (the federated core,
fedbt.fl, imports none).

Reads the import statements of every module (no module is imported), so it runs in well
under a second and a failure names the offending module and line. One test imports the
deployment's control modules, in a process of its own, to see what they pull in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fedbt"

# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS = (
    ("fedbt.config", "fedbt.progress", "fedbt.fileio"),
    ("fedbt.reports", "fedbt.tracking"),
    ("fedbt.data",),
    ("fedbt.model",),
    ("fedbt.eval",),
    ("fedbt.train",),
    ("fedbt.fl",),
    ("fedbt.federated",),
    ("fedbt.deployment",),
    ("fedbt.bench", "fedbt.cli"),
)
# The only modules that may import flwr: the apps, the wire format, the declared internals and
# the simulation's launcher. Everything else reaches Flower through them.
FLOWER_MODULES = (
    "fedbt.federated.server_app",
    "fedbt.federated.client_app",
    "fedbt.federated.packing",
    "fedbt.federated.flower_internals",
    "fedbt.federated.simulation",
)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            # `from fedbt.data import catalog` imports the submodule fedbt.data.catalog.
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    return {
        name: [(target, line) for target, line in imports_of(path) if target in modules and target != name]
        for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    return [
        f"{source}:{line} imports {target} from a higher layer"
        for source, targets in graph.items()
        for target, line in targets
        if layer_of(target) > layer_of(source)
    ]


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module], _ = "open", stack.append(module)
        for target, _line in graph.get(module, []):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module], _ = "done", stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def flower_outside_its_place(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in root.rglob("*.py"):
        name = module_name(path, root)
        allowed = name in FLOWER_MODULES
        for target, line in imports_of(path):
            if (target == "flwr" or target.startswith("flwr.")) and not allowed:
                found.append(f"{name}:{line} imports {target}")
    return found


def test_every_module_imports_only_its_own_or_lower_layers():
    assert upward_imports(import_graph()) == []


def test_there_is_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_flower_is_imported_only_by_the_flower_adapters():
    assert flower_outside_its_place() == []
    assert len(FLOWER_MODULES) <= 5


def test_the_checks_catch_a_cycle_an_upward_import_and_flower_in_the_core(tmp_path):
    # A scratch package with each defect, so the checks above are known to be able to fail.
    fake = tmp_path / "fedbt"
    (fake / "data").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "data" / "a.py").write_text("from fedbt.data import b\nimport flwr\n")
    (fake / "data" / "b.py").write_text("import fedbt.data.a\nfrom fedbt.train.engine import step\n")
    (fake / "train" / "engine.py").write_text("step = None\n")
    graph = import_graph(fake)
    assert find_cycle(graph) in (
        ["fedbt.data.a", "fedbt.data.b", "fedbt.data.a"],
        ["fedbt.data.b", "fedbt.data.a", "fedbt.data.b"],
    )
    assert upward_imports(graph) == ["fedbt.data.b:2 imports fedbt.train.engine from a higher layer"]
    assert flower_outside_its_place(fake) == ["fedbt.data.a:2 imports flwr"]


# What `fedbt server`, `fedbt site`, `fedbt run` and the SuperLink, SuperNode and executors they start
# import before any training: they pass messages and manage processes, so they need neither torch
# nor plotting. Importing torch there costs each of those processes seconds and most of a GiB.
CONTROL_MODULES = ("fedbt.cli", "fedbt.deployment.nodes", "fedbt.deployment.runs", "fedbt.federated.flower_internals")
HEAVY_LIBRARIES = ("torch", "torchvision", "matplotlib")


def test_the_deployments_control_processes_import_no_torch_or_plotting():
    script = (
        f"import sys\nfor name in {CONTROL_MODULES!r}: __import__(name)\n"
        f"print([name for name in {HEAVY_LIBRARIES!r} if name in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
