# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Experiment logging: TensorBoard (a directory per run) and, when asked for, Weights & Biases.

One ``Tracker`` per process; only the last rank (which holds the loss) writes. What it logs:
scalars (loss, lr, grad norms, throughput, MFU, validation), per memory layer the share of values
used and a histogram of how often each value was selected in the log window, and the resolved run
configuration as text (TensorBoard) / run config (W&B).
"""
from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_memory.config import RunConfig
from megatron_memory.training.metrics import USAGE_BUCKETS, USAGE_STATS

def default_run_dir(root: str = "runs") -> str:
    """runs/<date-time>, made unique if two runs start in the same second."""
    base = Path(root) / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return str(path)


def resolve_tensorboard_dir(cfg: RunConfig) -> Optional[str]:
    """The run's TensorBoard directory, the same on every rank ('' or None-disabled -> None)."""
    chosen = cfg.train.tensorboard_dir
    if chosen == "":
        return None
    if chosen is not None:
        return chosen
    name = [default_run_dir() if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]


def config_markdown(cfg: RunConfig) -> str:
    """The run config as a markdown table (TensorBoard renders text as markdown)."""
    rows = ["| field | value |", "|---|---|"]
    for section, values in dataclasses.asdict(cfg).items():
        rows += [f"| {section}.{k} | `{v!r}` |" for k, v in values.items()]
    return "\n".join(rows)


class Tracker:
    """Writes on the last rank; every method may be called on every rank (collectives inside
    ``key_usage`` must be)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, extra_text: str = ""):
        self.cfg = cfg
        self.directory = resolve_tensorboard_dir(cfg)  # collective when defaulted
        self.writes = rank == world_size - 1
        self.writer = self.wandb = None
        if not self.writes:
            return
        if self.directory:
            from torch.utils.tensorboard import SummaryWriter  # lazy: the writing rank only

            self.writer = SummaryWriter(self.directory)
            self.writer.add_text("config", config_markdown(cfg) + ("\n\n" + extra_text if extra_text else ""))
        if cfg.train.wandb_project:  # preflight checked that the package is there
            self.wandb = importlib.import_module("wandb")
            name = cfg.train.wandb_exp_name or (Path(self.directory).name if self.directory else None)
            self.wandb.init(project=cfg.train.wandb_project, name=name, dir=self.directory,
                            config=dataclasses.asdict(cfg))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for name, val in values.items():
                self.writer.add_scalar(name, val, step)
        if self.wandb:
            self.wandb.log(dict(values), step=step)

    def key_usage(self, model, layer_ids: list[int], step: int) -> None:
        """Histograms of value selection counts per memory layer (collective on every rank).

        Reads each layer's ``KeyUsage.last_histogram`` (of the window just summarised, counts
        summed over TP and DP); the first TP/DP rank of the stage holding a layer contributes it."""
        if not layer_ids:
            return
        hists = torch.zeros(len(layer_ids), USAGE_BUCKETS + USAGE_STATS, dtype=torch.float64)
        first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        for layer in model.memory_layers():
            hist = getattr(layer.key_usage, "last_histogram", None)
            if first and hist is not None:
                hists[layer_ids.index(layer.layer_id)] = hist.cpu()
        if dist.get_world_size() > 1:
            device = next(model.parameters()).device
            hists = hists.to(device)
            dist.all_reduce(hists)
            hists = hists.cpu()
        if self.writes:
            for lid, h in zip(layer_ids, hists):
                self._histogram(f"memory/key_selections_layer{lid}", h, step)

    def _histogram(self, tag: str, h: torch.Tensor, step: int) -> None:
        """Bucket b holds the values selected in [2**(b-1), 2**b) times (b=0: never)."""
        counts = h[:USAGE_BUCKETS]
        lo, hi, total, squares = (float(x) for x in h[USAGE_BUCKETS:])
        nz = counts.nonzero().flatten().tolist()
        if not nz:
            return
        last = nz[-1]
        limits = [2.0 ** b - 0.5 for b in range(last + 1)]  # upper edges: 0.5, 1.5, 3.5, 7.5, ...
        if self.writer:
            self.writer.add_histogram_raw(tag, min=lo, max=hi, num=int(counts.sum()), sum=total,
                                          sum_squares=squares, bucket_limits=limits,
                                          bucket_counts=counts[:last + 1].tolist(), global_step=step)
        if self.wandb:
            hist = self.wandb.Histogram(np_histogram=(counts[:last + 1].tolist(), [-0.5] + limits))
            self.wandb.log({tag: hist}, step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
