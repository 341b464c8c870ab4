# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Tiny Megatron models and their exported folders for the export tests."""
from __future__ import annotations

import torch

from megatron_memory.config import MemoryConfig, ModelConfig, RunConfig
from tests.conftest import tiny_transformer_config

VOCAB = 96
MEMORY = dict(layers=[1, 3], n_keys=8, heads=2, k=4, k_dim=16)


def tiny_run_config(**memory) -> RunConfig:
    """The RunConfig matching tiny_transformer_config (4 layers, d=32, 4 heads, ffn 64)."""
    return RunConfig(model=ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                                       ffn_hidden_size=64, seq_length=16),
                     memory=MemoryConfig(**{**MEMORY, **memory}))


def tiny_megatron_model(groups: int = 4, seed: int = 0, **memory):
    """A MemoryGPTModel on one rank (needs the megatron_world fixture), with every weight random
    (norm gains and biases too, so a swapped name cannot go unnoticed)."""
    from megatron_memory.model.gpt import MemoryGPTModel

    cfg = tiny_run_config(**memory)
    tconfig = tiny_transformer_config(num_query_groups=groups)
    model = MemoryGPTModel(tconfig, cfg.memory, vocab_size=VOCAB, max_sequence_length=16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
        for name, b in model.named_buffers():  # query-norm running statistics, if any
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("num_updates"):
                b.fill_(7)
    return cfg, model.eval()


def export(model, cfg, folder, groups: int = 4, **write_kw):
    """Stream a one-rank Megatron model into an exported folder (as the converter does)."""
    from megatron_memory.export import hf_format

    config = hf_format.hf_config(cfg, VOCAB, num_query_groups=groups, eos_token_id=0)
    tensors = hf_format.megatron_to_hf(hf_format.megatron_model_tensors(model), config)
    return hf_format.write_hf_folder(folder, tensors, config, **write_kw)


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s, V] through Megatron's GPTModel (causal mask, positions 0..s-1)."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)
