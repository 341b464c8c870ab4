# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""``--print-config``: the fully resolved configuration and parameter counts, without building
the model.

Every ``None`` that means "derive it" is replaced by what the Trainer will use (memory layers, FFN
and value widths, vocabulary, dtype, batch sizes, warm-up, distributed optimizer), followed by the
batch arithmetic and parameter counts from the memory calculator's per-layer counting, which
tests check against built models at TP x PP.
"""
from __future__ import annotations

import os

from megatron_memory.cli import format_config
from megatron_memory.config import Environment, RunConfig, replace, resolve, with_vocab
from megatron_memory.training.memory_estimate import estimate  # the per-layer parameter counting
from megatron_memory.training.preflight import load_tokenizer, model_vocab


def _tokenizer_vocab(cfg: RunConfig) -> tuple[int, str]:
    """(tokenizer vocabulary, tokenizer path) of the run's data."""
    if cfg.data.data_path:
        return load_tokenizer(cfg.data.tokenizer).vocab_size, cfg.data.tokenizer
    # Lazy: data imports Megatron's dataset code, needed only for the embedded corpus's tokenizer.
    from megatron_memory.training.data import Tokenizer, ensure_default_data

    _, tok = ensure_default_data()
    return Tokenizer(tok).vocab_size, tok


def parameter_lines(cfg: RunConfig, r: RunConfig, world_size: int, cuda: bool) -> list[str]:
    """Total, value table and per-stage (per GPU) parameter counts of ``r``, the resolved
    ``cfg``."""
    vocab = r.model.vocab_size
    single = replace(cfg, **{"parallel.tp": 1, "parallel.pp": 1, "parallel.sequence_parallel": False,
                             "parallel.memory_parallel_size": None, "train.global_batch_size": None})
    whole = estimate(single, 1, vocab, cuda)[0]
    total = whole.dense_params + whole.table_params
    lines = [f"params     total {total:,}: value table {whole.table_params:,} "
             f"({r.memory.num_values:,} x {r.memory.v_dim}), the rest {whole.dense_params:,}"
             if whole.table_params else f"params     total {total:,} (no memory layer)"]
    for s in estimate(r, world_size, vocab, cuda):
        span = f"{s.layers[0]}-{s.layers[-1]}"
        lines.append(f"stage {s.stage:<4} layers {span}, memory layers {s.memory_layers or 'none'}: "
                     f"{s.dense_params + s.table_params:,} per GPU (value table shard "
                     f"{s.table_params:,}), predicted {s.total / 2**30:.2f} GiB")
    return lines


def describe(cfg: RunConfig, world_size: int = 1) -> str:
    """The text printed by ``--print-config``."""
    import torch  # lazy: only to tell whether CUDA (hence the bf16 default) is there

    cuda = torch.cuda.is_available()
    r = resolve(cfg, Environment(world_size, cuda))  # a bad config fails before the tokenizer loads
    vocab, tok = _tokenizer_vocab(cfg)
    r = with_vocab(r, model_vocab(cfg, vocab))
    t, p = r.train, r.parallel
    dp = world_size // (p.tp * p.pp)
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    tokens = t.global_batch_size * r.model.seq_length
    tb = t.tensorboard_dir if t.tensorboard_dir is not None else "runs/<date-time> (a new one per run)"
    lines = [format_config(r), "",
             f"layout     world size {world_size} = TP {p.tp} x PP {p.pp} x DP {dp}"
             f"{' (WORLD_SIZE)' if 'WORLD_SIZE' in os.environ else ''}, "
             f"value table split over {p.memory_parallel_size} ranks (memory-parallel size), "
             f"{'bf16' if t.bf16 else 'fp32'} on {'CUDA' if cuda else 'CPU'}",
             f"batch      global {t.global_batch_size} = micro-batch {t.micro_batch_size} x DP {dp} x "
             f"{micro} micro-batches per step; {tokens:,} tokens per step, {tokens * t.steps:,} in "
             f"{t.steps:,} steps",
             f"vocab      {r.model.vocab_size:,} (tokenizer {tok}: {vocab:,})",
             f"logging    tensorboard {tb or 'off'}, W&B {t.wandb_project or 'off'}",
             *parameter_lines(cfg, r, world_size, cuda)]
    return "\n".join(lines)
