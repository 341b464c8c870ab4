# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Dependencies point one way: every module of the installed package imports only its own layer of
``LAYERS`` or lower ones (read from the source with ``ast``, function-local imports included), no
imports form a cycle, the core never reaches up into tools, launchers, benchmarks or tests, and
each function-local import says why it is local."""
from __future__ import annotations

import ast
import functools
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The package's layers, lowest first. A module may import its own layer or lower ones, never a
# higher one; inside a layer the imports must not form a cycle (test_no_import_cycles). A module
# belongs to the longest prefix listed. config and configs (plain preset data) sit at the bottom;
# the layer math (model.layer) knows nothing of the parallel plan (test_layer_knows_no_parallel_plan).
LAYERS = [
    ("megatron_memory", "megatron_memory.errors", "megatron_memory.determinism", "megatron_memory.config",
     "megatron_memory.configs"),
    ("megatron_memory.kernels",),        # Triton ops and their torch references
    ("megatron_memory.model",),          # layer math, parallel plan, spec, GPTModel, CUDA graphs
    ("megatron_memory.export",),         # exported folder, standalone model (plain torch)
    ("megatron_memory.checkpointing",),  # save / resume / reshard, integrity manifest
    ("megatron_memory.training",),       # trainer, data, optimizer, metrics, CPU shims
    ("megatron_memory.cli", "megatron_memory.describe", "megatron_memory.train"),  # commands
    ("megatron_memory.tools",),
    ("megatron_memory.launch",),
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def layer_of(module: str) -> int:
    """The layer of a module of the package: that of the longest listed prefix."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        unit = ".".join(parts[:n])
        if unit in LAYER_OF and (n > 1 or module == unit):
            return LAYER_OF[unit]
    raise KeyError(module)


# Top-level names that must never be imported from the package: the repository folders that
# install under megatron_memory (their bare names exist only in a source checkout), and the
# folders that do not install at all.
FOREIGN = {"kernels", "configs", "tools", "launch", "benchmarks", "tests"}
CORE_MUST_NOT_IMPORT = ("megatron_memory.tools", "megatron_memory.launch", "benchmarks", "tests")


@functools.cache
def package_files() -> dict[str, Path]:
    """{module name: source file} of everything the wheel installs (pyproject's package dirs)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    files = {}
    for package, folder in tool["package-dir"].items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = (package, *path.relative_to(ROOT / folder).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


class _Imports(ast.NodeVisitor):
    """Collects (imported module, line, inside a function?) of one file."""

    def __init__(self, package: str, known: set[str]):
        self.package, self.known, self.depth, self.found = package, known, 0, []

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            parts = self.package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self.found.append((sub if sub in self.known else base, node.lineno, self.depth > 0))


def imports_of(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function?) for each name ``path`` imports."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    visitor = _Imports(package, set(package_files()))
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


def _has_reason(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or just above the run of imports it belongs to."""
    if "#" in lines[line - 1]:
        return True
    k = line - 2
    while k >= 0 and (not lines[k].strip() or lines[k].strip().startswith(("import ", "from "))):
        k -= 1
    return k >= 0 and lines[k].strip().startswith("#")


def test_every_module_has_a_layer():
    homeless = []
    for module in package_files():
        try:
            layer_of(module)
        except KeyError:
            homeless.append(module)
    assert not homeless, f"give these modules a layer in LAYERS: {homeless}"


def test_imports_point_down_the_layers():
    upward = []
    for module, path in package_files().items():
        for target, line, _ in imports_of(module, path):
            if target.split(".")[0] == "megatron_memory" and layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} {module} imports {target}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def _graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, function-local imports included; importing a
    package counts as importing its __init__ module, which is its own name here."""
    files = package_files()
    return {m: {t for t, _, _ in imports_of(m, p) if t in files and t != m} for m, p in files.items()}


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_foreign_or_upward_packages():
    bad = []
    for module, path in package_files().items():
        core = not module.startswith(("megatron_memory.tools", "megatron_memory.launch"))
        for target, line, _ in imports_of(module, path):
            if target.split(".")[0] in FOREIGN or (core and target.startswith(CORE_MUST_NOT_IMPORT)):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_layer_knows_no_parallel_plan():
    layer = [t for t, _, _ in imports_of("megatron_memory.model.layer", package_files()["megatron_memory.model.layer"])
             if t.startswith("megatron_memory")]
    assert sorted(set(layer)) == ["megatron_memory.config", "megatron_memory.kernels",
                             "megatron_memory.model.query_norm"]


def test_presets_import_only_config():
    files = package_files()
    ours = {t for t, _, _ in imports_of("megatron_memory.configs.presets",
                                        files["megatron_memory.configs.presets"])
            if t.startswith("megatron_memory")}
    assert ours == {"megatron_memory.config"}


def test_function_local_imports_say_why():
    """A function-local import is kept only for an optional, CUDA-only or deliberately lazy
    dependency, with its reason in a comment on the line itself or the line above."""
    silent = []
    for module, path in package_files().items():
        lines = path.read_text().splitlines()
        for target, line, local in imports_of(module, path):
            if local and not _has_reason(lines, line):
                silent.append(f"{path.relative_to(ROOT)}:{line} {target}")
    assert not silent, "function-local imports without a reason comment:\n" + "\n".join(silent)
