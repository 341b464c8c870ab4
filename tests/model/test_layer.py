# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""MemoryPlus vs an independent brute-force reference: outputs, every gradient, gradcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_memory.config import MemoryConfig, QueryNorm
from megatron_memory.model.layer import MemoryPlus, MemoryValues
from tests.conftest import tiny_transformer_config


def build(mc: MemoryConfig, d: int = 16, dtype=torch.float64, seed: int = 0):
    cfg = tiny_transformer_config(hidden_size=d, params_dtype=dtype)
    mc.validate(cfg.num_layers, d)
    values = MemoryValues(cfg, mc)
    layer = MemoryPlus(cfg, mc, values, layer_id=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everything, biases and gains included, so no term hides
        for p in list(layer.parameters()) + [values.weight]:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    return layer, values


def naive_memory(x, layer: MemoryPlus, V: torch.Tensor):
    """Brute force over all N = n**2 full keys concat(K1[i], K2[j]); no product-key trick."""
    mc = layer.memory_config
    H, n, half = mc.heads, mc.n_keys, mc.k_dim // 2
    q = x @ layer.query.weight.T + layer.query.bias
    bn = layer.query_bn
    if bn is not None and bn.mode is QueryNorm.CENTER:
        q = q - bn.running_mean.to(q.dtype)
    elif bn is not None:  # training mode: this batch's biased statistics
        mean, var = q.mean(0), q.var(0, unbiased=False)
        q = (q - mean) / torch.sqrt(var + mc.query_norm_eps) * bn.weight + bn.bias
    q = q.view(-1, H, 2, half)
    K = layer.keys
    if mc.qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + mc.qk_norm_eps)
        q = q * layer.query_norm_weight.view(H, 2, half)
        K = K / torch.sqrt(K.pow(2).mean(-1, keepdim=True) + mc.qk_norm_eps) / half ** 0.5
    y = torch.zeros(x.shape[0], V.shape[1], dtype=x.dtype)
    for h in range(H):
        full = torch.cat([K[h, 0][:, None, :].expand(n, n, half),
                          K[h, 1][None, :, :].expand(n, n, half)], -1).reshape(n * n, 2 * half)
        scores = q[:, h].reshape(-1, 2 * half) @ full.T                       # [T, N]
        top, idx = scores.topk(mc.k, dim=-1)
        w = torch.softmax(top, dim=-1)
        for t in range(x.shape[0]):
            for j in range(mc.k):
                y[t] = y[t] + w[t, j] * V[idx[t, j]]
    if not mc.plus:
        return y
    return (y * F.silu(x @ layer.w1.weight.T + layer.w1.bias)) @ layer.w2.weight.T + layer.w2.bias


CONFIGS = [
    MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8, qk_norm=True, query_norm="none"),
    MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8, qk_norm=False, query_norm="none"),
    MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8, qk_norm=True, query_norm="batchnorm"),
    MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8, qk_norm=False, query_norm="batchnorm"),
    MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8, qk_norm=True, query_norm="center"),
    MemoryConfig(n_keys=5, heads=3, k=5, k_dim=6, qk_norm=True),        # k == n_keys, odd sizes
    MemoryConfig(n_keys=7, heads=1, k=2, k_dim=4, qk_norm=True, plus=False),
]


@pytest.mark.parametrize("mc", CONFIGS, ids=lambda m: f"n{m.n_keys}h{m.heads}k{m.k}qk{int(m.qk_norm)}p{int(m.plus)}-{m.query_norm}")
def test_forward_and_all_grads_match_naive(mc):
    layer, values = build(mc)
    if layer.query_bn is not None:  # a running mean to centre by
        layer.query_bn.running_mean.normal_(generator=torch.Generator().manual_seed(9))
    d = layer.config.hidden_size
    x = torch.randn(5, 2, d, dtype=torch.float64, requires_grad=True)
    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    g = torch.randn_like(out)
    params = [x, values.weight] + list(layer.parameters())
    got = torch.autograd.grad(out, params, g)
    x2 = x.detach().clone().requires_grad_(True)
    ref = naive_memory(x2.view(-1, d), layer, values.weight).view_as(out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    want = torch.autograd.grad(ref, [x2, values.weight] + list(layer.parameters()), g)
    names = ["input", "values"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("norm", ["none", "batchnorm"])
def test_gradcheck_float64(norm):
    mc = MemoryConfig(n_keys=4, heads=2, k=2, k_dim=4, query_norm=norm)
    layer, values = build(mc, d=6)

    class Both(torch.nn.Module):  # registers the shared table so functional_call can swap it
        def __init__(self):
            super().__init__()
            self.layer, self.table = layer, values

        def forward(self, x):
            return self.layer(x)[0]

    both = Both()
    names = [n for n, _ in both.named_parameters()]
    tensors = tuple(p.detach().clone().requires_grad_(True) for _, p in both.named_parameters())
    x = torch.randn(3, 1, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(both, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *tensors), eps=1e-6, atol=1e-5)


def test_init_follows_reference_and_is_layout_independent():
    mc = MemoryConfig(n_keys=32, heads=2, k=4, k_dim=64)
    cfg = tiny_transformer_config(hidden_size=64)
    a = MemoryValues(cfg, mc)
    b = MemoryValues(cfg, mc, columns=(16, 48))  # a tensor-parallel slice of the same table
    torch.testing.assert_close(b.weight, a.weight[:, 16:48], rtol=0, atol=0)
    assert abs(a.weight.std().item() - 64 ** -0.5) < 0.01
    layer = MemoryPlus(cfg, mc, a, layer_id=3)
    bound = 64 ** -0.5 + 1e-7
    assert layer.keys.abs().max() <= bound and layer.keys.abs().max() > 0.9 * bound
    assert torch.all(layer.query.bias == 0) and torch.all(layer.w1.bias == 0) and torch.all(layer.w2.bias == 0)
    assert abs(layer.w1.weight.std().item() - 64 ** -0.5) < 0.01
    other = MemoryPlus(cfg, mc, a, layer_id=4)
    assert not torch.equal(layer.keys, other.keys)  # each layer its own keys
    assert a.weight.is_memory_value and not hasattr(layer.keys, "is_memory_value")


def test_layer_does_not_register_the_shared_table():
    mc = MemoryConfig(n_keys=4, heads=1, k=2, k_dim=4)
    layer, values = build(mc, d=8)
    assert all(p is not values.weight for p in layer.parameters())
    assert not any("values" in k for k in layer.state_dict())


def test_missing_table_is_a_clear_error():
    cfg = tiny_transformer_config()
    with pytest.raises(ValueError, match="shared MemoryValues"):
        MemoryPlus(cfg, MemoryConfig(n_keys=4, heads=1, k=2, k_dim=4), None, layer_id=0)
