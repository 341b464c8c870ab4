# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints through the command line, as a user meets them: periodic saves and pruning,
SIGTERM (preemption) saves and exits cleanly, and every damaged or mismatched checkpoint gives
one line naming the file or field, exit code 2, and leaves what was saved untouched."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_memory.checkpointing import checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
         "--memory-layers", "1", "--memory-n-keys", "16", "--memory-k", "4", "--memory-k-dim", "16",
         "--seq-length", "32", "--micro-batch-size", "2", "--tensorboard-dir", "",
         "--eval-iters", "0", "--log-interval", "1"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def train(*args: str, rc: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "megatron_memory.train", *SMALL, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == rc, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def one_error_line(r: subprocess.CompletedProcess) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """4 steps, a checkpoint every step, only the newest 2 kept."""
    root = tmp_path_factory.mktemp("cli") / "run"
    train("--steps", "4", "--save", str(root), "--save-interval", "1", "--keep-last", "2")
    return root


def test_periodic_saves_keep_the_last_two(saved):
    assert sorted(p.name for p in saved.iterdir()) == [
        "iter_0000003", "iter_0000004", checkpoint.TRACKER]
    assert checkpoint.read_tracker(saved) == 4
    assert (saved / "iter_0000004" / "run_config.json").is_file()


def test_sigterm_saves_then_resume_continues(tmp_path):
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_memory.train", *SMALL, "--steps", "100000",
                             "--save", str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:
        if line.startswith("step     3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    step = checkpoint.read_tracker(root)
    assert step >= 3
    assert (f"stopping after step {step} (received SIGTERM): saved {root}/iter_{step:07d}; "
            f"resume with --load {root}") in out
    r = train("--steps", str(step + 2), "--load", str(root), "--save", str(root))
    assert f"loaded step {step} (model, optimizer, schedule, data position)" in r.stdout
    assert f"step {step + 1:>5}/{step + 2}" in r.stdout
    assert checkpoint.read_tracker(root) == step + 2


def test_save_dir_with_checkpoints_is_not_overwritten(saved):
    r = train("--steps", "2", "--save", str(saved), rc=2)
    assert "not empty; refusing to overwrite (it holds checkpoints up to step 4: resume with --load" \
        in one_error_line(r)
    assert checkpoint.read_tracker(saved) == 4


def test_different_model_names_the_fields(saved):
    r = train("--steps", "6", "--load", str(saved), "--hidden-size", "48", "--memory-n-keys", "8", rc=2)
    line = one_error_line(r)
    assert "holds a different model" in line
    assert "model.hidden_size: checkpoint 32, this run 48" in line
    assert "memory.n_keys: checkpoint 16, this run 8" in line


def test_nothing_left_to_train_says_how_to_continue(saved):
    line = one_error_line(train("--steps", "4", "--load", str(saved), rc=2))
    assert "already reaches train.steps=4: raise --steps" in line and "--finetune" in line


def _copy(saved: Path, tmp: Path) -> Path:
    import shutil

    shutil.copytree(saved, tmp / "copy")
    return tmp / "copy"


def test_changed_bytes_name_the_file(saved, tmp_path):
    root = _copy(saved, tmp_path)
    shard = root / "iter_0000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = one_error_line(train("--steps", "6", "--load", str(root), rc=2))
    assert "__0_0.distcp: hash mismatch" in line and str(root / "iter_0000004") in line


def test_truncated_file_is_named_before_loading(saved, tmp_path):
    root = _copy(saved, tmp_path)
    shard = root / "iter_0000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    line = one_error_line(train("--steps", "6", "--load", str(root), rc=2))
    assert f"{shard}: truncated (1000 bytes" in line


def test_bad_tracker_and_unfinished_saves(saved, tmp_path):
    root = _copy(saved, tmp_path)
    (root / checkpoint.TRACKER).write_text("garbage\n")
    line = one_error_line(train("--steps", "6", "--load", str(root), rc=2))
    assert f"{root / checkpoint.TRACKER}: expected an iteration number" in line
    # A save killed mid-write leaves only iter_N.partial: never tracked, never loaded.
    partial_only = tmp_path / "partial"
    (partial_only / "iter_0000005.partial").mkdir(parents=True)
    line = one_error_line(train("--steps", "6", "--load", str(partial_only), rc=2))
    assert "holds no checkpoint" in line and "iter_0000005.partial" in line


def test_unfinished_save_beside_a_good_one_is_ignored(saved, tmp_path):
    root = _copy(saved, tmp_path)
    (root / "iter_0000005.partial").mkdir()
    (root / "iter_0000005.partial" / "__0_0.distcp").write_bytes(b"half written")
    r = train("--steps", "6", "--load", str(root), "--save", str(root))
    assert "loaded step 4" in r.stdout
    assert checkpoint.read_tracker(root) == 6 and not (root / "iter_0000005.partial").exists()


def _step_line(out: str, step: int, steps: int) -> str:
    """'loss ... | grad-norm ... (values ...)' of one progress line."""
    line = next(x for x in out.splitlines() if x.startswith(f"step {step:>5}/{steps}"))
    return line.split(" | ")[1] + " | " + line.split(" | ")[3]


def test_async_save_is_a_consistent_snapshot(tmp_path):
    """Background writes must capture the state of their step, not a later one: resuming from
    the async checkpoint of step 2 repeats the original run's steps 3 and 4."""
    root = tmp_path / "async"
    first = train("--steps", "4", "--save", str(root), "--save-interval", "2", "--async-save")
    assert f"staged (writing in the background) {root}/iter_0000002" in first.stdout
    assert checkpoint.read_tracker(root) == 4 and not list(root.glob("*.partial"))
    resumed = train("--steps", "4", "--load", str(root / "iter_0000002"))
    for step in (3, 4):
        assert _step_line(resumed.stdout, step, 4) == _step_line(first.stdout, step, 4)


def test_failed_start_tears_down_its_process_groups(saved, tmp_path):
    """A checkpoint error found after the process groups exist must destroy them before exit:
    gloo's worker threads left to interpreter shutdown can abort the process (exit -6, seen in
    CI) after its one error line."""
    root = _copy(saved, tmp_path)
    (root / "iter_0000004" / "__0_0.distcp").write_bytes(b"\0" * 64)
    probe = ("import sys, torch.distributed as dist\n"
             "from megatron.core import parallel_state as ps\n"
             "from megatron_memory.train import main\n"
             "rc = main(sys.argv[1:])\n"
             "print('rc', rc, 'dist', dist.is_initialized(), 'mp', ps.model_parallel_is_initialized())\n")
    r = subprocess.run([sys.executable, "-c", probe, *SMALL, "--steps", "6", "--load", str(root)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0 and "rc 2 dist False mp False" in r.stdout, r.stdout + r.stderr[-3000:]
