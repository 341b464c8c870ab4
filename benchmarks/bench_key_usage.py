# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Key usage and loss of query-normalisation choices (MemoryConfig.query_norm), same data/seed.

    python benchmarks/bench_key_usage.py --width 512 --warmup 2 25 --norms none batchnorm center \\
        --steps 100 --out /tmp/ku512.jsonl [--append]
    # 8B width on one GPU, natural text (bash benchmarks/device/key_usage.sh)
    python benchmarks/bench_key_usage.py --width 4096 --seq-length 2048 \\
        --data-prefix build/longrun-data/train_document --tokenizer build/longrun-data/tokenizer.json

Each (norm, warm-up) pair trains a fresh model in its own process (Megatron keeps global state)
on the embedded corpus (or --data-prefix / --tokenizer) and writes one JSON line: the per-window key-usage log of every memory
layer and the losses. The table printed (and appended to benchmarks/RESULTS.md with --append)
gives, per layer, used/effective % in the last window and the mean effective usage over the
second half of the run, the input shared share at the end, and the final training loss (mean of
the last 10 steps) and validation loss.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# width: (layers, attention heads, memory layers, n_keys, heads, k, k_dim, micro-batch, lr)
SIZES = {
    128: (6, 4, [1, 3, 5], 64, 4, 8, 64, 4, 3e-3),
    512: (6, 8, [1, 3, 5], 64, 4, 8, 64, 4, 3e-3),
    2048: (4, 16, [1, 3], 256, 4, 32, 512, 1, 3e-4),
    # the 8B preset's width and memory (4 heads x top-32, k_dim 512) on one GPU: 724 keys =
    # 2^19 values, as the resume benchmark, so table + fp32 Adam state (~36 GiB) fit an 80 GB card
    4096: (4, 32, [1, 3], 724, 4, 32, 512, 4, 1e-4),
}


def worker(args) -> None:
    """One run in this process: print its JSON line."""
    sys.path.insert(0, str(ROOT))  # this checkout's package, not another editable install
    from megatron_memory.config import (DataConfig, MemoryConfig, ModelConfig, RunConfig,
                                        TrainConfig)
    from megatron_memory.training.trainer import Trainer

    layers, heads, mem, n_keys, mh, k, k_dim, mb, lr = SIZES[args.width]
    cfg = RunConfig(
        model=ModelConfig(num_layers=layers, hidden_size=args.width, num_attention_heads=heads,
                          seq_length=args.seq_length),
        memory=MemoryConfig(layers=mem, n_keys=n_keys, heads=mh, k=k, k_dim=k_dim,
                            query_norm=args.norms[0]),
        train=TrainConfig(steps=args.steps, micro_batch_size=mb, lr=lr, min_lr=lr / 10,
                          warmup_steps=args.warmup[0], log_interval=args.log_interval,
                          eval_iters=2, tensorboard_dir=args.tensorboard or "", seed=args.seed),
        data=DataConfig(data_path=[args.data_prefix] if args.data_prefix else None,
                        tokenizer=args.tokenizer))
    trainer = Trainer(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    hist = trainer.fit()
    trainer.close()
    usage = [{"step": step, **{str(lid): vars(u) for lid, u in layers_.items()}}
             for step, layers_ in hist.key_usage_log]
    print(json.dumps({"width": args.width, "norm": args.norms[0], "warmup": args.warmup[0],
                      "steps": args.steps, "losses": hist.losses, "valid_loss": hist.valid_loss,
                      "seconds": hist.seconds, "usage": usage}), flush=True)


def _device() -> str:
    import torch  # local: only the RESULTS heading needs it; the driver stays light

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def summarise(run: dict) -> str:
    usage = run["usage"]
    last = usage[-1]
    second = [u for u in usage if u["step"] > run["steps"] // 2]
    layers = [k for k in last if k != "step"]
    used = "/".join(f"{last[lid]['fraction']:.0%}".rstrip("%") for lid in layers)
    eff = "/".join(f"{last[lid]['effective']:.0%}".rstrip("%") for lid in layers)
    eff2 = "/".join(f"{sum(u[lid]['effective'] for u in second) / len(second):.0%}".rstrip("%")
                    for lid in layers)
    shared = "/".join(f"{last[lid]['input_shared']:.2f}" for lid in layers)
    qshared = "/".join(f"{last[lid]['query_shared']:.2f}" for lid in layers)
    loss = sum(run["losses"][-10:]) / len(run["losses"][-10:])
    valid = run["valid_loss"]
    return (f"| {run['width']} | {run['warmup']} | {run['norm']} | {used} | {eff} | {eff2} | "
            f"{shared} | {qshared} | {loss:.3f} | {valid:.3f} | {run['seconds']:.0f} |")


HEADER = ("| d | warm-up | query norm | used % (last window) | effective % (last) | effective % "
          "(mean, 2nd half) | input shared (last) | query shared (last) | train loss (last 10) | "
          "valid loss | s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512, choices=sorted(SIZES))
    p.add_argument("--norms", nargs="+", default=["none", "batchnorm", "center"])
    p.add_argument("--warmup", type=int, nargs="+", default=[2, 25])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--data-prefix", default=None, help="indexed dataset (default: embedded corpus)")
    p.add_argument("--tokenizer", default=None, help="its tokenizer.json (with --data-prefix)")
    p.add_argument("--tensorboard", default=None, help="(worker) event directory")
    p.add_argument("--out", default=None, help="JSON lines of every run (appended)")
    p.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if bool(args.data_prefix) != bool(args.tokenizer):
        p.error("--data-prefix and --tokenizer go together")
    if args.worker:
        worker(args)
        return 0
    rows = []
    for warmup in args.warmup:
        for norm in args.norms:
            cmd = [sys.executable, __file__, "--worker", "--width", str(args.width), "--norms", norm,
                   "--warmup", str(warmup), "--steps", str(args.steps), "--seed", str(args.seed),
                   "--log-interval", str(args.log_interval), "--seq-length", str(args.seq_length)]
            cmd += ["--data-prefix", args.data_prefix] if args.data_prefix else []
            cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(run) + "\n")
            rows.append(summarise(run))
            print(rows[-1], flush=True)
    table = HEADER + "\n" + "\n".join(rows)
    print(table)
    if args.append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n\n## Key usage by query norm, d={args.width} ({_device()}, "
                    f"{datetime.date.today()})\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
