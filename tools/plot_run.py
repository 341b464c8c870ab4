# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Turn a run's TensorBoard events into PNG plots: loss, and key-usage health per memory layer.

    python -m megatron_memory.tools.plot_run RUN_DIR [RUN_DIR ...] --out DIR [--labels a b]

RUN_DIR is a --tensorboard-dir of a training run (several: overlaid, one line style per run).
Writes DIR/loss.png (train/loss, and valid/loss as points), DIR/key_usage.png (per memory layer:
share of values used per window, effective usage, cumulative share) and DIR/shared.png (shared-
direction share of each memory layer's input and query). Needs matplotlib (extra "plot").
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from megatron_memory.errors import InputError, command

LAYER_TAG = re.compile(r"memory/(?P<stat>[a-z_]+)_layer(?P<layer>\d+)$")
USAGE_STATS = (("keys_used", "used per window"), ("effective_usage", "effective"),
               ("cumulative", "cumulative"))
SHARED_STATS = (("input_shared", "input"), ("query_shared", "query"))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the run's event files, sorted by step
    (a resumed run's later events win for a repeated step)."""
    # Function-local: tensorboard's reader is only needed by this tool.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (events.out.tfevents.*)")
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                out[tag][ev.step] = ev.value
    return {tag: sorted(v.items()) for tag, v in out.items()}


def layer_series(scalars: dict, stat: str) -> dict[int, list[tuple[int, float]]]:
    """{layer id: series} of memory/<stat>_layer<i> tags."""
    found = {}
    for tag, series in scalars.items():
        m = LAYER_TAG.match(tag)
        if m and m["stat"] == stat:
            found[int(m["layer"])] = series
    return dict(sorted(found.items()))


def _xy(series):
    return [s for s, _ in series], [v for _, v in series]


def plot_runs(runs: list[tuple[str, dict]], out: Path) -> list[Path]:
    """Write the PNGs for [(label, scalars)] into ``out``; returns the files written."""
    import matplotlib  # function-local: an optional dependency (extra "plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    out.mkdir(parents=True, exist_ok=True)
    styles = ["-", "--", ":", "-."]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, (label, sc) in enumerate(runs):
        if "train/loss" in sc:
            ax.plot(*_xy(sc["train/loss"]), styles[n % 4], label=f"{label} train")
        if "valid/loss" in sc:
            ax.plot(*_xy(sc["valid/loss"]), "o", label=f"{label} valid")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    layers = sorted({lid for _, sc in runs for lid in layer_series(sc, "keys_used")})
    if not layers:
        return written
    for name, stats, ylabel in (("key_usage.png", USAGE_STATS, "share of the N values"),
                                ("shared.png", SHARED_STATS, "shared-direction share")):
        fig, axes = plt.subplots(1, len(stats), figsize=(5 * len(stats), 4), squeeze=False)
        for ax, (stat, title) in zip(axes[0], stats):
            for n, (label, sc) in enumerate(runs):
                for i, (lid, series) in enumerate(layer_series(sc, stat).items()):
                    ax.plot(*_xy(series), styles[n % 4], color=f"C{layers.index(lid) % 10}",
                            label=f"{label} layer {lid}" if len(runs) > 1 else f"layer {lid}")
            ax.set(xlabel="step", ylabel=ylabel, title=title, ylim=(0, 1.02))
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


@command
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_memory.tools.plot_run",
                                description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="TensorBoard directories of training runs")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    p.add_argument("--labels", nargs="*", help="one label per run (default: the folder names)")
    args = p.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise InputError(f"{len(labels)} labels for {len(args.runs)} runs")
    try:
        import matplotlib  # noqa: F401  (function-local: optional dependency, checked up front)
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'megatron-memory[plot]'")
    try:
        runs = [(label, read_scalars(r)) for label, r in zip(labels, args.runs)]
    except FileNotFoundError as err:
        raise InputError(str(err)) from err
    for f in plot_runs(runs, args.out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
