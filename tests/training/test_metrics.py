# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""FLOP counting and key-usage statistics."""
from __future__ import annotations

import math

import torch

from megatron_memory.configs.presets import get_preset
from megatron_memory.config import replace
from megatron_memory.training.metrics import (
    KeyUsage,
    UsageStats,
    flops_per_token,
    format_key_usage,
    hit_buckets,
    pack_usage,
    shared_share,
    unpack_usage,
    usage_scalars,
)


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


def _fe(usage):
    u = usage.summarize()
    return u.fraction, u.effective


def test_key_usage_fraction_and_effective_usage():
    usage = KeyUsage(8, "cpu")
    usage.update(torch.tensor([[0, 1], [0, 1]]))
    frac, eff = _fe(usage)
    assert frac == 2 / 8 and math.isclose(eff, 2 / 8)    # two values, evenly used
    usage.update(torch.arange(8).repeat(3))
    frac, eff = _fe(usage)                                # reset after each summary
    assert frac == 1.0 and math.isclose(eff, 1.0)         # all eight, evenly
    usage.update(torch.tensor([0, 0, 0, 1]))
    frac, eff = _fe(usage)
    p = torch.tensor([0.75, 0.25])
    assert frac == 2 / 8 and math.isclose(eff, float(torch.exp(-(p * p.log()).sum())) / 8, rel_tol=1e-6)
    assert _fe(usage) == (0.0, 0.0)


def test_cumulative_share_spans_windows_and_restarts_after_the_span():
    usage = KeyUsage(8, "cpu", span_tokens=6)
    x, q = torch.randn(2, 4), torch.randn(2, 6)
    for idx, want in (([0, 1], 2 / 8), ([2, 3], 4 / 8), ([0, 4], 5 / 8)):
        usage.observe(x, q)                               # 2 tokens per window
        usage.update(torch.tensor(idx))
        u = usage.summarize()
        assert u.cumulative == want and u.fraction == 2 / 8
    assert u.span_tokens == 6                             # span complete: the next one restarts
    usage.observe(x, q)
    usage.update(torch.tensor([7]))
    u = usage.summarize()
    assert u.cumulative == 1 / 8 and u.span_tokens == 2


def test_shared_share_is_energy_of_the_mean_over_mean_energy():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, 64, generator=gen)
    c = torch.randn(64, generator=gen)
    c = c / c.norm() * noise.norm(dim=1).mean()
    for alpha, want in ((0.0, 0.0), (3.0, 9 / 10)):       # energies 9:1 -> share 0.9
        x = alpha * c + noise
        got = shared_share(x.double().sum(0), float((x.double() ** 2).sum()), x.shape[0])
        assert abs(got - want) < 0.02, (alpha, got)
    same = c.repeat(10, 1)
    assert math.isclose(shared_share(same.sum(0), float((same ** 2).sum()), 10), 1.0, rel_tol=1e-5)
    usage = KeyUsage(4, "cpu")
    usage.observe(same, -same)
    usage.update(torch.tensor([0]))
    u = usage.summarize()
    assert math.isclose(u.input_shared, 1.0, rel_tol=1e-5) and math.isclose(u.query_shared, 1.0, rel_tol=1e-5)


def test_hit_histogram_buckets_powers_of_two():
    counts = torch.tensor([0, 1, 2, 3, 4, 7, 8, 1 << 40])
    assert hit_buckets(counts, 6).tolist() == [1, 1, 2, 2, 1, 1]   # 0 | 1 | 2-3 | 4-7 | 8-15 | rest
    usage = KeyUsage(8, "cpu")
    usage.update(torch.tensor([0, 0, 0, 5]))
    assert usage.summarize().hits[:4] == [6, 1, 1, 0]


def test_progress_line_and_tensorboard_scalars():
    u = UsageStats(0.25, 0.09, 0.6, 1000, 0.97, 0.5, [6, 1, 1] + [0] * 29)
    assert format_key_usage({4: u}) == " | keys L4 25/9/60% s.97"
    assert unpack_usage(pack_usage(u)) == u

    tags = usage_scalars({4: u})
    assert tags["memory/keys_used_layer4"] == 0.25 and tags["memory/input_shared_layer4"] == 0.97
    assert tags["memory/cumulative_layer4"] == 0.6 and tags["memory/span_tokens_layer4"] == 1000
