# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Query normalisation on one device: it keeps the keys alive against a shared input direction,
padding stays out of its statistics, eval (batch 1) uses running statistics, the statistics stay
fp32 under a bf16 cast, and the config rejects bad values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_memory.config import ConfigError, MemoryConfig, QueryNorm
from megatron_memory.model.layer import MemoryPlus, MemoryValues
from tests.conftest import tiny_transformer_config


def _layer(norm, d=32, dtype=torch.float32, **kw):
    mc = MemoryConfig(n_keys=kw.pop("n_keys", 8), heads=kw.pop("heads", 2), k=kw.pop("k", 3),
                      k_dim=kw.pop("k_dim", 8), query_norm=norm, **kw)
    cfg = tiny_transformer_config(hidden_size=d, params_dtype=dtype)
    mc.validate(cfg.num_layers, d)
    return MemoryPlus(cfg, mc, MemoryValues(cfg, mc), layer_id=1)


def _shared_inputs(t: int, d: int, share: float, seed: int = 0) -> torch.Tensor:
    """RMSNorm(alpha c + eps): one vector c shared by all tokens carries ``share`` of the energy."""
    gen = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(d, generator=gen), dim=0) * d ** 0.5
    eps = torch.randn(t, d, generator=gen)
    alpha = (share / (1 - share)) ** 0.5
    return F.rms_norm(alpha * c + eps, (d,))


def _usage(layer: MemoryPlus, x: torch.Tensor) -> float:
    idx, _ = layer.select(x)
    return idx.unique().numel() / layer.memory_config.num_values


def test_select_keeps_half_the_uniform_usage_against_a_90_percent_shared_direction():
    """d=512, N=4096 values, 4 heads x top-8, 512 tokens: uniform selection would touch ~98% of
    the values; the default must reach at least half of that. Without query normalisation the
    shared direction makes every token pick nearly the same keys (findings: 36% at 0.8 share)."""
    d, t = 512, 512
    x = _shared_inputs(t, d, share=0.9)
    shared = float(x.mean(0).pow(2).sum() / x.pow(2).sum(1).mean())
    assert 0.85 < shared < 0.95
    draws = t * 4 * 8
    ceiling = 1 - (1 - 1 / 4096) ** draws
    default = MemoryConfig().query_norm
    usage = {}
    for norm in {QueryNorm.NONE, default}:
        layer = _layer(norm, d=d, n_keys=64, heads=4, k=8, k_dim=64)
        if norm is QueryNorm.CENTER:  # centring by a running mean: one step to learn it first
            layer.select(x)
            layer.query_bn.finish_step()
        with torch.no_grad():
            usage[norm] = _usage(layer, x)
    assert usage[default] >= ceiling / 2, usage
    assert usage[QueryNorm.NONE] < ceiling / 2, usage  # the control: the test can fail


@pytest.mark.parametrize("norm", ["batchnorm", "center"])
def test_padding_stays_out_of_the_statistics(norm):
    layer = _layer(norm)
    x = torch.randn(6, 2, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)          # Megatron's [b, s], True = padding
    pad[1, 4:] = True
    garbage = x.clone()
    garbage[4:, 1] = 1e3                                # whatever sits in the padded slots
    out_pad, _ = layer(garbage, padding_mask=pad)
    layer.query_bn.finish_step()
    stats_pad = layer.query_bn.running_mean.clone(), layer.query_bn.running_var.clone()
    layer.query_bn.reset_parameters()
    real = torch.cat([x[:, 0], x[:4, 1]])              # the same real tokens, no padding
    out_real = torch.cat([layer.mix(real, layer.values.lookup(*layer.select(real)))])
    layer.query_bn.finish_step()
    torch.testing.assert_close(out_pad[:, 0], out_real[:6])
    torch.testing.assert_close(out_pad[:4, 1], out_real[6:])
    torch.testing.assert_close(stats_pad[0], layer.query_bn.running_mean)
    torch.testing.assert_close(stats_pad[1], layer.query_bn.running_var)


@pytest.mark.parametrize("norm", ["batchnorm", "center"])
def test_eval_uses_running_statistics_so_batch_one_matches(norm):
    layer = _layer(norm)
    x = torch.randn(10, 3, 32) + 2.0
    layer(x)
    layer.query_bn.finish_step()
    bn = layer.query_bn
    q = layer.query(x.reshape(-1, 32)).detach()
    torch.testing.assert_close(bn.running_mean, q.mean(0))          # first step: taken outright
    torch.testing.assert_close(bn.running_var, q.var(0), rtol=1e-4, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        batch = layer(x)[0]
        single = torch.cat([layer(x[i:i + 1, j:j + 1])[0] for i in range(10) for j in range(3)])
    torch.testing.assert_close(single.view(10, 3, 32), batch)
    assert int(bn.num_updates) == 1 and float(bn.step_sums.abs().sum()) == 0  # eval adds nothing


def test_running_statistics_are_a_bias_corrected_ema():
    layer = _layer("batchnorm", query_norm_momentum=0.25)
    bn = layer.query_bn
    means = []
    for step in range(3):
        x = torch.randn(7, 1, 32) + step
        layer(x)
        means.append(layer.query(x.view(-1, 32)).detach().mean(0))
        bn.finish_step()
    raw = torch.zeros(16)
    for m in means:
        raw = 0.75 * raw + 0.25 * m
    torch.testing.assert_close(bn.running_mean, raw / (1 - 0.75 ** 3))


def test_a_step_without_tokens_changes_no_statistics():
    """finish_step decides on the device (no host sync): a step whose tokens were all padding
    leaves the running statistics and the update count as they were, and the next real step
    continues the bias-corrected EMA where it stopped."""
    layer = _layer("batchnorm", query_norm_momentum=0.25)
    bn = layer.query_bn
    x1, x2 = torch.randn(5, 2, 32), torch.randn(5, 2, 32) + 1.0
    layer(x1)
    bn.finish_step()
    before = bn.running_mean.clone(), bn.running_var.clone()
    layer(x2, padding_mask=torch.ones(2, 5, dtype=torch.bool))    # every token padding
    bn.finish_step()
    assert int(bn.num_updates) == 1
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    layer(x2)
    bn.finish_step()
    m1, m2 = (layer.query(x.view(-1, 32)).detach().mean(0) for x in (x1, x2))
    raw = 0.75 * (0.25 * m1) + 0.25 * m2
    assert int(bn.num_updates) == 2
    torch.testing.assert_close(bn.running_mean, raw / (1 - 0.75 ** 2))


def test_statistics_stay_float32_when_the_model_is_cast_to_bf16():
    layer = _layer("batchnorm").bfloat16()
    assert layer.query.weight.dtype == torch.bfloat16 and layer.query_bn.weight.dtype == torch.bfloat16
    assert layer.query_bn.running_mean.dtype == torch.float32
    assert layer.query_bn.step_sums.dtype == torch.float64
    assert set(layer.state_dict()) >= {"query_bn.running_mean", "query_bn.running_var",
                                       "query_bn.num_updates", "query_bn.weight", "query_bn.bias"}
    assert "query_bn.step_sums" not in layer.state_dict()


def test_config_errors():
    with pytest.raises(ConfigError, match="query_norm"):
        MemoryConfig(query_norm="layernorm").validate(4, 32)
    with pytest.raises(ConfigError, match="momentum"):
        MemoryConfig(query_norm_momentum=0.0).validate(4, 32)
    assert _layer("none").query_bn is None


def _batchnorm_by_autograd(q, weight, bias, keep, eps):
    """The training formula differentiated by autograd (one rank): the reference of the
    written-out backward of query_norm._TokenBatchNorm."""
    w = torch.ones(q.shape[0], 1, dtype=q.dtype) if keep is None else keep.to(q.dtype).view(-1, 1)
    n = w.sum().clamp(min=1.0)
    mean = (q * w).sum(0) / n
    var = ((q * q * w).sum(0) / n - mean * mean).clamp(min=0.0)
    return (q - mean) * torch.rsqrt(var + eps) * weight + bias


@pytest.mark.parametrize("padded", [False, True])
def test_written_out_batchnorm_matches_autograd_of_its_formula(padded):
    from megatron_memory.model.query_norm import _TokenBatchNorm

    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(11, 6, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    q.data[:, 5] = 0.25                                     # a constant feature: var = 0, clamped
    weight = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    keep = (torch.arange(11) < 8).double() if padded else None
    dy = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    step = torch.zeros(13, dtype=torch.float64)  # 2 * 6 + 1
    got = _TokenBatchNorm.apply(q, weight, bias, keep, None, 1e-5, step)
    got.backward(dy)
    grads = [t.grad.clone() for t in (q, weight, bias)]
    for t in (q, weight, bias):
        t.grad = None
    want = _batchnorm_by_autograd(q, weight, bias, keep, 1e-5)
    want.backward(dy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, t in zip(grads, (q, weight, bias)):
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-10)
    w = torch.ones(11, 1, dtype=torch.float64) if keep is None else keep.view(-1, 1)
    torch.testing.assert_close(step, torch.cat([(q * w).sum(0), (q * q * w).sum(0), w.sum().view(1)]).detach())
    assert torch.autograd.gradcheck(
        lambda a, b, c: _TokenBatchNorm.apply(a, b, c, keep, None, 1e-5, torch.zeros(11, dtype=torch.float64)),
        (q.detach()[:, :5].clone().requires_grad_(), weight.detach()[:5].clone().requires_grad_(),
         bias.detach()[:5].clone().requires_grad_()))
