# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Shared fixtures: a one-process Megatron world on CPU/gloo, tiny configs, NaN-poisoned empties."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (Triton kernels)")


@pytest.fixture(scope="session")
def megatron_world():
    """Default process group of one gloo rank with TP=PP=1 (Megatron's global state)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_memory.training.cpu import cpu_shims
    from megatron_memory.training.trainer import init_distributed

    init_distributed()
    with cpu_shims():  # the tests build Megatron modules directly, outside the Trainer
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1234)
        yield
        ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled tensors, so kernels that leave outputs unwritten
    fail their comparisons."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))
    yield


def tiny_transformer_config(**overrides):
    """A small fp32 TransformerConfig that Megatron builds on CPU."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    kw = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
              use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True,
              activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
              attention_dropout=0.0, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
              masked_softmax_fusion=False, apply_rope_fusion=False, pipeline_dtype=torch.float32,
              batch_p2p_comm=False, batch_p2p_sync=False)
    kw.update(overrides)
    return TransformerConfig(**kw)


os.environ.setdefault("PYTHONHASHSEED", "0")
