"""gfcompiler's modules import one way: no cycles, not even through imports inside functions.

The import graph is read from the source with `ast` (module-level and function-level
imports of gfcompiler modules), so a cycle hidden by an import inside a function fails
here although Python would run it. Checked:

* the whole package's graph is acyclic;
* the runtime's training modules import in one direction: loop → trainer → export →
  losses (each only reaches the ones after it);
* imports inside functions, in the runtime and the command-line modules, exist only
  where `LAZY_IMPORTS` allows them: to load an optional or heavy dependency when it is
  needed, never to break a cycle;
* every ``gfc`` command registers (``gfc --help``) without onnx, onnx_ir, networkx,
  torch, onnxruntime, matplotlib, flwr or ray: no command can be dropped by a missing package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import gfcompiler

PACKAGE = Path(gfcompiler.__file__).parent

# The runtime's training layers, top to bottom: each module may import only those below it.
RUNTIME_LAYERS = ("gfcompiler.runtime.loop", "gfcompiler.runtime.trainer", "gfcompiler.runtime.export",
                  "gfcompiler.runtime.losses")

# Modules whose function-level imports are checked, and what each may import inside a function (and why).
CHECKED = ("gfcompiler.runtime", "gfcompiler.cli", "gfcompiler.commandline", "gfcompiler.errors", "gfcompiler.federated")
LAZY_IMPORTS = {
    # The backend's engine is imported when artifacts of that backend open: ort_engine needs
    # onnxruntime-training, which most devices lack.
    "gfcompiler.runtime.engine": {"gfcompiler.runtime.onnx_engine", "gfcompiler.runtime.ort_engine"},
    # The handlers import the modules that load onnxruntime (and Pillow, scikit-learn) when the
    # command runs, so registering train/eval/export (gfc --help) imports none of them.
    "gfcompiler.runtime.cli": {"gfcompiler.runtime.artifacts", "gfcompiler.runtime.checkpoints", "gfcompiler.runtime.data",
                               "gfcompiler.runtime.loop", "gfcompiler.runtime.progress", "gfcompiler.runtime.trainer"},
    # compile / inspect import the compiler (onnx, onnx_ir), absent on a device with only the runtime.
    "gfcompiler.cli": {"gfcompiler.artifacts", "gfcompiler.driver", "gfcompiler.inspect", "gfcompiler.loading"},
    # gfc federate's handler imports the runtime (onnxruntime) and, once its arguments are checked, the
    # simulation (flwr, ray: the federated extra), so registering it needs neither.
    "gfcompiler.federated.cli": {"gfcompiler.runtime.artifacts", "gfcompiler.runtime.checkpoints",
                                 "gfcompiler.runtime.progress", "gfcompiler.federated.partition",
                                 "gfcompiler.federated.simulation"},
}

COMMANDS = {"compile", "inspect", "train", "eval", "export", "bench", "federate", "demo"}
HEAVY = ("onnx", "onnx_ir", "networkx", "torch", "onnxruntime", "matplotlib", "flwr", "ray")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["gfcompiler", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _module_of(name: str) -> str | None:
    """The package module ``name`` refers to: itself, or the module that defines it (``a.b.f`` → ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[tuple[str, bool]]:
    """(imported gfcompiler module, whether inside a function) for every import in ``module``."""
    found = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{module}: relative import"
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
                continue
            for name in names:
                target = _module_of(name) if name.split(".")[0] == "gfcompiler" else None
                if target is not None and target != module:
                    found.add((target, in_function))

    visit(ast.parse(MODULES[module].read_text()), False)
    return found


GRAPH = {module: {target for target, _ in _imports(module)} for module in MODULES}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def _cycle() -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := walk(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := walk(module)):
            return found
    return None


def test_the_graph_reader_sees_function_level_imports():
    assert ("gfcompiler.runtime.ort_engine", True) in _imports("gfcompiler.runtime.engine")
    assert ("gfcompiler.runtime.trainer", False) in _imports("gfcompiler.runtime.loop")
    assert "gfcompiler.runtime.losses" in _reachable("gfcompiler.runtime.loop")


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_runtime_layers_import_one_way():
    for upper, lower in zip(RUNTIME_LAYERS, RUNTIME_LAYERS[1:]):
        assert lower in GRAPH[upper], f"{upper} should import {lower}"
    for index, module in enumerate(RUNTIME_LAYERS):
        above = set(RUNTIME_LAYERS[:index])
        assert not _reachable(module) & above, f"{module} reaches {sorted(_reachable(module) & above)}"
    assert not {m for m in GRAPH["gfcompiler.runtime.losses"] if m != "gfcompiler"}, "losses imports numpy only"


def test_function_level_imports_only_where_allowed():
    checked = [m for m in MODULES if any(m == prefix or m.startswith(prefix + ".") for prefix in CHECKED)]
    assert "gfcompiler.runtime.trainer" in checked and "gfcompiler.cli" in checked
    unexpected = {
        module: sorted(lazy - LAZY_IMPORTS.get(module, set()))
        for module in checked
        if (lazy := {target for target, in_function in _imports(module) if in_function} - LAZY_IMPORTS.get(module, set()))
    }
    assert not unexpected, f"imports inside functions not in LAZY_IMPORTS: {unexpected}"


REGISTER = textwrap.dedent(
    """
    import importlib.abc, sys
    HEAVY = {heavy!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    from gfcompiler.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    print(" ".join(sorted(subparsers.choices)))
    """
)


def test_every_command_registers_without_heavy_packages():
    completed = subprocess.run([sys.executable, "-c", REGISTER.format(heavy=HEAVY)], capture_output=True, text=True,
                               timeout=60)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert set(completed.stdout.split()) == COMMANDS
