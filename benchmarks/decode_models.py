# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The three decode models of bench_decode.py, built from one preset: dense, Memory+ and an MoE
whose routed FFN sits in the memory layers' slots with the Memory+ layer's parameter count.

All three are the standalone model (megatron_memory/export/standalone.py: its embedding, blocks,
attention, norms and output layer); only the FFN of the memory layers differs. A static KV cache
and ``decode_step`` drive those blocks with device-side positions, so one decode step can be
captured in a CUDA graph (the standalone model's own forward asks its cache for a host-side
length and grows it by concatenation).

MoE: ``MoEFFN`` routes each token to top-``k`` of ``E`` SwiGLU experts (router softmax over the
chosen logits, Mixtral-style). Each expert is half the dense FFN's width and k = 2, so a token's
active FFN parameters equal the dense FFN's; E is chosen so that one MoE layer has the Memory+
layer's parameters, the shared value table counted as 1/len(memory_layers) per layer
(``moe_experts``). Experts run as one grouped GEMM over tokens sorted by expert
(``torch.nn.functional.grouped_mm``): no host sync, only the experts that received tokens are
read, and the shapes are static, so it captures in a CUDA graph like the other two.

Shapes: b = batch, s = new tokens, T = cache length, d = hidden, E = experts, f = expert width.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_memory.export.standalone import MemoryGPT, ModelArgs, rope_cos_sin

MODELS = ("dense", "memory", "moe")
MOE_TOP_K = 2
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class MoEFFN(nn.Module):
    """Top-k routed mixture of E SwiGLU experts of width f. Weights [E, out, in] as nn.Linear's.

    backend "grouped": one grouped GEMM per projection over the T*k (token, expert) rows sorted by
    expert (sync-free, static shapes); "loop": the same rows, one matmul per expert that received
    tokens (a host sync for the counts; the reference, and the fallback where grouped_mm fails).
    """

    def __init__(self, d: int, f: int, experts: int, k: int = MOE_TOP_K, backend: str = "grouped"):
        super().__init__()
        if not 1 <= k <= experts:
            raise ValueError(f"MoE top-k {k} must lie in 1..{experts} (the experts)")
        self.d, self.f, self.experts, self.k, self.backend = d, f, experts, k, backend
        self.router = nn.Linear(d, experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(experts, 2 * f, d))
        self.w_down = nn.Parameter(torch.empty(experts, d, f))

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [M, d] sorted by expert, counts [E] int64 -> SwiGLU outputs [M, d]."""
        if self.backend == "grouped":
            offs = counts.cumsum(0).to(torch.int32)
            h = _GROUPED_MM(rows, self.w_gate_up.transpose(-2, -1), offs=offs)
            gate, up = h.chunk(2, dim=-1)
            return _GROUPED_MM(F.silu(gate) * up, self.w_down.transpose(-2, -1), offs=offs)
        out, start = torch.empty_like(rows), 0
        for e, c in enumerate(counts.tolist()):
            if c:
                gate, up = (rows[start:start + c] @ self.w_gate_up[e].t()).chunk(2, dim=-1)
                out[start:start + c] = (F.silu(gate) * up) @ self.w_down[e].t()
            start += c
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, d] -> [b, s, d]."""
        flat = x.reshape(-1, self.d)
        top_logits, top_e = self.router(flat).topk(self.k, dim=-1)         # [T, k]
        gates = torch.softmax(top_logits.float(), dim=-1)
        expert = top_e.flatten()                                             # [T*k]
        order = torch.argsort(expert, stable=True)
        counts = torch.zeros(self.experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, expert, torch.ones_like(expert))  # bincount syncs on CUDA
        rows = self._experts(flat[order // self.k], counts)                 # [T*k, d], sorted
        out = torch.empty_like(rows).index_copy_(0, order, rows).view(-1, self.k, self.d)
        return (out.float() * gates[..., None]).sum(1).to(x.dtype).view(x.shape)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def memory_layer_params(a: ModelArgs) -> int:
    """Parameters of one Memory+ layer (query, keys, norms, W1, W2) plus its share of the table."""
    with torch.device("meta"):
        model = MemoryGPT(a)
    own = param_count(model.model.layers[a.memory_layers[0]].memory)
    return own + a.memory_n_keys ** 2 * a.memory_v_dim // len(a.memory_layers)


def moe_experts(a: ModelArgs) -> tuple[int, int]:
    """(E, f): experts of half the dense FFN width (top-2: active FFN parameters as dense), E
    rounded so one MoE layer (router included) has the Memory+ layer's parameters."""
    f = max(1, a.intermediate_size // 2)
    per_expert = 3 * a.hidden_size * f + a.hidden_size  # gate, up, down + one router row
    return max(MOE_TOP_K, round(memory_layer_params(a) / per_expert)), f


def build(a: ModelArgs, kind: str, device, dtype: torch.dtype, seed: int = 0,
          backend: str = "grouped") -> MemoryGPT:
    """A random-weight standalone model of ``kind`` (MODELS) on ``device``; built on the meta
    device and materialised there once, so an 8B model never passes through host memory."""
    if kind not in MODELS:
        raise ValueError(f"model kind {kind!r}: choose one of {', '.join(MODELS)}")
    layers = list(a.memory_layers)
    with torch.device("meta"):
        model = MemoryGPT(a if kind == "memory" else dataclasses.replace(a, memory_layers=[]))
        if kind == "moe":
            experts, f = moe_experts(a)
            for i in layers:
                model.model.layers[i].mlp = MoEFFN(a.hidden_size, f, experts, backend=backend)
    _materialise(model, device, dtype, seed)
    return model.eval()


def _materialise(model: nn.Module, device, dtype: torch.dtype, seed: int) -> None:
    """Random weights in ``dtype`` (gains 1, biases 0, keys N(0, 1), matrices N(0, 0.02)); the
    query norm's running statistics stay float32 as from_pretrained keeps them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if p.dim() == 1:
            t.fill_(0.0 if name.endswith("bias") else 1.0)
        else:
            t.normal_(0.0, 1.0 if name.endswith(".keys") else 0.02, generator=gen)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(t, requires_grad=False))
    for name, b in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        fill = 1.0 if leaf == "running_var" else 0.0
        model.get_submodule(owner).register_buffer(
            leaf, torch.full(b.shape, fill, dtype=b.dtype, device=device))


class StaticKVCache:
    """Keys and values [b, G, T, hd] per layer, allocated once; ``index`` [s] (device) names the
    positions the current step writes. Same update() contract as standalone.KVCache."""

    def __init__(self, a: ModelArgs, batch: int, length: int, device, dtype: torch.dtype):
        shape = (batch, a.num_key_value_heads, length, a.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(a.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(a.num_hidden_layers)]
        self.positions = torch.arange(length, device=device)
        self.index = self.positions[:1]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *unused):
        self.keys[layer_idx].index_copy_(2, self.index, k)
        self.values[layer_idx].index_copy_(2, self.index, v)
        return self.keys[layer_idx], self.values[layer_idx]


def decode_step(model: MemoryGPT, ids: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache):
    """ids [b, s] at positions pos .. pos+s-1 (pos: 0-d int64 on the device, tokens already
    cached) -> logits [b, V] of the last one. The standalone model's blocks, with its rotary
    embedding and a causal mask over the static cache; no host sync."""
    m, a = model.model, model.args
    b, s = ids.shape
    x = m.embed_tokens(ids)
    q_pos = pos + cache.positions[:s]                                      # [s]
    cos, sin = rope_cos_sin(q_pos.expand(b, s), a.head_dim, a.rope_theta, x.dtype)
    cache.index = q_pos
    mask = (cache.positions[None, :] <= q_pos[:, None]).expand(b, 1, s, -1)   # [b, 1, s, T]
    values = m.memory_values.weight if a.memory_layers else None
    for layer in m.layers:
        x = layer(x, cos, sin, mask, cache, values)
    return model.lm_head(m.norm(x[:, -1]))


def step_bytes(model: MemoryGPT, kind: str, a: ModelArgs, batch: int) -> float:
    """Bytes one decode step must read at least: every weight except the embedding (b rows of it),
    the table rows the b*H*k lookups of each memory layer hit (expected distinct rows, uniform
    indices), and for the MoE the experts that receive at least one of b tokens' top-k choices
    (expected, uniform routing). The KV cache is left out: it is the same for all three models."""
    esize = next(model.parameters()).element_size()
    total = param_count(model) - param_count(model.model.embed_tokens) + batch * a.hidden_size
    if kind == "memory":
        table = model.model.memory_values.weight
        total -= table.numel()
        rows = table.shape[0] * -math.expm1(batch * a.memory_heads * a.memory_k * math.log1p(-1 / table.shape[0]))
        total += len(a.memory_layers) * rows * table.shape[1]
    if kind == "moe":
        for i in a.memory_layers:
            moe = model.model.layers[i].mlp
            per_expert = (moe.w_gate_up[0].numel() + moe.w_down[0].numel())
            touched = moe.experts * -math.expm1(batch * math.log1p(-moe.k / moe.experts)) if moe.k < moe.experts \
                else moe.experts
            total -= moe.experts * per_expert
            total += touched * per_expert
    return float(total * esize)


def kv_bytes(a: ModelArgs, batch: int, context: float, esize: int) -> float:
    """Bytes of the KV cache an attention over ``context`` positions reads, all layers."""
    return 2.0 * a.num_hidden_layers * batch * a.num_key_value_heads * context * a.head_dim * esize
