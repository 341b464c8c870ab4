# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Dependencies point one way: every module of the installed package imports only modules before
it in ``ORDER`` (read from the source with ``ast``, function-local imports included), the core
never reaches up into tools, launchers, benchmarks or tests, and each function-local import says
why it is local."""
from __future__ import annotations

import ast
import functools
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each module may import only those listed before it. The chain of the issue is
# config, kernels < layer < parallel < spec < model < training < cli / train / tools; the leaf
# helpers (cpu, data, metrics, memory_estimate) import at most config and sit below the layer.
ORDER = [
    "megatron_memory",                      # package __init__: finds the source checkout
    "megatron_memory.determinism",          # --deterministic's environment (os; torch when enabled)
    "megatron_memory.config",
    # configs/ stays a sub-package of plain preset data that imports only megatron_memory.config
    # (test_presets_import_only_config), so cli's import of the presets is a downward import.
    "megatron_memory.configs",
    "megatron_memory.configs.presets",
    "megatron_memory.kernels.reference",
    "megatron_memory.kernels.segment_plan",    # the segment backward's plan (torch only)
    "megatron_memory.kernels.triton_embedding_bag",
    "megatron_memory.kernels.triton_product_key",
    "megatron_memory.kernels.bf16_search",
    "megatron_memory.kernels.query_prologue",  # inference: query norm + QK-norm in one kernel
    "megatron_memory.kernels.query_norm_train",  # training: query BatchNorm + QK-norm, fused
    "megatron_memory.kernels.key_norm",          # training: the sub-keys' QK-norm, fused
    "megatron_memory.kernels.decode_search",   # inference: exact search for a few tokens
    "megatron_memory.kernels",
    "megatron_memory.standalone",            # plain torch; kernels optional (copied into exports)
    "megatron_memory.cpu",
    "megatron_memory.jsonl_input",          # JSONL lines: compressed, byte-order mark (stdlib only)
    "megatron_memory.data",
    "megatron_memory.metrics",
    "megatron_memory.memory_estimate",
    "megatron_memory.step_profile",         # a profiled step's time by kernel kind (kernels)
    "megatron_memory.tracking",             # TensorBoard / W&B (config + metrics)
    "megatron_memory.preflight",            # input checks before the model (config, data)
    "megatron_memory.attention",            # SDPA core attention (megatron only)
    "megatron_memory.query_norm",           # query BatchNorm / centring (config only)
    "megatron_memory.layer",                # single-device math: no parallel plan
    "megatron_memory.graphs",               # CUDA graphs of a memory layer (layer + megatron)
    "megatron_memory.parallel",
    "megatron_memory.spec",
    "megatron_memory.model",
    "megatron_memory.integrity",            # parallel SHA-256 manifest (torch.distributed only)
    "megatron_memory.optim",                # fused torch AdamW inside megatron's wrappers (torch only)
    "megatron_memory.hf_format",             # exported folder: config, names, safetensors I/O
    "megatron_memory.checkpoint",           # save / resume / reshard (config + megatron only)
    "megatron_memory.stopping",             # stop signals / stop file, agreed by all ranks (config)
    "megatron_memory.training",
    "megatron_memory.cli",
    "megatron_memory.describe",             # --print-config (cli, preflight, memory_estimate)
    "megatron_memory.train",
    "megatron_memory.generate",
    "megatron_memory.tools",
    "megatron_memory.tools.preprocess_data",
    "megatron_memory.tools.memory_calculator",
    "megatron_memory.tools.convert_checkpoint",
    "megatron_memory.tools.plot_run",
    "megatron_memory.tools.build_text_corpus",
    "megatron_memory.tools.fact_recall",
    "megatron_memory.launch",
    "megatron_memory.launch.run",
]
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
        for path in sorted((ROOT / folder).glob("*.py")):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
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


def test_every_module_has_a_place_in_the_order():
    files = package_files()
    assert set(files) == set(ORDER), (f"place new modules in ORDER: {sorted(set(files) - set(ORDER))}; "
                                      f"gone: {sorted(set(ORDER) - set(files))}")


def test_imports_point_down_the_order():
    rank = {m: i for i, m in enumerate(ORDER)}
    upward = []
    for module, path in package_files().items():
        for target, line, _ in imports_of(module, path):
            if target.split(".")[0] == "megatron_memory" and rank.get(target, len(ORDER)) >= rank[module]:
                upward.append(f"{path.relative_to(ROOT)}:{line} {module} imports {target}")
    assert not upward, "imports against the order:\n" + "\n".join(upward)


def test_no_foreign_or_upward_packages():
    bad = []
    for module, path in package_files().items():
        core = not module.startswith(("megatron_memory.tools", "megatron_memory.launch"))
        for target, line, _ in imports_of(module, path):
            if target.split(".")[0] in FOREIGN or (core and target.startswith(CORE_MUST_NOT_IMPORT)):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_layer_knows_no_parallel_plan():
    layer = [t for t, _, _ in imports_of("megatron_memory.layer", package_files()["megatron_memory.layer"])
             if t.startswith("megatron_memory")]
    assert sorted(set(layer)) == ["megatron_memory.config", "megatron_memory.kernels",
                             "megatron_memory.query_norm"]


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
