# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""134M dense vs Memory+ on the same tokens, over two device calls on one warm machine (issue 14).

    python3 benchmarks/device/longrun.py --phase 1 --out $OUT     # train both, checkpoints in /tmp/longrun
    python3 benchmarks/device/longrun.py --phase 2 --out $OUT     # resume both to the end, export, recall
    (benchmarks/device/longrun.sh PHASE wraps this for a device call; LONGRUN_TINY=1: CPU check)

A 134M + 2^20-value checkpoint is ~11 GB with its Adam state: it cannot travel between device
calls (carried folders are limited to 64 MiB), so phase 2 must run on the machine phase 1 left
warm; without /tmp/longrun's checkpoints it says so and starts over.

Equal tokens under an unknown speed: every phase trains Memory+ (the slower model) first until a
deadline (a stop file the trainer polls each step: it finishes the step, saves, exits 0), then
dense to exactly the step Memory+ reached (``--exit-interval``). Both use ``--steps`` = the whole
run's steps, so the cosine schedule is the whole run's whichever phase a step falls in. Phase 1
gives Memory+ a fixed share of the time left; phase 2 splits by the per-step times phase 1
measured. Each phase's summary (markdown), TensorBoard events, logs and, when matplotlib is
there, PNGs go to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from megatron_memory.configs.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("memory", "dense")  # this order: the slower one sets the step both reach


@dataclasses.dataclass
class Plan:
    """What one long run trains; GPU defaults, LONGRUN_* environment variables override."""

    presets: dict            # {"memory": preset, "dense": preset}
    steps: int               # whole run (schedule length)
    micro_batch: int         # samples of seq_length per micro-batch
    global_batch: int        # samples per step
    lr: float                # peak lr of the dense parameters (values: x value_lr_mult)
    log_interval: int        # steps per progress line / key-usage window
    eval_interval: int       # steps between validations (the equal-token loss points)
    budget_s: float          # wall seconds of one device call this script may use (from its start)
    reserve_s: float         # seconds kept in phase 2 for export, recall and summary
    startup_s: float         # assumed start-up + save of one training process
    memory_share: float      # phase 1: share of the training time given to Memory+
    eval_limit: int          # questions (and cloze probes) scored per model
    extra: list              # extra training flags
    device: str              # for the recall evaluation
    gpus: int = 1            # data-parallel ranks per training process (torchrun when > 1)


def make_plan(tiny: bool) -> Plan:
    env = os.environ.get
    if tiny:  # CPU check of the whole pipeline: tiny models (seq 128), a budget so short that
        # phase 1 stops Memory+ by its deadline (~150 of 300 steps) and phase 2 finishes; 20k-token
        # key-usage spans so that several complete
        plan = Plan({"memory": "tiny", "dense": "tiny-dense"}, steps=300, micro_batch=2,
                    global_batch=4, lr=3e-3, log_interval=10, eval_interval=50, budget_s=240,
                    reserve_s=80, startup_s=20, memory_share=0.2, eval_limit=64,
                    extra=["--eval-iters", "2", "--key-usage-span-tokens", "20000"], device="cpu")
    else:
        # Arithmetic (H100/H200, bf16): 134m-dense trains 0.661 GFLOP/token, so ~25% MFU is
        # ~375k tok/s; Memory+ (3 memory layers at d=768: ~2 us/token of search + lookup +
        # ~20 ms per step of the 805M-value table's Adam) is guessed at ~200k tok/s. One call of
        # 560 s leaves ~250 s of Memory+ training in phase 1 and ~170 s in phase 2 (minus
        # start-ups, saves and phase 2's export/recall): ~420 s x 200k = 84M tokens. 600 steps of
        # 64 x 2048 = 131k tokens = 78.6M tokens. If Memory+ is slower the run ends before the
        # schedule does (the summary says so); both models still end at the same step.
        # Micro-batch 16 x 2048: ~17 GB of weights/grads/Adam (table 805M params) plus ~15 GB
        # of activations: safe on an 80 GB H100. lr 6e-4: GPT-3 125M's, for a short run.
        plan = Plan({"memory": "134m-memory", "dense": "134m-dense"}, steps=600, micro_batch=16,
                    global_batch=64, lr=6e-4, log_interval=10, eval_interval=50, budget_s=560,
                    reserve_s=150, startup_s=60, memory_share=0.6, eval_limit=4000,
                    extra=["--eval-iters", "4"], device="cuda")
    for name, cast in (("steps", int), ("micro_batch", int), ("global_batch", int), ("lr", float),
                       ("budget_s", float), ("reserve_s", float), ("memory_share", float),
                       ("eval_limit", int), ("gpus", int)):
        if env(f"LONGRUN_{name.upper()}"):
            setattr(plan, name, cast(env(f"LONGRUN_{name.upper()}")))
    return plan


class Run:
    """Paths of one long run under STATE (default /tmp/longrun)."""

    def __init__(self, state: Path, data: Path):
        self.state, self.data = state, data
        self.ckpt = {m: state / "ckpt" / m for m in MODELS}
        self.tb = {m: state / "tb" / m for m in MODELS}
        self.logs = state / "logs"
        self.meta = state / "state.json"

    def step(self, model: str) -> int:
        tracker = self.ckpt[model] / "latest_checkpointed_iteration.txt"
        return int(tracker.read_text().strip()) if tracker.is_file() else 0

    def load_meta(self) -> dict:
        return json.loads(self.meta.read_text()) if self.meta.is_file() else {}


def train_command(plan: Plan, run: Run, model: str, exit_at: int | None) -> list[str]:
    # Several GPUs: data parallel through the project's launcher (same global batch and schedule,
    # so the run is the same run, only faster); one GPU or CPU: a plain process.
    launch = ([sys.executable, "-m", "megatron_memory.launch.run", "torchrun", "--nproc-per-node",
               str(plan.gpus), "--"] if plan.gpus > 1 else [sys.executable, "-m", "megatron_memory.train"])
    cmd = [*launch, "--preset", plan.presets[model],
           "--data-path", str(run.data / "train_document"),
           "--tokenizer", str(run.data / "tokenizer.json"), "--cache-dir", str(run.state / "cache"),
           "--steps", str(plan.steps), "--micro-batch-size", str(plan.micro_batch),
           "--global-batch-size", str(plan.global_batch), "--lr", str(plan.lr),
           "--min-lr", str(plan.lr / 10), "--warmup-steps", str(max(1, plan.steps // 10)),
           "--log-interval", str(plan.log_interval), "--eval-interval", str(plan.eval_interval),
           "--tensorboard-dir", str(run.tb[model]), "--save", str(run.ckpt[model]),
           "--keep-last", "1", "--no-checkpoint-integrity", *plan.extra]
    if run.step(model):
        cmd += ["--load", str(run.ckpt[model])]
    if exit_at is not None and exit_at < plan.steps:
        cmd += ["--exit-interval", str(exit_at)]
    return cmd


# A run this close to its target at its deadline finishes instead of stopping (if it can before
# the hard deadline): run 18's phase 1 stopped Memory+ at step 593 of 600, and the next call spent
# 140 s of device time (start-up, load, save) on the last 7 steps.
FINISH_S = 30


def extension(step: int, target: int, step_s: Optional[float], now: float, hard: float) -> float:
    """Seconds to let a run go on past its deadline: its remaining steps' time (plus 5 s) when
    that is at most FINISH_S and ends before ``hard``; else 0 (stop now)."""
    if step_s is None or step >= target:
        return 0.0
    need = (target - step) * step_s + 5.0
    return need if need <= FINISH_S and now + need < hard else 0.0


def train(plan: Plan, run: Run, model: str, phase: int, deadline: float, exit_at=None,
          hard: Optional[float] = None) -> dict:
    """Train ``model`` until the run's end, step ``exit_at`` or ``deadline`` (epoch seconds: the
    stop file appears, the trainer saves and exits; a run a few steps from its end at the deadline
    finishes if that ends before ``hard``, see ``extension``). Returns what the phase did."""
    start_step = run.step(model)
    target = exit_at or plan.steps
    if start_step >= target:
        print(f"[longrun] {model}: already at step {start_step} (target {target})", flush=True)
        return {"start": start_step, "end": start_step, "seconds": 0.0, "step_s": None}
    stop = run.state / f"stop.{model}"
    stop.unlink(missing_ok=True)
    env = {**os.environ, "MEGATRON_MEMORY_STOP_FILE": str(stop)}
    seen = {"step": start_step, "t": None, "step_s": None}  # from the progress lines

    def at_deadline():
        more = extension(seen["step"], target, seen["step_s"], time.time(), hard or deadline)
        if more:
            print(f"[longrun] {model}: step {seen['step']} of {target} at the deadline: finishing "
                  f"(~{more:.0f} s)", flush=True)
        timers.append(threading.Timer(more, stop.touch))
        timers[-1].daemon = True
        timers[-1].start()

    timers = [threading.Timer(max(0.0, deadline - time.time()), at_deadline)]
    timers[0].daemon = True
    log = run.logs / f"{model}.phase{phase}.log"
    cmd = train_command(plan, run, model, exit_at)
    print(f"[longrun] {model}: step {start_step} -> {target}, stop at "
          f"{time.strftime('%H:%M:%S', time.localtime(deadline))}\n  {' '.join(cmd)}", flush=True)
    t0 = time.time()
    timers[0].start()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if m := re.match(r"step\s+(\d+)/", line):
                now, step = time.time(), int(m.group(1))
                if seen["t"] is not None and step > seen["step"]:
                    seen["step_s"] = (now - seen["t"]) / (step - seen["step"])
                seen.update(step=step, t=now)
            if re.match(r"(step |built |loaded |saved |stopping |error|Traceback)", line) or \
                    "Error" in line:
                print(f"  [{model}] {line.rstrip()[:220]}", flush=True)
    proc.wait()
    for t in list(timers):  # the deadline's and an extension's
        t.cancel()
    seconds = time.time() - t0
    if proc.returncode:
        sys.exit(f"[longrun] {model} training failed (exit {proc.returncode}); log: {log}")
    end = run.step(model)
    rates = re.findall(r"\|\s+(\d+) tok/s", log.read_text())
    tokens_per_step = plan.global_batch * get_preset(plan.presets[model]).model.seq_length
    step_s = tokens_per_step / int(rates[-1]) if rates and int(rates[-1]) else None
    return {"start": start_step, "end": end, "seconds": seconds, "step_s": step_s}


# Phase 1 keeps this much of its budget for the saves after the stop, the summary and the PNGs
# (run 11: with 10 s the phase took 326 s of a 310 s budget).
PHASE1_RESERVE_S = 45


def train_phase(plan: Plan, run: Run, phase: int, t0: float) -> dict:
    """Memory+ to a deadline, then dense to the same step; returns {model: result}."""
    meta = run.load_meta()
    reserve = plan.reserve_s if phase == 2 else PHASE1_RESERVE_S
    left = t0 + plan.budget_s - reserve - time.time()
    window = max(0.0, left - 2 * plan.startup_s)
    share = plan.memory_share
    prev = meta.get("step_s", {})
    if phase == 2 and prev.get("memory") and prev.get("dense"):
        share = prev["memory"] / (prev["memory"] + prev["dense"])  # equal steps take this share
    mem_deadline = time.time() + plan.startup_s + share * window
    hard = t0 + plan.budget_s - reserve - 10
    done = {"memory": train(plan, run, "memory", phase, mem_deadline, hard=hard)}
    target = run.step("memory")
    done["dense"] = train(plan, run, "dense", phase, hard, exit_at=target)
    meta.setdefault("phases", []).append({"phase": phase, **done})
    meta["step_s"] = {m: done[m]["step_s"] or prev.get(m) for m in MODELS}
    run.meta.write_text(json.dumps(meta, indent=2))
    return done


def evaluate(plan: Plan, run: Run) -> dict:
    """Export both checkpoints (to-hf) and score recall of the held-out questions and the cloze
    probes; {model: {"questions": {...}, "cloze": {...}}}."""
    out = {}
    for model in MODELS:
        hf = run.state / "hf" / model
        shutil.rmtree(hf, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "megatron_memory.tools.convert_checkpoint", "to-hf",
                        str(run.ckpt[model]), str(hf), "--no-verify"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        out[model] = {}
        for name in ("questions", "cloze"):
            proc = subprocess.run(
                [sys.executable, "-m", "megatron_memory.tools.fact_recall", "evaluate",
                 "--checkpoint", str(hf), "--questions", str(run.data / f"{name}.jsonl"),
                 "--limit", str(plan.eval_limit), "--batch", "64", "--device", plan.device],
                cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"[longrun] recall of {model} failed: {proc.stderr[-2000:]}")
            out[model][name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[longrun] {model} {name}: {out[model][name]}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", type=int, choices=(1, 2), required=True)
    p.add_argument("--out", type=Path, required=True, help="where summary, logs, events and PNGs go")
    p.add_argument("--data", type=Path, default=ROOT / "build" / "longrun-data")
    p.add_argument("--state", type=Path, default=Path(os.environ.get("LONGRUN_DIR", "/tmp/longrun")))
    args = p.parse_args()
    t0 = float(os.environ.get("LONGRUN_T0", time.time()))
    plan = make_plan(os.environ.get("LONGRUN_TINY") == "1")
    missing = [f for f in ("train_document.bin", "train_document.idx", "tokenizer.json",
                           "questions.jsonl", "cloze.jsonl") if not (args.data / f).is_file()]
    if missing:
        print(f"error: {args.data} lacks {', '.join(missing)}: build it with "
              "bash benchmarks/device/longrun_data.sh and carry build/longrun-data", file=sys.stderr)
        return 2
    run = Run(args.state, args.data)
    if args.phase == 1 and args.state.exists():
        print(f"[longrun] phase 1: removing the earlier run in {args.state}", flush=True)
        shutil.rmtree(args.state)
    if args.phase == 2 and not (run.step("memory") and run.step("dense")):
        print(f"[longrun] phase 2: no checkpoints of phase 1 in {args.state} (a fresh machine?): "
              "starting over; this call trains from step 0", flush=True)
        shutil.rmtree(args.state, ignore_errors=True)
    run.logs.mkdir(parents=True, exist_ok=True)
    train_phase(plan, run, args.phase, t0)
    # Function-local: the summary imports the plot tool's event reader (tensorboard).
    sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
    from longrun_report import write_report

    # Phase 1 evaluates too when both models finished the schedule (several GPUs per model); the
    # training summary is written first, so a call cut off while evaluating keeps it, and phase 2
    # (both already at the end) then only evaluates.
    recall = None
    if args.phase == 2 or all(run.step(m) >= plan.steps for m in MODELS):
        write_report(plan, run, args.out, args.phase, None)
        recall = evaluate(plan, run)
    write_report(plan, run, args.out, args.phase, recall)
    print(f"[longrun] phase {args.phase} done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
