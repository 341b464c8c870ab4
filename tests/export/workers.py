# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Rank bodies for the export tests (spawned through tests/parallel/dist_utils.run_ranks)."""
from __future__ import annotations

import torch


def export(cfg, folder: str, tokens_file: str) -> None:
    """Load ``cfg.train.load`` at TP=1 in this one process (dist checkpoints reshard), stream the
    model's full tensors into an exported folder, and save the first training micro-batch's
    tokens (the batch ``tests/parallel/workers.logits`` evaluates)."""
    from megatron_memory.training import data
    from megatron_memory.export import hf_format
    from megatron_memory.training.trainer import Trainer

    cfg.train.finetune = True  # the weights, and the data from its start, as workers.logits
    trainer = Trainer(cfg, log=lambda line: None)
    tok = trainer.tokenizer
    config = hf_format.hf_config(cfg, trainer.vocab_size, eos_token_id=tok.eod, pad_token_id=tok.pad)
    tensors = hf_format.megatron_to_hf(hf_format.megatron_model_tensors(trainer.raw_model), config)
    hf_format.write_hf_folder(folder, tensors, config, tokenizer_path=data.ensure_default_data()[1])
    torch.save(next(trainer.train_iter)["tokens"], tokens_file)
    trainer.close()
