# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Query normalisation across tokens (``MemoryConfig.query_norm``): BatchNorm or centring.

Why: a few optimizer steps into training every token's memory input carries one shared direction
(90-99% of its energy), all queries point the same way and pick the same keys. Statistics over
tokens remove that shared part; per-token norms (QK-norm) cannot (key-usage-findings.md).

Shapes: q [T, D] with D = heads * k_dim (the whole query, before the half split and QK-norm).

    batchnorm, training:  (q - mean_B) / sqrt(var_B + eps) * weight + bias     B = this micro-batch
    batchnorm, eval:      (q - running_mean) / sqrt(running_var + eps) * weight + bias
    center (both modes):  q - running_mean

Which tokens feed the statistics, and why:
- Tensor parallelism: a memory layer on TP rank r handles T/TP tokens (with or without sequence
  parallelism; see parallel.py). The batch sums [sum q, sum q^2, count] are all-reduced over the
  TP group, forward and backward (the gradient through the mean/var reaches every rank's tokens),
  so training equals the unsharded layer exactly. One collective of 2D+1 floats per layer and
  micro-batch, intra-node.
- Data parallelism: batch statistics are per DP rank (as PyTorch BatchNorm under DDP): T/DP is
  thousands of tokens per micro-batch at the paper's sizes, enough for a per-feature mean, and a DP
  collective in every memory layer's forward would put inter-node latency on the critical path.
- Padding: tokens flagged by Megatron's ``padding_mask`` (True = padding) are left out of the sums.
  Loss-masked tokens (EOD, prompt) are kept: they pass through the model at inference too, so the
  statistics describe the inputs the running estimates will later see.
- Pipeline micro-batches: each micro-batch is one batch. Megatron's schedules keep the forward's
  statistics for that micro-batch's backward (autograd saves them). Memory layers are never
  recomputed (TrainConfig.recompute_activations), so no micro-batch is counted twice.
- Running statistics: during a step every micro-batch adds its local sums to an accumulator;
  ``finish_step`` (called once per optimizer step from ``parallel.finalize_memory_grads``)
  all-reduces it over TP and DP and folds the step's mean/var into a bias-corrected EMA. They are
  therefore identical on every rank, independent of the layout, and updated off the forward's
  critical path. Eval, generation and batch 1 use them, never batch statistics. 'center' uses the
  running mean in training as well, so its forward needs no collective at all and training equals
  inference; the price is a one-step lag (at step 1 there is nothing to subtract yet).
- Checkpoints: running_mean, running_var, num_updates are persistent buffers, saved replicated by
  Megatron's default sharded_state_dict and exported to the HF folder.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_memory.config import QueryNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in forward and in backward: every rank's output depends on every rank's
    input through the sum, so each input's gradient is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class QueryBatchNorm(torch.nn.Module):
    """Per-feature normalisation of the query over tokens (module docstring).

    forward(q [T, D], keep [T] float (1 = real token, 0 = padding) or None, group: the process
    group whose ranks hold the other tokens of this batch, or None) -> [T, D] float32 (float64
    kept). ``finish_step(groups)`` folds the step's statistics into the running ones.
    """

    def __init__(self, dim: int, mode: QueryNorm, eps: float, momentum: float, device=None,
                 dtype=None):
        super().__init__()
        if mode not in (QueryNorm.BATCHNORM, QueryNorm.CENTER):
            raise ValueError(f"QueryBatchNorm mode must be batchnorm or center, got {mode!r}")
        self.mode, self.eps, self.momentum = QueryNorm(mode), eps, momentum
        if self.mode is QueryNorm.BATCHNORM:  # 1-D: the standard optimizer rule skips their decay
            self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        f32 = dict(device=device, dtype=torch.float32)
        self.register_buffer("running_mean", torch.zeros(dim, **f32))
        self.register_buffer("running_var", torch.ones(dim, **f32))
        self.register_buffer("num_updates", torch.zeros((), device=device, dtype=torch.int64))
        # This step's local sums [sum q, sum q^2, count]; float64 so millions of tokens add exactly.
        self.register_buffer("step_sums", torch.zeros(2 * dim + 1, device=device,
                                                      dtype=torch.float64), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        """Keep the statistics in their own precision when the model is cast (Float16Module
        calls .bfloat16(), which would otherwise quantise the running mean and variance)."""
        dtypes = {name: b.dtype for name, b in self.named_buffers(recurse=False)}
        super()._apply(fn, *args, **kwargs)
        for name, dtype in dtypes.items():
            buf = getattr(self, name)
            if buf.dtype != dtype:
                setattr(self, name, buf.to(dtype))
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.mode is QueryNorm.BATCHNORM:
            self.weight.fill_(1.0)
            self.bias.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_updates.zero_()
        self.step_sums.zero_()

    def _local_sums(self, q: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """[sum q, sum q^2, count] over this rank's (unpadded) tokens: [2D + 1]."""
        if keep is None:
            count = torch.full((1,), float(q.shape[0]), dtype=q.dtype, device=q.device)
            return torch.cat([q.sum(0), (q * q).sum(0), count])
        w = keep.to(q.dtype).view(-1, 1)
        return torch.cat([(q * w).sum(0), (q * q * w).sum(0), w.sum().view(1)])

    def forward(self, q: torch.Tensor, keep: Optional[torch.Tensor] = None, group=None) -> torch.Tensor:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = q.to(acc)
        if not self.training:
            return self._normalise(q, self.running_mean.to(acc), self.running_var.to(acc))
        local = self._local_sums(q, keep)
        self.step_sums += local.detach().to(torch.float64)
        if self.mode is QueryNorm.CENTER:
            return q - self.running_mean.to(acc)
        sums = all_reduce_sum(local, group)
        d = q.shape[1]
        n = sums[2 * d].clamp(min=1.0)
        mean = sums[:d] / n
        # One pass (one collective); fp32 is enough even at a 99% shared share (rel. error ~1e-5).
        var = (sums[d:2 * d] / n - mean * mean).clamp(min=0.0)
        return self._normalise(q, mean, var)

    def _normalise(self, q, mean, var):
        if self.mode is QueryNorm.CENTER:
            return q - mean
        scale = torch.rsqrt(var + self.eps) * self.weight.to(q.dtype)
        return (q - mean) * scale + self.bias.to(q.dtype)

    @torch.no_grad()
    def finish_step(self, groups=()) -> None:
        """Fold this step's statistics (summed over ``groups``: the TP group when the layer's
        tokens are split, the DP group) into the running mean/var; collective over ``groups``.

        Bias-corrected EMA written directly into the buffers: with c_n = 1 - (1 - m)^n,
        stat_n = stat_{n-1} + (m / c_n) (x_n - stat_{n-1}); the first step's statistics replace
        the initial (0, 1) outright, and eval uses the buffers as they are.
        """
        sums = self.step_sums
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sums, group=group)
        d = self.running_mean.shape[0]
        # On the device throughout: a Python number taken from `n` would be a host sync at the
        # end of every step's backward. A step without tokens (n = 0) changes nothing.
        n = sums[2 * d]
        seen = n > 0
        mean = sums[:d] / n
        var = (sums[d:2 * d] / n - mean * mean).clamp(min=0.0) * (n / (n - 1.0).clamp(min=1.0))
        self.num_updates += seen.to(self.num_updates.dtype)
        # float64 like the Python float it replaces, rounded to float32 once, as a scalar was.
        decay = (1.0 - self.momentum) ** self.num_updates.to(torch.float64)
        rate = (self.momentum / (1.0 - decay)).to(torch.float32)
        for stat, step_value in ((self.running_mean, mean), (self.running_var, var)):
            stat.copy_(torch.where(seen, stat + rate * (step_value.float() - stat), stat))
        sums.zero_()

    def extra_repr(self) -> str:
        return f"{self.running_mean.shape[0]}, mode={self.mode.value}, eps={self.eps}, momentum={self.momentum}"
