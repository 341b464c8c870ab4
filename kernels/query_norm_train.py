# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The memory query's training normalisation in three Triton kernels forward and three backward:
query BatchNorm over tokens, per-half RMS norm (QK-norm) and its gain, with autograd.

Shapes: q [T, D] (the query projection's output, bf16/fp16/fp32; D = H*2*half), keep [T] or None
(1 = real token, 0 = padding), bn_weight, bn_bias, gain [D] -> out [T, H, 2, half] fp32:
    sums = [sum w q, sum w q^2, sum w]  [2D + 1] fp32    (w = keep or 1; step_sums += sums in fp64;
                                                          all-reduced over ``group`` when TP > 1)
    mean = sums[:D] / n,  var = max(sums[D:2D] / n - mean^2, 0),  n = max(sums[2D], 1)
    y = q * scale + (bn_bias - mean * scale),  scale = rsqrt(var + bn_eps) * bn_weight
    out = y * r * gain,  r = rsqrt(mean(y^2 over each half-row) + qk_eps)        r: [T, 2H] fp32
The formula, the order of its fp32 operations and the gradient through the sums are those of
``megatron_memory/model/query_norm.py`` ``_TokenBatchNorm`` followed by ``layer.MemoryPlus._normalised``
(the torch path, which CPU and eval keep); the tests compare both with a float64 reference.

Why: that torch path is ~60 small ops per memory layer and micro-batch forward+backward, 1.0 ms
of GPU time at T = 8192, D = 2048 on an H200 (and ~1.6 ms of host time), mostly passes over
[T, D] fp32 temporaries and launches of ops on [D] vectors. Here, six kernels:
    forward   _stats_kernel     q -> per token block column partials [R, 2D + 1]  (no atomics)
              _sum_rows_kernel  partials -> sums (fixed order: deterministic), step_sums += sums
              (all_reduce of sums over group)
              _normalise_kernel q, sums -> out, r    (mean/scale computed in-kernel from the sums)
    backward  _grad_reduce_kernel  q, dout, r -> per token block partials [R, 3D] of
                                   dout * yhat (gain grad), dy (bias grad), dy * (q - mean)
              _grad_finish_kernel  partials -> the sums' gradient [2D] (divided by n), the
                                   BN weight/bias and gain gradients in the params' dtypes
              (all_reduce of the sums' gradient over group)
              _grad_apply_kernel   q, dout, r -> dq = dy * scale + w * (g_sum_q + 2 q g_sum_q2)
with yhat = y * r, dyhat = dout * gain, dy = r * (dyhat - yhat * mean_half(dyhat * yhat)); y and
dy are recomputed from q instead of being stored. dout may have any strides (the bf16 search's
dq is head-major). Bytes (e = q's element size): forward 2·T·D·e + T·D·4 (the out write) +
T·2H·4; backward 2·(T·D·e + T·D·4) + T·D·e (dq) + small partials. Deterministic: every sum runs
in a fixed order. Offsets are int64 (T·D may pass 2^31). Double backward is not supported.

Measured (H200, T = 8192, H = 4, half = 256, bf16; benchmarks/bench_query_norm.py): GPU time
0.054 ms forward, 0.137 ms forward+backward (torch path 0.414 / 1.044 ms: 7.6x); per kernel
20 (stats), 2 (sum), 25 (normalise), 45 (reduce), 3 (finish), 34 (apply) us. Eager, the host's
six Triton launches and autograd take ~0.6 ms per forward+backward on that machine (torch path
~1.6 ms), so at small micro-batches the op is launch-bound.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Launch configuration (benchmarks/bench_query_norm.py --sweep times others).
# Per-half-row kernels: (elements of a [BLOCK_T tokens, BLOCK_H = next_pow2(half)] tile, warps).
TILES = {"normalise": (2048, 4), "reduce": (1024, 2), "apply": (2048, 4)}
STATS_TILE = dict(BLOCK_T=32, BLOCK_D=128, num_warps=4)   # forward column sums
TARGET_PROGRAMS = 512    # token blocks x column blocks of the two reduction kernels
FINISH_TILE = dict(BLOCK_R=16, BLOCK=16, num_warps=1)     # [partial rows, columns] of the finish kernels


@triton.jit
def _bn_vectors(sums, bn_w, bn_b, cols, m, D, bn_eps):
    """Per column: n, mean, raw variance, rstd, scale, shift from the sums (fp32, torch's order)."""
    n = tl.maximum(tl.load(sums + 2 * D), 1.0)
    mean = tl.load(sums + cols, mask=m, other=0.0) / n
    raw = tl.load(sums + D + cols, mask=m, other=0.0) / n - mean * mean
    rstd = tl.rsqrt(tl.maximum(raw, 0.0) + bn_eps)
    scale = rstd * tl.load(bn_w + cols, mask=m, other=0.0).to(tl.float32)
    shift = tl.load(bn_b + cols, mask=m, other=0.0).to(tl.float32) - mean * scale
    return n, mean, raw, rstd, scale, shift


@triton.jit
def _stats_kernel(q, keep, partial, T, D, stride_q, rows_per_prog,
                  HAS_KEEP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block p, column block c): partial[p, cols] = sum w q and
    partial[p, D + cols] = sum w q^2 over tokens p*rows_per_prog ...; column block 0 also writes
    partial[p, 2D] = sum w."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    s1 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    s2 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    cnt = tl.zeros([BLOCK_T], tl.float32)
    start = p.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_T):
        rows = start + i + tl.arange(0, BLOCK_T)
        rm = rows < T
        x = tl.load(q + rows[:, None] * stride_q + cols[None, :], mask=rm[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)
        if HAS_KEEP:
            w = tl.load(keep + rows, mask=rm, other=0.0).to(tl.float32)
            xw = x * w[:, None]
        else:
            w = rm.to(tl.float32)
            xw = x
        s1 += xw
        s2 += xw * x
        cnt += w
    base = partial + p.to(tl.int64) * (2 * D + 1)
    tl.store(base + cols, tl.sum(s1, axis=0), mask=cm)
    tl.store(base + D + cols, tl.sum(s2, axis=0), mask=cm)
    if tl.program_id(1) == 0:
        tl.store(base + 2 * D, tl.sum(cnt, axis=0))


@triton.jit
def _sum_rows_kernel(partial, sums, step_sums, R, width,
                     BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """sums[c] = sum over r of partial[r, c] (r in order); step_sums[c] += sums[c] in fp64."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < width
    acc = tl.zeros([BLOCK_R, BLOCK], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(partial + rows[:, None].to(tl.int64) * width + cols[None, :],
                       mask=(rows < R)[:, None] & cm[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(sums + cols, total, mask=cm)
    old = tl.load(step_sums + cols, mask=cm, other=0.0)
    tl.store(step_sums + cols, old + total.to(tl.float64), mask=cm)


@triton.jit
def _half_row(sums, bn_w, bn_b, gain, half, D, bn_eps, BLOCK_H: tl.constexpr):
    """The columns of this program's half-row j = program_id(1) and their per-column vectors:
    (j, hs, hm, cols, mean, scale, shift, gain as fp32)."""
    j = tl.program_id(1)
    hs = tl.arange(0, BLOCK_H)
    hm = hs < half
    cols = j * half + hs
    _, mean, _, _, scale, shift = _bn_vectors(sums, bn_w, bn_b, cols, hm, D, bn_eps)
    g = tl.load(gain + cols, mask=hm, other=0.0).to(tl.float32)
    return j, hs, hm, cols, mean, scale, shift, g


@triton.jit
def _normalise_kernel(q, sums, bn_w, bn_b, gain, out, rinv, T, D, half, halves, stride_q,
                      bn_eps, qk_eps, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token block, half-row j): out and r of columns j*half ... of BLOCK_T tokens."""
    j, _, hm, cols, _, scale, shift, g = _half_row(sums, bn_w, bn_b, gain, half, D, bn_eps,
                                                   BLOCK_H)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = rows < T
    m = rm[:, None] & hm[None, :]
    x = tl.load(q + rows[:, None] * stride_q + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y = tl.where(m, x * scale[None, :] + shift[None, :], 0.0)
    r = tl.rsqrt(tl.sum(y * y, axis=1) / half + qk_eps)
    tl.store(out + rows[:, None] * D + cols[None, :], y * r[:, None] * g[None, :], mask=m)
    tl.store(rinv + rows * halves + j, r, mask=rm)


@triton.jit
def _grad_tile(q, dout, rinv, rows, cols, hs, j, hm, end, stride_q, s_t, s_h, s_c, s_x, halves):
    """Loads of one backward tile (0 from token ``end`` on): q as fp32, r, and dout, whose strides
    (s_t, s_h, s_c, s_x) are those of [T, H, 2, half]: the bf16 search's dq is head-major."""
    rm = rows < end
    m = rm[:, None] & hm[None, :]
    x = tl.load(q + rows[:, None] * stride_q + cols[None, :], mask=m, other=0.0).to(tl.float32)
    r = tl.load(rinv + rows * halves + j, mask=rm, other=0.0)
    jj = j.to(tl.int64)
    base = dout + (jj // 2) * s_h + (jj % 2) * s_c
    do = tl.load(base + rows[:, None] * s_t + hs[None, :] * s_x, mask=m, other=0.0)
    return x, r, do


@triton.jit
def _rms_grad(x, r, do, m, scale, shift, g, half):
    """-> (yhat = y * r, dy: the gradient reaching y) of a loaded tile; 0 outside mask m."""
    yhat = tl.where(m, (x * scale[None, :] + shift[None, :]) * r[:, None], 0.0)
    dyhat = do * g[None, :]
    c = tl.sum(dyhat * yhat, axis=1) / half
    dy = tl.where(m, r[:, None] * (dyhat - yhat * c[:, None]), 0.0)
    return yhat, dy


@triton.jit
def _grad_reduce_kernel(q, dout, rinv, sums, bn_w, bn_b, gain, partial, T, D, half, halves,
                        stride_q, s_t, s_h, s_c, s_x, rows_per_prog, bn_eps,
                        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token block p, half-row j): partial[p, k*D + cols] for k = 0, 1, 2 = the column
    sums of dout * yhat, dy and dy * (q - mean) over tokens p*rows_per_prog ..."""
    p = tl.program_id(0)
    j, hs, hm, cols, mean, scale, shift, g = _half_row(sums, bn_w, bn_b, gain, half, D, bn_eps,
                                                       BLOCK_H)
    acc_g = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    acc_dy = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    acc_dyx = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    start = p.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_T):
        rows = start + i + tl.arange(0, BLOCK_T)
        m = (rows < T)[:, None] & hm[None, :]
        x, r, do = _grad_tile(q, dout, rinv, rows, cols, hs, j, hm, T, stride_q, s_t, s_h, s_c,
                              s_x, halves)
        yhat, dy = _rms_grad(x, r, do, m, scale, shift, g, half)
        acc_g += do * yhat
        acc_dy += dy
        acc_dyx += dy * tl.where(m, x - mean[None, :], 0.0)
    base = partial + p.to(tl.int64) * (3 * D) + cols
    tl.store(base, tl.sum(acc_g, axis=0), mask=hm)
    tl.store(base + D, tl.sum(acc_dy, axis=0), mask=hm)
    tl.store(base + 2 * D, tl.sum(acc_dyx, axis=0), mask=hm)


@triton.jit
def _grad_finish_kernel(partial, sums, bn_w, bn_b, gsums, dweight, dbias, dgain, R, D, bn_eps,
                        BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """Columns c: the partials summed over r in order, then (as _TokenBatchNorm.backward)
    dvar = rstd^2 scale sum(dy (q - mean)) [var > 0 or clamp live] * -1/2,
    gsums = [-scale sum(dy) - 2 mean dvar, dvar] / n; dweight = sum(dy (q - mean)) rstd,
    dbias = sum(dy), dgain = sum(dout yhat) (stored in the params' dtypes)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < D
    a_g = tl.zeros([BLOCK_R, BLOCK], tl.float32)
    a_dy = tl.zeros([BLOCK_R, BLOCK], tl.float32)
    a_dyx = tl.zeros([BLOCK_R, BLOCK], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ptr = partial + rows[:, None].to(tl.int64) * (3 * D) + cols[None, :]
        m = (rows < R)[:, None] & cm[None, :]
        a_g += tl.load(ptr, mask=m, other=0.0)
        a_dy += tl.load(ptr + D, mask=m, other=0.0)
        a_dyx += tl.load(ptr + 2 * D, mask=m, other=0.0)
    s_g, s_dy, s_dyx = tl.sum(a_g, axis=0), tl.sum(a_dy, axis=0), tl.sum(a_dyx, axis=0)
    n, mean, raw, rstd, scale, _ = _bn_vectors(sums, bn_w, bn_b, cols, cm, D, bn_eps)
    dvar = rstd * rstd * scale * s_dyx
    dvar = dvar * (raw >= 0.0).to(tl.float32) * -0.5
    dmean = -scale * s_dy - 2.0 * mean * dvar
    tl.store(gsums + cols, dmean / n, mask=cm)
    tl.store(gsums + D + cols, dvar / n, mask=cm)
    tl.store(dweight + cols, s_dyx * rstd, mask=cm)
    tl.store(dbias + cols, s_dy, mask=cm)
    tl.store(dgain + cols, s_g, mask=cm)


@triton.jit
def _grad_apply_kernel(q, dout, rinv, keep, sums, bn_w, bn_b, gain, gsums, dq, T, D, half,
                       halves, stride_q, s_t, s_h, s_c, s_x, bn_eps, HAS_KEEP: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token block, half-row j): dq = dy * scale + w * (gsums[c] + 2 q gsums[D + c])."""
    j, hs, hm, cols, _, scale, shift, g = _half_row(sums, bn_w, bn_b, gain, half, D, bn_eps,
                                                    BLOCK_H)
    g1 = tl.load(gsums + cols, mask=hm, other=0.0)
    g2 = tl.load(gsums + D + cols, mask=hm, other=0.0)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = rows < T
    m = rm[:, None] & hm[None, :]
    x, r, do = _grad_tile(q, dout, rinv, rows, cols, hs, j, hm, T, stride_q, s_t, s_h, s_c, s_x,
                          halves)
    _, dy = _rms_grad(x, r, do, m, scale, shift, g, half)
    through = g1[None, :] + 2.0 * x * g2[None, :]
    if HAS_KEEP:
        through = through * tl.load(keep + rows, mask=rm, other=0.0).to(tl.float32)[:, None]
    tl.store(dq + rows[:, None] * D + cols[None, :], dy * scale[None, :] + through, mask=m)


def _tile(half: int, kind: str) -> dict:
    """The [BLOCK_T tokens, BLOCK_H columns] tile of a per-half-row kernel (TILES); fewer warps
    for tiles under 256 elements per warp."""
    elems, warps = TILES[kind]
    block_h = triton.next_power_of_2(half)
    block_t = max(1, min(32, elems // block_h))
    return dict(BLOCK_T=block_t, BLOCK_H=block_h,
                num_warps=max(1, min(warps, block_t * block_h // 256)))


def _rows_per_program(T: int, block_t: int, col_programs: int) -> int:
    """Tokens per program of a reduction kernel: about TARGET_PROGRAMS programs in all, whole
    tiles, so R = ceil(T / rows) partial rows (a runtime argument: no recompile per T)."""
    target_r = max(1, TARGET_PROGRAMS // col_programs)
    return block_t * max(1, triton.cdiv(T, block_t * target_r))


def _all_reduce(t: torch.Tensor, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)


class _QueryNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, bn_weight, bn_bias, gain, keep, group, bn_eps, qk_eps, half, step_sums):
        T, D = q.shape
        halves = D // half
        # sums: column block partials, then their fixed-order sum (also added to step_sums)
        stats = dict(STATS_TILE, BLOCK_D=min(STATS_TILE["BLOCK_D"], triton.next_power_of_2(D)))
        col_blocks = triton.cdiv(D, stats["BLOCK_D"])
        rows = _rows_per_program(T, stats["BLOCK_T"], col_blocks)
        R = triton.cdiv(T, rows)
        partial = torch.empty(R, 2 * D + 1, dtype=torch.float32, device=q.device)
        if R:
            _stats_kernel[(R, col_blocks)](q, keep if keep is not None else q, partial, T, D,
                                           q.stride(0), rows, HAS_KEEP=keep is not None, **stats)
        # the sums [2D + 1] and r [T, 2H], both kept for the backward, in one allocation
        saved = torch.empty(2 * D + 1 + T * halves, dtype=torch.float32, device=q.device)
        sums, rinv = saved[:2 * D + 1], saved[2 * D + 1:].view(T, halves)
        _sum_rows_kernel[(triton.cdiv(2 * D + 1, FINISH_TILE["BLOCK"]),)](
            partial, sums, step_sums, R, 2 * D + 1, **FINISH_TILE)
        _all_reduce(sums, group)
        out = torch.empty(T, halves // 2, 2, half, dtype=torch.float32, device=q.device)
        tile = _tile(half, "normalise")
        if T:
            _normalise_kernel[(triton.cdiv(T, tile["BLOCK_T"]), halves)](
                q, sums, bn_weight, bn_bias, gain, out, rinv, T, D, half, halves, q.stride(0),
                float(bn_eps), float(qk_eps), **tile)
        ctx.save_for_backward(q, keep, sums, rinv, bn_weight, bn_bias, gain)
        ctx.group, ctx.bn_eps, ctx.half = group, float(bn_eps), half
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, keep, sums, rinv, bn_weight, bn_bias, gain = ctx.saved_tensors
        T, D = q.shape
        half, halves, eps = ctx.half, D // ctx.half, ctx.bn_eps
        tile = _tile(half, "reduce")
        rows = _rows_per_program(T, tile["BLOCK_T"], halves)
        R = triton.cdiv(T, rows)
        # the sums' gradient [2D] = [d sum q, d sum q^2] and the partial sums [R, 3D]
        buf = torch.empty(2 * D + R * 3 * D, dtype=torch.float32, device=q.device)
        gsums, partial = buf[:2 * D], buf[2 * D:].view(R, 3 * D)
        if R:
            _grad_reduce_kernel[(R, halves)](
                q, dout, rinv, sums, bn_weight, bn_bias, gain, partial, T, D, half, halves,
                q.stride(0), *dout.stride(), rows, eps, **tile)
        dweight = torch.empty(D, dtype=bn_weight.dtype, device=q.device)
        dbias = torch.empty(D, dtype=bn_bias.dtype, device=q.device)
        dgain = torch.empty(D, dtype=gain.dtype, device=q.device)
        _grad_finish_kernel[(triton.cdiv(D, FINISH_TILE["BLOCK"]),)](
            partial, sums, bn_weight, bn_bias, gsums, dweight, dbias, dgain, R, D, eps, **FINISH_TILE)
        _all_reduce(gsums, ctx.group)   # every rank's outputs use these sums
        dq = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty(T, D, dtype=q.dtype, device=q.device)
            tile = _tile(half, "apply")
            if T:
                _grad_apply_kernel[(triton.cdiv(T, tile["BLOCK_T"]), halves)](
                    q, dout, rinv, keep if keep is not None else q, sums, bn_weight, bn_bias,
                    gain, gsums, dq, T, D, half, halves, q.stride(0), *dout.stride(), eps,
                    HAS_KEEP=keep is not None, **tile)
        need = ctx.needs_input_grad
        return (dq, dweight if need[1] else None, dbias if need[2] else None,
                dgain if need[3] else None, None, None, None, None, None, None)


def _check(q, bn_weight, bn_bias, gain, half, step_sums, keep) -> None:
    """One clear ValueError for bad shapes, dtypes or devices, before any compute."""
    if q.dim() != 2 or half < 1 or q.shape[1] % (2 * half):
        raise ValueError(f"query_norm_train: q must be [T, H*2*half] with half={half}, got {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise ValueError(f"query_norm_train: q must be bf16, fp16 or fp32, got {q.dtype}")
    D = q.shape[1]
    for name, v in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("gain", gain)):
        if v is None or v.shape != (D,) or v.dtype not in DTYPES or v.device != q.device:
            got = None if v is None else (v.dtype, tuple(v.shape), str(v.device))
            raise ValueError(f"query_norm_train: {name} must be a bf16/fp16/fp32 [{D}] vector on "
                             f"{q.device}, got {got}")
    if (step_sums is None or step_sums.shape != (2 * D + 1,) or step_sums.dtype != torch.float64
            or step_sums.device != q.device or not step_sums.is_contiguous()):
        got = None if step_sums is None else (step_sums.dtype, tuple(step_sums.shape), str(step_sums.device))
        raise ValueError(f"query_norm_train: step_sums must be a contiguous float64 [{2 * D + 1}] "
                         f"buffer on {q.device}, got {got}")
    if keep is not None and (keep.shape != (q.shape[0],) or not keep.is_floating_point()
                             or keep.device != q.device):
        raise ValueError(f"query_norm_train: keep must be None or a float [{q.shape[0]}] tensor on "
                         f"{q.device}, got {(keep.dtype, tuple(keep.shape), str(keep.device))}")


def query_norm_train(q: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                     gain: torch.Tensor, bn_eps: float, qk_eps: float, half: int,
                     step_sums: torch.Tensor, keep: Optional[torch.Tensor] = None,
                     group=None) -> torch.Tensor:
    """q [T, H*2*half] -> [T, H, 2, half] fp32 with batch statistics (module docstring);
    differentiable in q, bn_weight, bn_bias and gain. Adds this rank's sums to ``step_sums``
    (float64 [2D + 1]); ``group``: the ranks whose tokens share the statistics (None: here only)."""
    _check(q, bn_weight, bn_bias, gain, half, step_sums, keep)
    q = q if q.stride(1) == 1 else q.contiguous()
    keep = None if keep is None else keep.contiguous()
    params = [p if p.is_contiguous() else p.contiguous() for p in (bn_weight, bn_bias, gain)]
    return _QueryNormTrain.apply(q, *params, keep, group, bn_eps, qk_eps, half, step_sums)
