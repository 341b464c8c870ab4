# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""One GPU session: kernel correctness tests, then both benchmarks (appended to RESULTS.md),
then a launch-config sweep if time is left. Fits one < 9 minute device call on an H100.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py [--budget-s 520]

Every step runs in its own process with a time limit; its output streams live and is saved to
$OUT/<step>.log when OUT is set. The tables and a status line per step are printed again at the
end. Exit status: 0 if the tests passed, 1 otherwise (the benchmarks run either way).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ orchestration

def run_step(name: str, cmds: list[list[str]], limit_s: float, logs: dict,
             env_extra: dict) -> tuple[str, float]:
    """Run the commands concurrently (shards; lines prefixed when several) under one wall-clock
    limit, streaming their output; returns (status, seconds)."""
    t0 = time.time()
    if limit_s < 20:
        logs[name] = ""
        return "skipped (no time left)", 0.0
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    procs, killed, lines = [], [], []
    for cmd in cmds:
        print(f"\n===== {name} (limit {limit_s:.0f} s): {' '.join(cmd)}", flush=True)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))

    def kill():  # whole process groups: pytest or a benchmark and anything it started
        killed.append(1)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)

    def pump(i, proc):  # ends when the process group exits or is killed
        prefix = f"[{i}] " if len(procs) > 1 else ""
        for line in proc.stdout:
            print(prefix + line, end="", flush=True)
            lines.append(prefix + line)

    timer = threading.Timer(limit_s, kill)
    timer.start()
    readers = [threading.Thread(target=pump, args=(i, p)) for i, p in enumerate(procs)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    rcs = [proc.wait() for proc in procs]
    timer.cancel()
    bad = [rc for rc in rcs if rc != 0]
    status = (f"TIMEOUT after {limit_s:.0f} s" if killed
              else "ok" if not bad else f"FAILED (exit {bad[0]})")
    logs[name] = "".join(lines)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.log").write_text(logs[name])
    return status, time.time() - t0


def tables(log: str) -> str:
    """The markdown report a benchmark printed: from its '## ' title to the end."""
    at = log.find("\n## ")
    return log[at + 1:] if at >= 0 else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=520.0, help="wall-clock budget of all steps")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run of this script: benchmarks at tiny shapes in the interpreter")
    args = ap.parse_args()
    start = time.time()
    import torch

    print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; "
          f"torch {torch.__version__}; python {sys.version.split()[0]}", flush=True)
    py = sys.executable
    # Three shards in parallel: Triton compiles (CPU-bound) dominate the test time. pytest is in
    # the device image (device/KINDS.md).
    base = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    eb_file, pk_file = "tests/kernels/test_embedding_bag.py", "tests/kernels/test_product_key.py"
    test_cmds = [base + [eb_file, "-k", "gpu_matches_reference"],
                 base + [eb_file, "-k", "not gpu_matches_reference and not interpreter"],
                 base + [pk_file, "tests/kernels/test_reference.py", "-k", "not interpreter"]]
    extra = ["--smoke"] if args.smoke else ["--append"]
    steps = [("tests", test_cmds, 250),
             ("bench_embedding_bag", [[py, "benchmarks/bench_embedding_bag.py"] + extra], 150),
             ("bench_memory_layer", [[py, "benchmarks/bench_memory_layer.py"] + extra], 130),
             ("config_sweep", [[py, "benchmarks/bench_embedding_bag.py", "--sweep-only"] + extra], 200)]
    logs, status = {}, []
    for name, cmds, cap in steps:
        left = args.budget_s - (time.time() - start)
        bench_env = {"TRITON_INTERPRET": "1"} if args.smoke and name != "tests" else {}
        status.append((name,) + run_step(name, cmds, min(cap, left), logs, bench_env))
    test_lines = logs.get("tests", "").strip().splitlines()
    test_tail = "\n".join([ln for ln in test_lines if "FAILED" in ln or " passed" in ln
                           or " failed" in ln or " skipped" in ln and " in " in ln
                           or "Error" in ln][-20:])
    print("\n\n===== SUMMARY =====\n\ntests (last lines):\n" + test_tail + "\n")
    for name in ("bench_embedding_bag", "bench_memory_layer", "config_sweep"):
        print(tables(logs.get(name, "")))
    print("| step | status | s |\n|---|---|---|")
    for name, st, sec in status:
        print(f"| {name} | {st} | {sec:.0f} |")
    ok = status[0][1] == "ok"
    print(f"\ncorrectness: {'PASSED' if ok else 'FAILED'}; total {time.time() - start:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
