# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Exact resume at scale: 2N steps straight vs N steps + save + exit, then resume for N more.

    bash benchmarks/device/resume.sh        # on a 2-GPU device machine (wheels in .whl)

One phase per launch (under torchrun):

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_resume.py \\
        --phase straight|first|killed|resume --ckpt DIR --json FILE -- TRAIN FLAGS

``straight`` trains 2N steps (--steps 2N) without saving; ``first`` trains with --save DIR
--exit-interval N (saves at step N, exits); ``killed`` is ``first`` ended by SIGKILL right after
the save, like a preempted job; ``resume`` loads DIR and trains to 2N. Rank 0 writes per-step
losses, grad norms and the checkpoint load/save seconds to FILE. ``--report`` (no torchrun)
compares the three JSON files bit for bit and appends a section to RESULTS.md; ``--compare A B
[C]`` says, per series, whether run A equals B (followed by C) bit for bit, or where they part.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from provenance import revision  # benchmarks/ is on sys.path: the script runs from it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_phase(phase: str, ckpt: str, out: str, flags: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from megatron_memory.cli import config_from_args
    from megatron_memory.training.trainer import Trainer

    cfg, _ = config_from_args(flags)
    t = cfg.train
    if phase in ("first", "killed"):
        t.save, t.exit_interval = ckpt, t.steps // 2
    elif phase == "resume":
        t.load = ckpt
    trainer = Trainer(cfg)
    hist = trainer.fit()
    if dist.get_rank() == 0:
        json.dump({"losses": hist.losses, "grad_norms": hist.grad_norms,
                   "value_grad_norms": hist.value_grad_norms, "first_step": hist.first_step,
                   "seconds": trainer.checkpoint_seconds, "steps": t.steps,
                   "rank0_read_bytes": trainer.checkpoint_bytes_read,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}, open(out, "w"))
    if phase == "killed":  # no clean shutdown: nothing beyond what the save wrote survives
        # The whole process tree, as a scheduler ends a job: the multiprocessing manager of
        # Megatron's checkpoint writer would outlive this process (and hold its stdout).
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
        dist.barrier()  # all ranks' children first: the first death makes torchrun end the others
        os.kill(os.getpid(), signal.SIGKILL)
    trainer.close()
    dist.destroy_process_group()


SERIES = ("losses", "grad_norms", "value_grad_norms")


def compare(a: dict, *parts: dict) -> list[str]:
    """One line per series: run ``a`` against ``parts`` concatenated (a killed run, then its
    resumption), every value at full precision."""
    lines = []
    for key in SERIES:
        x, y = a[key], [v for p in parts for v in p[key]]
        diff = [i for i, (u, v) in enumerate(zip(x, y)) if u != v]
        if len(x) != len(y):
            lines.append(f"{key}: {len(x)} steps against {len(y)}")
        elif not diff:
            lines.append(f"{key}: bit-identical over {len(x)} steps")
        else:
            i = diff[0]
            lines.append(f"{key}: {len(diff)} of {len(x)} steps differ, the first at step {i + 1} "
                         f"({x[i]!r} vs {y[i]!r})")
    return lines


def report(straight: str, first: str, resumed: str, ckpt_gib: float, title: str) -> str:
    s, f, r = (json.load(open(p)) for p in (straight, first, resumed))
    n = len(f["losses"])
    same = {key: s[key][n:] == r[key] for key in ("losses", "grad_norms", "value_grad_norms")}
    rows = "\n".join(f"| {n + i + 1} | {s['losses'][n + i]:.6f} | {r['losses'][i]:.6f} | "
                     f"{s['grad_norms'][n + i]:.6f} | {r['grad_norms'][i]:.6f} |"
                     for i in range(len(r["losses"])))
    return (f"\n## {title}\n\n{s['device']} x2; {datetime.date.today()}; {revision()}; "
            f"`bash benchmarks/device/resume.sh`.\n\n"
            f"Steps 1-{n} then save and exit; resume to step {s['steps']}. Bit-identical after "
            f"resume: losses {same['losses']}, grad norms {same['grad_norms']}, value grad norms "
            f"{same['value_grad_norms']}. Checkpoint {ckpt_gib:.1f} GiB (model bf16 + fp32 main "
            f"params + Adam moments); save {f['seconds'].get('save', 0):.1f} s, load "
            f"{r['seconds'].get('load', 0):.1f} s (both include the SHA-256 manifest pass).\n\n"
            f"| step | loss straight | loss resumed | grad norm straight | grad norm resumed |\n"
            f"|---|---|---|---|---|\n{rows}\n")


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["straight", "first", "killed", "resume"])
    ap.add_argument("--ckpt")
    ap.add_argument("--json")
    ap.add_argument("--report", nargs=3, metavar=("STRAIGHT", "FIRST", "RESUMED"))
    ap.add_argument("--ckpt-gib", type=float, default=0.0)
    ap.add_argument("--title", default="Exact resume on GPUs")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--compare", nargs="+", metavar="JSON", help="A B [C]: run A against B + C")
    a = ap.parse_args(argv)
    if a.compare:
        runs = [json.load(open(p)) for p in a.compare]
        print("\n".join(compare(*runs)))
        return
    if a.report:
        text = report(*a.report, a.ckpt_gib, a.title)
        print(text)
        if a.append:
            with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
                f.write(text)
        return
    run_phase(a.phase, a.ckpt, a.json, flags)


if __name__ == "__main__":
    main()
