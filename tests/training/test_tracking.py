# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Logging: per-run TensorBoard directories with scalars, key-usage histograms per memory layer
and the config as text; periodic validation (--eval-interval); W&B through a stand-in module."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from megatron_memory.training.metrics import USAGE_BUCKETS, KeyUsage, usage_histogram

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for the wandb package: records every call as a JSON line.
FAKE_WANDB = '''
import json, os
def _rec(kind, **kw):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"call": kind, **kw}, default=str) + "\\n")
class Histogram:
    def __init__(self, np_histogram):
        self.counts, self.edges = np_histogram
    def __repr__(self):
        return f"Histogram({list(self.counts)}, {list(self.edges)})"
def init(project=None, name=None, dir=None, config=None):
    _rec("init", project=project, name=name, dir=dir, config=config)
def log(data, step=None):
    _rec("log", step=step, data={k: (v if isinstance(v, (int, float)) else repr(v)) for k, v in data.items()})
def finish():
    _rec("finish")
'''


def test_usage_histogram_buckets():
    counts = torch.tensor([0, 0, 1, 2, 3, 4, 7, 8, 100])
    h = usage_histogram(counts)
    assert h.shape == (USAGE_BUCKETS + 4,)
    # never: 2; 1: one; 2-3: two; 4-7: two; 8-15: one; 64-127: one
    assert h[:8].tolist() == [2, 1, 2, 2, 1, 0, 0, 1] and h[:USAGE_BUCKETS].sum() == 9
    assert h[USAGE_BUCKETS:].tolist() == [0, 100, 125, float((counts.double() ** 2).sum())]
    usage = KeyUsage(16, "cpu")
    usage.update(torch.tensor([[1, 1, 2]]))
    assert usage.summarize().fraction == 2 / 16  # the histogram is kept for the tracker, counts reset
    assert usage.last_histogram[:3].tolist() == [14, 1, 1] and usage.counts.sum() == 0


def _events(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"histograms": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_run_logs_per_run_dir_histograms_config_validation_and_wandb(tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]),
           "FAKE_WANDB_LOG": str(tmp_path / "wandb.jsonl")}
    r = subprocess.run([sys.executable, "-m", "megatron_memory.train", "--num-layers", "4", "--hidden-size", "64",
                        "--memory-layers", "1", "3", "--train-iters", "6", "--log-interval", "3",
                        "--eval-interval", "3", "--eval-iters", "2", "--micro-batch-size", "4",
                        "--wandb-project", "proj"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"step\s+3/6 \| validation loss\s+[\d.]+", r.stdout)  # periodic, then the final one
    assert re.search(r"validation [\d.]+\ntokens", r.stdout)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{8}-\d{6}", runs[0].name)  # runs/<date-time>
    assert f"tensorboard {Path('runs') / runs[0].name}" in r.stdout
    acc = _events(runs[0])
    tags = acc.Tags()
    assert {"train/loss", "valid/loss", "memory/keys_used_layer1", "memory/keys_used_layer3"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("valid/loss")] == [3, 6]
    for layer in (1, 3):
        hists = acc.Histograms(f"memory/key_selections_layer{layer}")
        assert [h.step for h in hists] == [3, 6]
        h = hists[0].histogram_value
        # every value counted once; selections = tokens x heads x k over the first window of 3 steps
        assert h.num == 4096 and h.sum == 3 * 4 * 128 * 4 * 8
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| train.eval_interval | `3` |" in text and "| memory.layers | `[1, 3]` |" in text
    calls = [json.loads(line) for line in (tmp_path / "wandb.jsonl").read_text().splitlines()]
    assert calls[0]["call"] == "init" and calls[0]["project"] == "proj" and calls[0]["name"] == runs[0].name
    assert calls[0]["config"]["train"]["steps"] == 6 and calls[-1]["call"] == "finish"
    logged = {(c["step"], k) for c in calls if c["call"] == "log" for k in c["data"]}
    assert {(3, "train/loss"), (3, "valid/loss"), (6, "valid/loss"), (6, "memory/key_selections_layer3")} <= logged
