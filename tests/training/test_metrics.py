# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""FLOP counting and key-usage statistics."""
from __future__ import annotations

import math

import torch

from megatron_memory.configs.presets import get_preset
from megatron_memory.config import replace
from megatron_memory.metrics import KeyUsage, flops_per_token


def test_flops_count_the_lookup_as_a_gather_not_a_dense_matmul():
    mem, dense = get_preset("8b-memory"), get_preset("8b-dense")
    v = 32000
    d, f, s = 4096, dense.model.ffn_size(), 2048
    assert f == 11008
    d_kv = 8 * 128  # 8 key/value groups of head width 128 (grouped-query attention)
    assert dense.model.num_query_groups == 8
    per_layer_dense = 2 * d * (d + 2 * d_kv) + 2 * d * d + 2 * s * d + 6 * d * f
    assert flops_per_token(dense, v) == 3 * (32 * per_layer_dense + 2 * d * v)
    memory_layer = 2 * d * 4 * 512 + 2 * 4 * 512 * 1024 + 2 * 128 * d + 4 * d * d
    want = 3 * (32 * per_layer_dense - 3 * 6 * d * f + 3 * memory_layer + 2 * d * v)
    assert flops_per_token(mem, v) == want
    # The 2^20 x 4096 table would add 2*N*v = 8.8 TFLOP per token if counted as a matmul.
    assert flops_per_token(mem, v) < flops_per_token(dense, v)
    plain = replace(mem, **{"memory.plus": False})
    assert flops_per_token(mem, v) - flops_per_token(plain, v) == 3 * 3 * 4 * d * d


def test_key_usage_fraction_and_effective_usage():
    usage = KeyUsage(8, "cpu")
    usage.update(torch.tensor([[0, 1], [0, 1]]))
    frac, eff = usage.summarize()
    assert frac == 2 / 8 and math.isclose(eff, 2 / 8)    # two values, evenly used
    usage.update(torch.arange(8).repeat(3))
    frac, eff = usage.summarize()                         # reset after each summary
    assert frac == 1.0 and math.isclose(eff, 1.0)         # all eight, evenly
    usage.update(torch.tensor([0, 0, 0, 1]))
    frac, eff = usage.summarize()
    p = torch.tensor([0.75, 0.25])
    assert frac == 2 / 8 and math.isclose(eff, float(torch.exp(-(p * p.log()).sum())) / 8, rel_tol=1e-6)
    assert usage.summarize() == (0.0, 0.0)
