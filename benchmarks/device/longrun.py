# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""134M long runs (issues 14, 29): any list of models on the same data, over device calls on one
warm machine.

    python3 benchmarks/device/longrun.py --phase 1 --out $OUT [--models dense,memory]   # from step 0
    python3 benchmarks/device/longrun.py --phase 2 --out $OUT [--models ...]            # resume, evaluate
    (benchmarks/device/longrun.sh PHASE wraps this for a device call; LONGRUN_TINY=1: CPU check)

Models (``--models`` or LONGRUN_MODELS, comma-separated, trained in this order):
  dense            the dense preset (134m-dense), the plan's schedule (600 steps)
  memory           Memory+ (134m-memory: 2^20 values, n_keys 1024)
  memory-k<N>      Memory+ with --memory-n-keys N (N^2 values: k256 = 2^16, k2048 = 2^22)
  <model>-s<S>     that model on an S-step schedule (same shape: cosine, warm-up S/10, same lr):
                   dense-s1030 is dense at (about) Memory+'s GPU time when Memory+ trains at
                   600/1030 of dense's tokens per second
The default, ``memory,dense``, is issue 14's pair. A model's checkpoints, events and logs are named
by its spec (/tmp/longrun/ckpt/memory-k256), so runs of different models can share one state.

Each phase trains the listed models in order, each to the end of its schedule or to the phase's
deadline (~60 s before the budget's end: a stop file the trainer polls each step; it finishes the
step, saves, exits 0). A model that reaches the end of its schedule is exported and scored
(held-out questions and cloze, tools/fact_recall.py) at once if the call still has its reserve, so
each finished run's results come back in the call that finished it; a later model only gets the
time left. A
134M + 2^20-value checkpoint is ~11 GB with its Adam state: it cannot travel between calls (carried
folders are limited to 64 MiB), so a phase 2 that resumes must run on the machine phase 1 left
warm; without the checkpoints it says so and starts over. Each phase's summary (markdown: losses,
key usage, recall with 95% intervals, tok/s, peak memory), TensorBoard events, logs and PNGs go to
--out.
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
DEFAULT_MODELS = "memory,dense"


@dataclasses.dataclass
class Plan:
    """What one long run trains; GPU defaults, LONGRUN_* environment variables override."""

    presets: dict            # {"memory": preset, "dense": preset}: the base of each model spec
    steps: int               # a model's schedule length unless its spec says -s<S>
    micro_batch: int         # samples of seq_length per micro-batch
    global_batch: int        # samples per step
    lr: float                # peak lr of the dense parameters (values: x value_lr_mult)
    log_interval: int        # steps per progress line / key-usage window
    eval_interval: int       # steps between validations (the equal-token loss points)
    budget_s: float          # wall seconds of one device call this script may use (from its start)
    reserve_s: float         # seconds a finished model's export and recall may take
    startup_s: float         # assumed start-up + save of one training process
    memory_share: float      # (unused since issue 29; kept for LONGRUN_MEMORY_SHARE)
    eval_limit: int          # questions (and cloze probes) scored per model
    extra: list              # extra training flags
    device: str              # for the recall evaluation
    gpus: int = 1            # data-parallel ranks per training process (torchrun when > 1)
    models: str = DEFAULT_MODELS  # model specs, see the module's docstring


def make_plan(tiny: bool) -> Plan:
    env = os.environ.get
    if tiny:  # CPU check of the whole pipeline: tiny models (seq 128), a budget so short that
        # phase 1 stops its last model by the deadline and phase 2 finishes; 20k-token key-usage
        # spans so that several complete
        plan = Plan({"memory": "tiny", "dense": "tiny-dense"}, steps=300, micro_batch=2,
                    global_batch=4, lr=3e-3, log_interval=10, eval_interval=50, budget_s=240,
                    reserve_s=40, startup_s=20, memory_share=0.2, eval_limit=64,
                    extra=["--eval-iters", "2", "--key-usage-span-tokens", "20000"], device="cpu")
    else:
        # Arithmetic (H100/H200, bf16): 134m-dense trains 0.661 GFLOP/token; run 15 measured
        # 340k tok/s dense and ~197k Memory+ (2^20 values) on one H100, so 600 steps of 64 x 2048
        # (78.6M tokens) take ~230 s dense and ~400 s Memory+: one call (560 s) holds dense with
        # its export and recall plus the start of a Memory+ run, which the next call finishes.
        # Micro-batch 16 x 2048: ~17 GB of weights/grads/Adam (table 805M params) plus ~15 GB
        # of activations: safe on an 80 GB H100. lr 6e-4: GPT-3 125M's, for a short run.
        plan = Plan({"memory": "134m-memory", "dense": "134m-dense"}, steps=600, micro_batch=16,
                    global_batch=64, lr=6e-4, log_interval=10, eval_interval=50, budget_s=560,
                    reserve_s=120, startup_s=60, memory_share=0.6, eval_limit=4000,
                    extra=["--eval-iters", "4"], device="cuda")
    for name, cast in (("steps", int), ("micro_batch", int), ("global_batch", int), ("lr", float),
                       ("budget_s", float), ("reserve_s", float), ("memory_share", float),
                       ("eval_limit", int), ("gpus", int), ("models", str)):
        if env(f"LONGRUN_{name.upper()}"):
            setattr(plan, name, cast(env(f"LONGRUN_{name.upper()}")))
    return plan


@dataclasses.dataclass(frozen=True)
class Model:
    """One run of a long run: a spec (its name everywhere), preset, schedule and extra flags."""

    tag: str
    kind: str                # "memory" or "dense"
    preset: str
    steps: int
    n_keys: Optional[int]    # --memory-n-keys, None: the preset's
    flags: tuple = ()

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense" + (f" ({self.steps} steps)" if "-s" in self.tag else "")
        cfg = get_preset(self.preset)
        n = (self.n_keys or cfg.memory.n_keys) ** 2
        return f"Memory+ 2^{n.bit_length() - 1}" + (f" ({self.steps} steps)" if "-s" in self.tag else "")

    def num_values(self) -> int:
        return 0 if self.kind == "dense" else (self.n_keys or get_preset(self.preset).memory.n_keys) ** 2


SPEC = re.compile(r"(?P<kind>memory|dense)(?:-k(?P<keys>\d+))?(?:-s(?P<steps>\d+))?")


def parse_models(specs: str, plan: Plan) -> list[Model]:
    """``memory,memory-k256,dense,dense-s1030`` -> Models (see the module's docstring)."""
    out = []
    for spec in (s.strip() for s in specs.split(",") if s.strip()):
        m = SPEC.fullmatch(spec)
        if not m:
            raise ValueError(f"model spec {spec!r}: expected memory, memory-k<N>, dense, with an "
                             "optional -s<steps>")
        if m["keys"] and m["kind"] == "dense":
            raise ValueError(f"model spec {spec!r}: a dense model has no memory keys")
        keys = int(m["keys"]) if m["keys"] else None
        steps = int(m["steps"]) if m["steps"] else plan.steps
        if steps < 1 or (keys is not None and keys < 1):
            raise ValueError(f"model spec {spec!r}: steps and n_keys must be >= 1")
        flags = ("--memory-n-keys", str(keys)) if keys else ()
        out.append(Model(spec, m["kind"], plan.presets[m["kind"]], steps, keys, flags))
    if len({m.tag for m in out}) != len(out):
        raise ValueError(f"models {specs!r}: a spec is listed twice")
    if not out:
        raise ValueError("no models given")
    return out


class Run:
    """Paths of one long run under STATE (default /tmp/longrun); per model, named by its spec."""

    def __init__(self, state: Path, data: Path):
        self.state, self.data = state, data
        self.logs = state / "logs"
        self.meta = state / "state.json"

    def ckpt(self, tag: str) -> Path:
        return self.state / "ckpt" / tag

    def tb(self, tag: str) -> Path:
        return self.state / "tb" / tag

    def step(self, tag: str) -> int:
        tracker = self.ckpt(tag) / "latest_checkpointed_iteration.txt"
        return int(tracker.read_text().strip()) if tracker.is_file() else 0

    def load_meta(self) -> dict:
        return json.loads(self.meta.read_text()) if self.meta.is_file() else {}

    def save_meta(self, meta: dict) -> None:
        self.meta.write_text(json.dumps(meta, indent=2))


def train_command(plan: Plan, run: Run, model: Model, exit_at: int | None) -> list[str]:
    # Several GPUs: data parallel through the project's launcher (same global batch and schedule,
    # so the run is the same run, only faster); one GPU or CPU: a plain process.
    launch = ([sys.executable, "-m", "megatron_memory.launch.run", "torchrun", "--nproc-per-node",
               str(plan.gpus), "--"] if plan.gpus > 1 else [sys.executable, "-m", "megatron_memory.train"])
    cmd = [*launch, "--preset", model.preset,
           "--data-path", str(run.data / "train_document"),
           "--tokenizer", str(run.data / "tokenizer.json"), "--cache-dir", str(run.state / "cache"),
           "--steps", str(model.steps), "--micro-batch-size", str(plan.micro_batch),
           "--global-batch-size", str(plan.global_batch), "--lr", str(plan.lr),
           "--min-lr", str(plan.lr / 10), "--warmup-steps", str(max(1, model.steps // 10)),
           "--log-interval", str(plan.log_interval), "--eval-interval", str(plan.eval_interval),
           "--tensorboard-dir", str(run.tb(model.tag)), "--save", str(run.ckpt(model.tag)),
           "--keep-last", "1", "--no-checkpoint-integrity", *model.flags, *plan.extra]
    if run.step(model.tag):
        cmd += ["--load", str(run.ckpt(model.tag))]
    if exit_at is not None and exit_at < model.steps:
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


def log_stats(text: str) -> dict:
    """What a training log printed: the last progress line's tok/s, the summary's steady tok/s
    ("after step 3") and peak GiB (max over stages)."""
    rates = re.findall(r"\|\s+(\d+) tok/s", text)
    steady = re.findall(r"\(([\d,]+) tok/s after step 3\)", text)
    peaks = [float(g) for line in re.findall(r"^peak mem\s+(.*)$", text, re.M)
             for g in re.findall(r"stage \d+: ([\d.]+) GiB", line)]
    return {"last_tok_s": int(rates[-1]) if rates else None,
            "steady_tok_s": int(steady[-1].replace(",", "")) if steady else None,
            "peak_gib": max(peaks) if peaks else None}


def train(plan: Plan, run: Run, model: Model, phase: int, deadline: float, exit_at=None,
          hard: Optional[float] = None) -> dict:
    """Train ``model`` until the end of its schedule, step ``exit_at`` or ``deadline`` (epoch
    seconds: the stop file appears, the trainer saves and exits; a run a few steps from its end at
    the deadline finishes if that ends before ``hard``, see ``extension``). Returns what the phase
    did."""
    tag = model.tag
    start_step = run.step(tag)
    target = exit_at or model.steps
    if start_step >= target:
        print(f"[longrun] {tag}: already at step {start_step} (target {target})", flush=True)
        return {"start": start_step, "end": start_step, "seconds": 0.0, "step_s": None}
    stop = run.state / f"stop.{tag}"
    stop.unlink(missing_ok=True)
    env = {**os.environ, "MEGATRON_MEMORY_STOP_FILE": str(stop)}
    seen = {"step": start_step, "t": None, "step_s": None}  # from the progress lines

    def at_deadline():
        more = extension(seen["step"], target, seen["step_s"], time.time(), hard or deadline)
        if more:
            print(f"[longrun] {tag}: step {seen['step']} of {target} at the deadline: finishing "
                  f"(~{more:.0f} s)", flush=True)
        timers.append(threading.Timer(more, stop.touch))
        timers[-1].daemon = True
        timers[-1].start()

    timers = [threading.Timer(max(0.0, deadline - time.time()), at_deadline)]
    timers[0].daemon = True
    log = run.logs / f"{tag}.phase{phase}.log"
    cmd = train_command(plan, run, model, exit_at)
    print(f"[longrun] {tag}: step {start_step} -> {target}, stop at "
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
            if re.match(r"(step |built |loaded |saved |stopping |error|Traceback|peak mem|tokens )",
                        line) or "Error" in line:
                print(f"  [{tag}] {line.rstrip()[:220]}", flush=True)
    proc.wait()
    for t in list(timers):  # the deadline's and an extension's
        t.cancel()
    seconds = time.time() - t0
    if proc.returncode:
        sys.exit(f"[longrun] {tag} training failed (exit {proc.returncode}); log: {log}")
    end = run.step(tag)
    stats = log_stats(log.read_text())
    tokens_per_step = plan.global_batch * get_preset(model.preset).model.seq_length
    rate = stats["steady_tok_s"] or stats["last_tok_s"]
    step_s = tokens_per_step / rate if rate else None
    return {"start": start_step, "end": end, "seconds": seconds, "step_s": step_s, **stats}


# Kept after a training deadline for the save after the stop, the summary and the PNGs (run 11:
# with 10 s the phase took 326 s of a 310 s budget; an 805M-value checkpoint saves in ~20-30 s).
# A model a few steps from its end at the deadline may finish until PHASE_RESERVE_S before the
# end (``extension``). A model at its end is evaluated while at least plan.reserve_s is left.
PHASE_RESERVE_S = 45
DEADLINE_MARGIN_S = 15


def evaluate(plan: Plan, run: Run, model: Model) -> dict:
    """Export the model's checkpoint (to-hf) and score recall of the held-out questions and the
    cloze probes: {"questions": {...}, "cloze": {...}}."""
    hf = run.state / "hf" / model.tag
    shutil.rmtree(hf, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "megatron_memory.tools.convert_checkpoint", "to-hf",
                    str(run.ckpt(model.tag)), str(hf), "--no-verify"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    out = {}
    for name in ("questions", "cloze"):
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_memory.tools.fact_recall", "evaluate",
             "--checkpoint", str(hf), "--questions", str(run.data / f"{name}.jsonl"),
             "--limit", str(plan.eval_limit), "--batch", "64", "--device", plan.device],
            cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"[longrun] recall of {model.tag} failed: {proc.stderr[-2000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[longrun] {model.tag} {name}: {out[name]}", flush=True)
    shutil.rmtree(hf, ignore_errors=True)  # an 805M-value export is ~1.6 GB of /tmp
    out["seconds"] = round(time.time() - t0, 1)
    return out


def run_phase(plan: Plan, run: Run, models: list[Model], phase: int, t0: float, report) -> dict:
    """Train each model in order to its end or the phase's deadline; evaluate each model that
    is at its end and has no recall yet, while the budget still holds ``plan.reserve_s``.
    ``report()`` writes the summary after each step of this. Returns the meta (state.json)."""
    meta = run.load_meta()
    end = t0 + plan.budget_s
    hard = end - PHASE_RESERVE_S
    deadline = hard - DEADLINE_MARGIN_S
    for model in models:
        tag = model.tag
        done = meta.setdefault("runs", {}).setdefault(tag, {"phases": []})
        if run.step(tag) < model.steps:
            left = deadline - time.time()
            if left < plan.startup_s + 30:
                print(f"[longrun] {tag}: {left:.0f} s left before the deadline: not started in "
                      f"this phase", flush=True)
                continue
            res = train(plan, run, model, phase, deadline, hard=hard)
            done["phases"].append({"phase": phase, **res})
            run.save_meta(meta)
            report()
        if run.step(tag) >= model.steps and "recall" not in done:
            if end - time.time() < plan.reserve_s:
                print(f"[longrun] {tag}: finished, but too little time left to evaluate it: "
                      "the next phase does", flush=True)
                continue
            done["recall"] = evaluate(plan, run, model)
            run.save_meta(meta)
            report()
    return meta


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", type=int, choices=(1, 2), required=True,
                   help="1: start over (removes STATE); 2: resume what STATE holds")
    p.add_argument("--out", type=Path, required=True, help="where summary, logs, events and PNGs go")
    p.add_argument("--data", type=Path, default=ROOT / "build" / "longrun-data")
    p.add_argument("--state", type=Path, default=Path(os.environ.get("LONGRUN_DIR", "/tmp/longrun")))
    p.add_argument("--models", help="comma-separated model specs (default: LONGRUN_MODELS or "
                   f"{DEFAULT_MODELS}); see the module's docstring")
    args = p.parse_args()
    t0 = float(os.environ.get("LONGRUN_T0", time.time()))
    plan = make_plan(os.environ.get("LONGRUN_TINY") == "1")
    if args.models:
        plan.models = args.models
    try:
        models = parse_models(plan.models, plan)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
    if args.phase == 2 and not any(run.step(m.tag) for m in models):
        print(f"[longrun] phase 2: no checkpoints of phase 1 in {args.state} (a fresh machine?): "
              "starting over; this call trains from step 0", flush=True)
        shutil.rmtree(args.state, ignore_errors=True)
    run.logs.mkdir(parents=True, exist_ok=True)
    # Function-local: the summary imports the plot tool's event reader (tensorboard).
    sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
    from longrun_report import write_report

    run_phase(plan, run, models, args.phase, t0,
              lambda: write_report(plan, run, models, args.out, args.phase))
    write_report(plan, run, models, args.out, args.phase, echo=True)
    print(f"[longrun] phase {args.phase} done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
