# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Query normalisation across tokens (``MemoryConfig.query_norm``): BatchNorm or centring.

Why: a few optimizer steps into training every token's memory input carries one shared direction
(90-99% of its energy), all queries point the same way and pick the same keys. Statistics over
tokens remove that shared part; per-token norms (QK-norm) cannot (see benchmarks/RESULTS.md).

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


def _local_sums(q: torch.Tensor, keep: Optional[torch.Tensor]):
    """q [T, D], keep [T] or None -> ([sum q, sum q^2, count] over this rank's unpadded tokens
    [2D + 1], the keep weights [T, 1] or None); the sums written in place, no concatenation."""
    d = q.shape[1]
    sums = torch.empty(2 * d + 1, dtype=q.dtype, device=q.device)
    w = None if keep is None else keep.to(q.dtype).view(-1, 1)
    qw = q if w is None else q * w
    torch.sum(qw, 0, out=sums[:d])
    torch.sum(qw * q, 0, out=sums[d:2 * d])
    if w is None:
        sums[2 * d].fill_(q.shape[0])
    else:
        torch.sum(w, (0, 1), out=sums[2 * d])
    return sums, w


class _TokenBatchNorm(torch.autograd.Function):
    """Training BatchNorm over tokens: y = (q - mean) * rsqrt(var + eps) * weight + bias, with
    mean and var of the keep-weighted tokens of every rank of ``group``.

    forward(q [T, D] float, weight [D], bias [D], keep [T] or None, group, eps, step_sums) -> y.
    The step's local sums are added to ``step_sums`` here. One collective forward (the sums
    [sum q, sum q^2, count]) and one backward (their gradient), as the differentiated formula.

    Why written out: autograd of the same formula runs ~55 ops per layer and micro-batch, most of
    them on [D] vectors (benchmarks/count_layer_ops.py); at micro-batch 1 the step is host-bound
    and launches are what it spends (see benchmarks/RESULTS.md). This runs ~30, and five
    passes over [T, D] forward and backward where autograd made ~16. The gradient is the
    formula's: through the sums, d sum q = dmean / n and d sum q^2 = dvar / n with
    dmean = -sum(dy) * scale - 2 * mean * dvar, dvar = -1/2 * rstd^2 * scale * sum(dy * (q - mean)).
    """

    @staticmethod
    def forward(ctx, q, weight, bias, keep, group, eps, step_sums):
        d = q.shape[1]
        sums, w = _local_sums(q, keep)
        step_sums += sums          # float64 += float32: summed in float64
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        n = sums[2 * d:].clamp(min=1.0)
        moments = sums[:2 * d].view(2, d) / n
        mean = moments[0]
        raw = torch.addcmul(moments[1], mean, mean, value=-1.0)   # E[q^2] - mean^2
        rstd = torch.rsqrt(raw.clamp(min=0.0) + eps)
        scale = rstd * weight.to(q.dtype)
        y = torch.addcmul(torch.addcmul(bias.to(q.dtype), mean, scale, value=-1.0), q, scale)
        ctx.save_for_backward(q, w, mean, rstd, scale, raw >= 0, n)
        ctx.group, ctx.dtypes = group, (weight.dtype, bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        q, w, mean, rstd, scale, var_live, n = ctx.saved_tensors
        d = q.shape[1]
        xc = q - mean
        sum_dy = dy.sum(0)
        sum_dy_xc = (dy * xc).sum(0)
        grads = torch.empty(2 * d, dtype=q.dtype, device=q.device)   # [d sum q, d sum q^2]
        dvar = grads[d:]
        torch.mul(rstd * rstd * scale, sum_dy_xc, out=dvar)
        dvar.mul_(var_live.to(q.dtype)).mul_(-0.5)              # the clamp at 0 passes nothing
        torch.addcmul(-scale * sum_dy, mean, dvar, value=-2.0, out=grads[:d])
        grads.div_(n)
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(grads, group=ctx.group)   # every rank's outputs use these sums
        # dq = dy * scale + w * (d sum q + 2 q * d sum q^2)
        through = torch.addcmul(grads[:d], q, grads[d:], value=2.0)
        dq = torch.addcmul(dy * scale, through, w) if w is not None else through.add_(dy * scale)
        dweight = (sum_dy_xc * rstd).to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        return dq, dweight, dbias, None, None, None, None


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

    def forward(self, q: torch.Tensor, keep: Optional[torch.Tensor] = None, group=None) -> torch.Tensor:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = q.to(acc)
        if not self.training:
            return self._normalise(q, self.running_mean.to(acc), self.running_var.to(acc))
        if self.mode is QueryNorm.CENTER:
            self.step_sums += _local_sums(q.detach(), keep)[0]
            return q - self.running_mean.to(acc)
        # One pass (one collective); fp32 is enough even at a 99% shared share (rel. error ~1e-5).
        return _TokenBatchNorm.apply(q, self.weight, self.bias, keep, group, self.eps, self.step_sums)

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
