# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Entry point: ``python -m megatron_memory.train [--preset NAME] [flags]`` (see --help)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_memory.cli import config_from_args
from megatron_memory.describe import describe
from megatron_memory.errors import command
from megatron_memory.training.memory_estimate import estimate
from megatron_memory.training.preflight import check_inputs


def summary(cfg, trainer, hist) -> str:
    """The closing block; ``cfg`` is the Trainer's resolved config."""
    n_values = trainer.raw_model.memory_values.weight.numel() if trainer.raw_model.memory_values is not None else 0
    n_all = sum(p.numel() for p in trainer.raw_model.parameters())
    first = sum(hist.losses[:5]) / min(5, len(hist.losses))
    last = sum(hist.losses[-10:]) / min(10, len(hist.losses))
    layers = cfg.memory.layers
    steady = hist.steady_tokens_per_s(trainer.tokens_per_step)
    lines = [
        "=" * 72,
        f"model      {cfg.model.num_layers} layers x d={cfg.model.hidden_size}, memory layers "
        f"{layers or 'none'}, {cfg.memory.num_values if layers else 0:,} values",
        f"params     {n_all:,} on this rank ({n_values:,} in the value table)",
        f"layout     TP={cfg.parallel.tp} PP={cfg.parallel.pp} DP={trainer.dp} "
        f"SP={'on' if cfg.parallel.sequence_parallel else 'off'} on {trainer.device.type}, "
        f"{'bf16' if trainer.bf16 else 'fp32'}"
        + (", memory layers replayed from CUDA graphs" if trainer.cuda_graphs and layers else ""),
        f"loss       {first:.4f} (first 5 steps) -> {last:.4f} (last 10 steps)"
        + (f", validation {hist.valid_loss:.4f}" if hist.valid_loss is not None else ""),
        f"tokens     {hist.tokens:,} in {hist.seconds:.1f} s = {hist.tokens / max(hist.seconds, 1e-9):,.0f} tok/s"
        f" ({steady:,.0f} tok/s after step 3)",
    ]
    if hist.peak_gib:
        predicted = estimate(cfg, trainer.world_size, trainer.vocab_size,
                             cuda=trainer.device.type == "cuda")
        lines.append("peak mem   " + ", ".join(
            f"stage {s}: {g:.1f} GiB (calculator {predicted[s].total / 2**30:.1f})"
            for s, g in hist.peak_gib.items()))
    if hist.key_usage:
        lines.append("key usage  " + ", ".join(
            f"layer {lid}: {u.fraction:.0%} of values used (effective {u.effective:.0%}, "
            f"{u.cumulative:.0%} over {u.span_tokens:,} tokens, input shared {u.input_shared:.2f})"
            for lid, u in hist.key_usage.items()) + " in the last log window")
    mfu = trainer.mfu(steady)
    if mfu is not None:
        lines.append(f"MFU        {mfu:.1%} (memory lookup counted as 2*bag*v FLOPs per token)")
    tb = trainer.tracker.directory
    if tb:
        logdir = Path(tb).parent if cfg.train.tensorboard_dir is None else tb  # runs/: all runs side by side
        lines.append(f"tensorboard {tb}  (tensorboard --logdir {logdir})")
    if hist.saved:
        lines.append(f"checkpoint {hist.saved[-1]}  (resume: --load {cfg.train.save})")
    return "\n".join(lines + ["=" * 72])


def _cuda_available() -> bool:
    import torch  # lazy: --help answers without loading torch

    return torch.cuda.is_available()


@command
def main(argv: Optional[list[str]] = None) -> int:
    cfg, args = config_from_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.print_config:
        print(describe(cfg, world_size))
        return 0
    # data, tokenizer, vocabulary, outputs: seconds, no model
    check_inputs(cfg, world_size, cuda=_cuda_available())
    # Lazy: torch and Megatron load only to train, so --help and --print-config answer at once.
    import torch.distributed as dist

    from megatron_memory.training.trainer import Trainer

    t0 = time.time()
    try:
        trainer = Trainer(cfg)
    except BaseException:
        _shutdown()  # the process group first: then the error line (command) and exit code 2
        raise
    if dist.get_rank() == 0:
        print(f"built in {time.time() - t0:.1f} s; training {cfg.train.steps} steps "
              f"of {trainer.global_batch} x {cfg.model.seq_length} tokens", flush=True)
    hist = trainer.fit()
    if dist.get_rank() == 0:
        print(summary(trainer.cfg, trainer, hist), flush=True)
    trainer.close()
    _shutdown()
    return 0


def _shutdown() -> None:
    """Tear down Megatron's groups and the default process group. Left to interpreter exit,
    the gloo groups' worker threads can be destroyed while still joinable, and the process
    aborts ("terminate called without an active exception", exit -6) after its error line."""
    # Lazy, as in main(): --help and --print-config never load torch or Megatron.
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
