# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/device/longrun.py's model specs (issue 29: memory sizes, dense at equal GPU time), its
phase logic (train each model to its end or the deadline, evaluate finished ones once) and the
report's interval of a proportion; and the whole pipeline on CPU in its tiny mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
import longrun  # noqa: E402
import longrun_report  # noqa: E402


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_model_specs_set_the_table_size_and_the_schedule(tmp_path):
    plan = longrun.make_plan(tiny=False)
    models = longrun.parse_models("dense,memory,memory-k256,memory-k2048,dense-s1030", plan)
    assert [m.tag for m in models] == ["dense", "memory", "memory-k256", "memory-k2048", "dense-s1030"]
    assert [m.label for m in models] == ["dense", "Memory+ 2^20", "Memory+ 2^16", "Memory+ 2^22",
                                         "dense (1030 steps)"]
    assert [m.num_values() for m in models] == [0, 2**20, 2**16, 2**22, 0]
    run = longrun.Run(tmp_path / "state", tmp_path / "data")
    cmds = {m.tag: longrun.train_command(plan, run, m, exit_at=None) for m in models}
    assert "--memory-n-keys" not in cmds["memory"] and "--memory-n-keys" not in cmds["dense"]
    assert _flag(cmds["memory-k256"], "--memory-n-keys") == "256"
    assert _flag(cmds["memory-k2048"], "--preset") == "134m-memory"
    # dense at equal GPU time: a longer schedule of the same shape (warm-up a tenth, same lr)
    assert _flag(cmds["dense-s1030"], "--steps") == "1030"
    assert _flag(cmds["dense-s1030"], "--warmup-steps") == "103"
    assert _flag(cmds["dense"], "--steps") == "600" and _flag(cmds["dense"], "--warmup-steps") == "60"
    assert _flag(cmds["dense-s1030"], "--lr") == _flag(cmds["dense"], "--lr")
    assert _flag(cmds["dense-s1030"], "--preset") == "134m-dense"
    # each model has its own checkpoints and events
    assert _flag(cmds["memory-k256"], "--save").endswith("ckpt/memory-k256")
    assert _flag(cmds["memory-k256"], "--tensorboard-dir").endswith("tb/memory-k256")


@pytest.mark.parametrize("bad", ["dense-k256", "memory-x", "memory,memory", "", "memory-k0"])
def test_bad_model_specs_are_refused(bad):
    with pytest.raises(ValueError):
        longrun.parse_models(bad, longrun.make_plan(tiny=True))


def test_a_phase_trains_in_order_evaluates_finished_models_once_and_skips_without_time(tmp_path, monkeypatch):
    plan = longrun.make_plan(tiny=True)
    plan.budget_s, plan.reserve_s, plan.startup_s = 1000.0, 100.0, 20.0
    run = longrun.Run(tmp_path / "state", tmp_path / "data")
    run.logs.mkdir(parents=True)
    models = longrun.parse_models("dense,memory-k16", plan)
    clock = {"t": 0.0}
    monkeypatch.setattr(longrun.time, "time", lambda: clock["t"])
    calls = []

    def fake_train(plan_, run_, model, phase, deadline, exit_at=None, hard=None):
        calls.append(("train", model.tag, deadline))
        start = run_.step(model.tag)
        # dense finishes in 300 s; memory-k16 trains until the deadline and stops at step 100
        clock["t"] += 300.0 if model.kind == "dense" else deadline - clock["t"]
        end = model.steps if model.kind == "dense" else 100
        run_.ckpt(model.tag).mkdir(parents=True, exist_ok=True)
        (run_.ckpt(model.tag) / "latest_checkpointed_iteration.txt").write_text(str(end))
        return {"start": start, "end": end, "seconds": 1.0, "step_s": 0.1}

    def fake_eval(plan_, run_, model):
        calls.append(("eval", model.tag))
        clock["t"] += 50.0
        return {"questions": {"recall": 0.5, "n": 8}, "cloze": {"recall": 0.25, "n": 8}}

    monkeypatch.setattr(longrun, "train", fake_train)
    monkeypatch.setattr(longrun, "evaluate", fake_eval)
    meta = longrun.run_phase(plan, run, models, 1, 0.0, report=lambda: None)
    deadline = plan.budget_s - longrun.PHASE_RESERVE_S - longrun.DEADLINE_MARGIN_S
    assert calls == [("train", "dense", deadline), ("eval", "dense"), ("train", "memory-k16", deadline)]
    assert meta["runs"]["dense"]["recall"]["questions"]["recall"] == 0.5
    assert "recall" not in meta["runs"]["memory-k16"]
    assert json.loads(run.meta.read_text())["runs"]["memory-k16"]["phases"][0]["end"] == 100

    # phase 2: dense is done and evaluated (nothing to do), memory-k16 resumes and is evaluated
    calls.clear()
    clock["t"] = 5000.0

    def finish(plan_, run_, model, phase, deadline, exit_at=None, hard=None):
        calls.append(("train", model.tag, run_.step(model.tag)))
        (run_.ckpt(model.tag) / "latest_checkpointed_iteration.txt").write_text(str(model.steps))
        clock["t"] += 10.0
        return {"start": 100, "end": model.steps, "seconds": 10.0, "step_s": 0.1}

    monkeypatch.setattr(longrun, "train", finish)
    meta = longrun.run_phase(plan, run, models, 2, 5000.0, report=lambda: None)
    assert calls == [("train", "memory-k16", 100), ("eval", "memory-k16")]
    assert [p["phase"] for p in meta["runs"]["memory-k16"]["phases"]] == [1, 2]

    # a phase with too little time before its reserve starts no model
    calls.clear()
    clock["t"] = 9000.0
    run.ckpt("dense-s9").mkdir(parents=True)
    meta = longrun.run_phase(plan, run, longrun.parse_models("dense-s9", plan), 2,
                             9000.0 - deadline + 10, report=lambda: None)
    assert calls == []


def test_log_stats_read_rate_and_peak_memory():
    text = ("step   590/600 | loss 2.1 | lr 6e-5 |   201234 tok/s | MFU 20%\n"
            "tokens     78,643,200 in 400.1 s = 196,548 tok/s (199,875 tok/s after step 3)\n"
            "peak mem   stage 0: 41.3 GiB (calculator 40.0)\n")
    assert longrun.log_stats(text) == {"last_tok_s": 201234, "steady_tok_s": 199875, "peak_gib": 41.3}
    assert longrun.log_stats("") == {"last_tok_s": None, "steady_tok_s": None, "peak_gib": None}


def test_wilson_interval():
    lo, hi = longrun_report.wilson(0.25, 4000)
    assert lo == pytest.approx(0.23682, abs=1e-5) and hi == pytest.approx(0.26366, abs=1e-5)
    assert longrun_report.wilson(0.0, 1000)[0] == 0.0 and longrun_report.wilson(0.0, 1000)[1] > 0
    assert longrun_report.pct_ci(0.5, 100).startswith("50.00% [40.")


@pytest.mark.skipif(not os.environ.get("LONGRUN_TINY_DATA"),
                    reason="minutes of CPU and a data folder: LONGRUN_TINY_DATA=build/longrun-data-debian-pf12")
def test_tiny_pipeline_on_cpu(tmp_path):
    """Both phases of device/longrun.sh in tiny mode on a built long-run data folder: a
    2^8-value Memory+ (n_keys 16) and dense on a longer schedule; the first finishes and is
    scored, the second is stopped at each phase's deadline and resumed; the results come back as
    one archive and a summary."""
    env = {**os.environ, "LONGRUN_TINY": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "LONGRUN_DIR": str(tmp_path / "state"), "LONGRUN_RESULTS": str(tmp_path / "res"),
           "LONGRUN_DATA": os.environ["LONGRUN_TINY_DATA"], "LONGRUN_STEPS": "8",
           "LONGRUN_BUDGET_S": os.environ.get("LONGRUN_TINY_BUDGET_S", "300"),
           "LONGRUN_RESERVE_S": "60", "LONGRUN_EVAL_LIMIT": "16"}
    (tmp_path / "out").mkdir()
    for phase in ("1", "2"):
        proc = subprocess.run(["bash", "benchmarks/device/longrun.sh", phase, "memory-k16,dense-s3000"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (tmp_path / "out" / f"longrun_phase{phase}.tgz").is_file()
        summary = (tmp_path / "out" / f"longrun_phase{phase}.md").read_text()
        assert "Memory+ 2^8" in summary and "dense (3000 steps)" in summary
    meta = json.loads((tmp_path / "state" / "state.json").read_text())
    # 8 steps: finished and scored (in phase 1 unless this machine is very slow)
    assert meta["runs"]["memory-k16"]["recall"]["questions"]["n"] == 16
    assert "n_by_attribute" in meta["runs"]["memory-k16"]["recall"]["questions"]
    dense = meta["runs"]["dense-s3000"]["phases"]
    assert dense[-1]["phase"] == 2 and 0 < dense[-1]["end"] < 3000  # stopped by the deadline
    if len(dense) == 2:  # trained in both phases: phase 2 resumed where phase 1 stopped
        assert dense[1]["start"] == dense[0]["end"] > 0
    assert "held-out recall" in summary and "%" in summary.split("Memory+ 2^8 | 256 |")[1].split("\n")[0]
