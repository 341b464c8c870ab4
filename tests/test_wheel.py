# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The installed wheel: one top-level name, ``megatron_memory``, and every entry point runs from
it in a directory outside the repository (no source checkout on the path). About a minute:
``pytest -m wheel`` runs only this."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.wheel


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _source_files() -> list[str]:
    """What a fresh clone holds (plus new files not yet committed): git's view of the tree."""
    out = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, install dir, environment running from it, a cwd outside the repository)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clone has")
    tmp = tmp_path_factory.mktemp("wheel")
    clone = tmp / "clone"  # built from a copy: no build/ or egg-info left in the checkout
    for f in _source_files():
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, clone / f)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", tmp / "dist", clone])
    (wheel,) = (tmp / "dist").glob("*.whl")
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel])
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "XDG_CACHE_HOME", "MEGATRON_MEMORY_DATA")}
    env.update(PYTHONPATH=str(site), HOME=str(tmp / "home"))
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, site, env, elsewhere


def test_wheel_has_one_top_level_name(installed):
    wheel = installed[0]
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"megatron_memory"}, top
    for sub in ("kernels/__init__.py", "kernels/triton_embedding_bag.py", "configs/presets.py",
                "tools/memory_calculator.py", "tools/preprocess_data.py", "launch/run.py",
                "training/memory_estimate.py", "model/layer.py", "checkpointing/checkpoint.py",
                "export/hf_remote/modeling_megatron_memory.py", "errors.py", "determinism.py"):
        assert f"megatron_memory/{sub}" in names, sub


def test_installed_package_runs_from_the_wheel(installed):
    _, site, env, elsewhere = installed
    code = ("import megatron_memory as m, megatron_memory.kernels as k, megatron_memory.training.data as d; "
            "print(m.__file__, k.__file__, m.SOURCE_ROOT, d.DEFAULT_DATA_DIR, sep='\\n')")
    pkg, kernels, source_root, data_dir = _run([sys.executable, "-c", code], cwd=elsewhere,
                                               env=env).stdout.split()
    assert Path(pkg).is_relative_to(site) and Path(kernels).is_relative_to(site)
    assert source_root == "None"
    # The embedded dataset goes to the user's cache, not into site-packages.
    assert Path(data_dir) == Path(env["HOME"]) / ".cache" / "megatron_memory" / "default"


@pytest.mark.parametrize("argv,expect", [
    (["-m", "megatron_memory.train", "--print-config"], "memory.n_keys = 64"),
    (["-m", "megatron_memory.tools.memory_calculator", "--help"], "--world-size"),
    (["-m", "megatron_memory.launch.run", "torchrun", "--dry-run", "--", "--steps", "1"],
     "-m megatron_memory.train --steps 1"),
    (["-m", "megatron_memory.tools.preprocess_data", "--help"], "--output-prefix"),
    (["-m", "megatron_memory.tools.convert_checkpoint", "--help"], "to-megatron"),
    (["-m", "megatron_memory.export.generate", "--help"], "--max-new-tokens"),
], ids=["train", "calculator", "launch", "preprocess", "convert", "generate"])
def test_module_entry_points(installed, argv, expect):
    _, _, env, elsewhere = installed
    assert expect in _run([sys.executable, *argv], cwd=elsewhere, env=env).stdout


@pytest.mark.parametrize("script,argv,expect", [
    ("megatron-memory-train", ["--print-config"], "memory.n_keys = 64"),
    ("megatron-memory-calculator", ["--world-size", "2", "--", "--tp", "2"], "total GiB"),
    ("megatron-memory-launch", ["slurm", "--nproc-per-node", "1", "--dry-run"], "#SBATCH --nodes=1"),
    ("megatron-memory-preprocess", ["--help"], "--json-key"),
    ("megatron-memory-convert", ["to-hf", "--help"], "--max-shard-size"),
    ("megatron-memory-generate", ["--help"], "--prompt"),
])
def test_console_scripts(installed, script, argv, expect):
    _, site, env, elsewhere = installed
    assert expect in _run([site / "bin" / script, *argv], cwd=elsewhere, env=env).stdout
