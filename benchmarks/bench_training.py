# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Memory+ vs dense training throughput and peak memory, same layout, same run of this script.

    python benchmarks/bench_training.py --gpus 2 --launcher torchrun \\
        --run "tp2:--preset 8b-memory --num-layers 12 --tp 2 --sequence-parallel" ...

Each --run is NAME:TRAIN FLAGS for ``python -m megatron_memory.train``; common flags (--steps,
--global-batch-size, ...) go after ``--common``. For each run it prints steady tokens/s (steps
after the third), MFU, peak memory per pipeline stage next to the memory calculator's
prediction, and first/last loss; NAME-memory[-SUFFIX] runs get their throughput ratio to
NAME-dense. The table goes to stdout, to $OUT/bench_training.md when OUT is set, and to
benchmarks/RESULTS.md with --append.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from provenance import revision  # benchmarks/ is on sys.path: the script runs from it

ROOT = Path(__file__).resolve().parents[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun's agent starts each rank in a session
    of its own, so killing the launcher's process group does not reach the ranks."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(pid: int) -> None:
    for p in [pid, *_descendants(pid)]:  # collected first: a killed parent's children move away
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_one(launcher: str, gpus: int, flags: list[str], log: Path, timeout: float) -> dict:
    """One training run through the project's launcher. Its output goes to ``log`` as it comes
    (a run cut short keeps what it printed); past ``timeout`` seconds the launcher and every
    process below it (each rank) is killed, so no orphaned rank keeps holding GPU memory."""
    cmd = [sys.executable, "-m", "megatron_memory.launch.run", launcher, "--nproc-per-node", str(gpus), "--", *flags]
    t0 = time.time()
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            f.write(f"\nbench_training: killed after {timeout:.0f} s\n")
    out = log.read_text()
    res = {"rc": proc.returncode, "wall": time.time() - t0}
    if m := re.search(r"\(([\d,]+) tok/s after step 3\)", out):
        res["tok_s"] = float(m.group(1).replace(",", ""))
    # The summary line (steady steps), not a progress line's running average.
    if m := re.search(r"^MFU\s+([\d.]+)% \(", out, re.M):
        res["mfu"] = float(m.group(1))
    if m := re.search(r"loss\s+([\d.]+) \(first 5 steps\) -> ([\d.]+)", out):
        res["loss"] = (float(m.group(1)), float(m.group(2)))
    res["peak"] = re.findall(r"stage (\d+): ([\d.]+) GiB \(calculator ([\d.]+)\)", out)
    if m := re.search(r"^saved \S+ in ([\d.]+) s", out, re.M):
        res["save_s"] = float(m.group(1))
    if proc.returncode:
        res["error"] = ([line for line in out.splitlines() if line.strip()] or ["?"])[-1][:160]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--launcher", default="torchrun", choices=["torchrun", "deepspeed"])
    ap.add_argument("--run", action="append", required=True, help="NAME:TRAIN FLAGS")
    ap.add_argument("--common", default="", help="flags added to every run")
    ap.add_argument("--title", default="Memory+ vs dense training")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--run-timeout", type=float, default=1e9,
                    help="seconds per run before its launcher and ranks are killed")
    a = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    results = {}
    for spec in a.run:
        name, flags = spec.split(":", 1)
        flags = shlex.split(flags) + shlex.split(a.common)
        print(f"== {name}: {' '.join(flags)}", flush=True)
        results[name] = run_one(a.launcher, a.gpus, flags, out_dir / f"train_{name}.log",
                                 a.run_timeout)
        print(f"   {results[name]}", flush=True)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [f"### {a.title} — {gpu} x{a.gpus}, {datetime.date.today()}, {revision()}", "",
             f"launcher {a.launcher}; common flags `{a.common}`", "",
             "| run | flags | tok/s | vs dense | MFU | peak GiB per stage (calculator) | loss first -> last |",
             "|---|---|---|---|---|---|---|"]
    for spec in a.run:
        name, flags = spec.split(":", 1)
        r = results[name]
        dense = results.get(name.split("memory")[0] + "dense") if "memory" in name else None
        ratio = (f"{r['tok_s'] / dense['tok_s']:.1%}" if dense and dense.get("tok_s") and r.get("tok_s")
                 else "-")
        peak = ", ".join(f"{s}: {g} ({c})" for s, g, c in r["peak"]) or "-"
        loss = f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f}" if "loss" in r else r.get("error", "failed")
        lines.append(f"| {name} | `{flags.strip()}` | {r.get('tok_s', 0):,.0f} | {ratio} | "
                     f"{r.get('mfu', 0):.1f}% | {peak} | {loss} |")
    table = "\n".join(lines) + "\n"
    print(table)
    (out_dir / "bench_training.md").write_text(table)
    if a.append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(table + "\n")
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
