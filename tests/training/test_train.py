# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The main job, end to end in a subprocess: Megatron schedule on CPU/gloo, loss falls,
TensorBoard events and a checkpoint appear, and the checkpoint loads back."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def train(*args: str, timeout: int = 600) -> str:
    r = subprocess.run([sys.executable, "-m", "megatron_memory.train", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def losses(out: str) -> tuple[float, float, float]:
    m = re.search(r"loss\s+([\d.]+) \(first 5 steps\) -> ([\d.]+) \(last 10 steps\), validation ([\d.]+)", out)
    assert m, out
    return tuple(float(x) for x in m.groups())


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = train("--steps", "60", "--log-interval", "20", "--tensorboard-dir", str(tmp / "tb"),
                "--save", str(tmp / "ckpt"))
    return out, tmp


def test_short_training_lowers_the_loss(short_run):
    out, tmp = short_run
    first, last, valid = losses(out)
    assert first > 6.0            # ~ln(1024) at init
    assert last < first - 2.5     # learns well within 60 steps
    assert valid < first - 2.5
    assert re.search(r"step\s+60/60 \| loss .* tok/s \| keys L1 \d+/\d+/\d+% s[.\d]+ L3 .* L5 .* \| "
                     r"elapsed .* \| ETA", out)
    assert "memory layers [1, 3, 5]" in out
    assert re.search(r"key usage  layer 1: \d+% of values used \(effective \d+%, \d+% over 61,440 "
                     r"tokens, input shared [.\d]+\)", out)
    assert list((tmp / "tb").glob("events.out.tfevents.*"))


def test_plot_run_turns_the_events_into_pngs(short_run, tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_memory.tools import plot_run

    _, tmp = short_run
    scalars = plot_run.read_scalars(tmp / "tb")
    for stat in ("keys_used", "effective_usage", "cumulative", "input_shared", "query_shared"):
        series = plot_run.layer_series(scalars, stat)
        assert sorted(series) == [1, 3, 5] and [s for s, _ in series[1]] == [20, 40, 60], stat
        assert all(0.0 <= v <= 1.0 for _, v in series[5])
    assert plot_run.main([str(tmp / "tb"), "--out", str(tmp_path / "png")]) == 0
    for name in ("loss.png", "key_usage.png", "shared.png"):
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_run.main([str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


def test_checkpoint_loads_and_refuses_overwrite(short_run):
    out, tmp = short_run
    _, last, _ = losses(out)
    # Loading the trained weights: a few more steps start near the trained loss, not at ~7.
    resumed = train("--steps", "5", "--log-interval", "5", "--tensorboard-dir", "", "--load", str(tmp / "ckpt"),
                    "--finetune")
    first_resumed, _, _ = losses(resumed)
    assert first_resumed < last + 1.0
    r = subprocess.run([sys.executable, "-m", "megatron_memory.train", "--steps", "2",
                        "--tensorboard-dir", "", "--save", str(tmp / "ckpt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "not empty; refusing to overwrite" in r.stderr
