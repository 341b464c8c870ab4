# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Weighted EmbeddingBag in Triton: out[t] = sum_b w[t, b] * V[idx[t, b]].

Shapes: V [N, d] (bf16/fp16/fp32), idx [T, bag] (int32/int64), w [T, bag] (fp32/bf16/fp16),
out [T, d] in V's dtype. Every sum runs in fp32.

The op is memory bound: forward reads T*bag gathered rows, backward reads them again plus the
output-gradient rows and read-modify-writes the table gradient. The table gradient goes straight
into the buffer the optimizer reads (Megatron's fp32 ``main_grad`` or ``.grad``), touching only
the rows used: no [T, bag, d] intermediate, no dense zero-filled temporary, no fold pass.

Backward strategies (see kernels/README.md for the byte counts):
  segment  sort the flat indices, one program per run of equal rows (split every SEGMENT_CHUNK
           occurrences; split runs are summed in a second pass in a fixed order): deterministic.
           No host sync: the plan's arrays and the grids are sized by static bounds
           (``plan_bounds``), the real counts stay on the device and the kernels read them.
  atomic   one program per token scatters w * g[t] with fp32 atomics: nondeterministic, fp32
           buffers only (other buffers fall back to segment).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_memory.kernels.reference import embedding_bag_reference
from megatron_memory.kernels.segment_plan import segment_plan

# The strategy used when deterministic=None; chosen by measurement (benchmarks/RESULTS.md).
DEFAULT_STRATEGY = "segment"
# Most occurrences of one row a segment program reduces; longer runs (hot rows) are split over
# programs whose fp32 partial sums a second kernel adds in order, so a row used by every token
# costs T*bag/SEGMENT_CHUNK parallel programs rather than one serial one.
SEGMENT_CHUNK = 512

_TABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors allowed, kernels run in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(values, indices, weights, out, bag, d, stride_v, stride_o,
                    BAG_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (t, column block): out[t, cols] = sum_b w[t, b] * V[idx[t, b], cols].

    Each iteration gathers a [BAG_BLOCK, BLOCK_D] tile: BAG_BLOCK independent row segments, each
    read with 16-byte vector loads, so many requests are in flight per thread (latency hiding
    without relying on occupancy alone). Row indices go to int64 before the multiply: N*d may
    exceed 2**31.
    """
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    bs = tl.arange(0, BAG_BLOCK)
    rows = tl.load(indices + t * bag + bs, mask=bs < bag, other=0).to(tl.int64)
    w = tl.load(weights + t * bag + bs, mask=bs < bag, other=0.0).to(tl.float32)
    for b0 in range(0, bag, BAG_BLOCK):
        v = tl.load(values + rows[:, None] * stride_v + cols[None, :],
                    mask=(b0 + bs < bag)[:, None] & cmask[None, :], other=0.0)
        # Prefetch the next tile's indices while the row loads are in flight: the gather
        # address depends on them, so this takes one memory latency off every iteration.
        nb = b0 + BAG_BLOCK + bs
        rows_next = tl.load(indices + t * bag + nb, mask=nb < bag, other=0).to(tl.int64)
        w_next = tl.load(weights + t * bag + nb, mask=nb < bag, other=0.0).to(tl.float32)
        acc += tl.sum(v.to(tl.float32) * w[:, None], axis=0)
        rows = rows_next
        w = w_next
    tl.store(out + t * stride_o + cols, acc.to(out.dtype.element_ty), mask=cmask)


@triton.jit
def _segment_kernel(grad_out, values, weights, sorted_pos, chunk_start, chunk_row, chunk_slot,
                    n_chunks, buf, partial, dots, M, bag, d, stride_g, stride_v, stride_b,
                    NEED_DOTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                    SORTED: tl.constexpr = False):
    """Program (p, column block): chunks c = p, p + P, ... below the device-side count
    ``n_chunks[0]`` (P = programs launched), each one run of equal rows r in sorted order.

    acc = sum over the run of w[pos] * g[pos // bag] (fp32); the program owns row r of ``buf``
    (slot < 0) and read-modify-writes it once, or (slot >= 0, a split hot row) stores acc to
    ``partial[slot]`` for _fold_kernel. With NEED_DOTS it also writes the partial weight grads
    dots[block, pos] = <g[pos // bag], V[r]> over its columns, fused: both rows are in registers.
    Each flat position lies in exactly one chunk and each chunk in one program, so every dots
    entry and every owned row is written exactly once, whatever P is. The count stays on the
    device (no host sync): the grid is sized by a static bound (launch_segment_backward).
    SORTED (the deferred fold, ``launch_fold``; no dots): ``sorted_pos`` holds the grad_out row
    of each sorted position and ``weights`` are already in sorted order, so a program reads both
    sequentially instead of gathering a weight per occurrence.
    """
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    count = tl.load(n_chunks)
    for c in range(tl.program_id(0), count, tl.num_programs(0)):
        start = tl.load(chunk_start + c)
        end = tl.load(chunk_start + c + 1)
        row = tl.load(chunk_row + c).to(tl.int64)
        slot = tl.load(chunk_slot + c)
        # Issued before the loop so its latency overlaps the gradient-row loads.
        old = tl.load(buf + row * stride_b + cols, mask=cmask & (slot < 0), other=0.0).to(tl.float32)
        if NEED_DOTS:
            v = tl.load(values + row * stride_v + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pmask = p < end
            pos = tl.load(sorted_pos + p, mask=pmask, other=0).to(tl.int64)
            if SORTED:
                w = tl.load(weights + p, mask=pmask, other=0.0).to(tl.float32)
                tok = pos
            else:
                w = tl.load(weights + pos, mask=pmask, other=0.0).to(tl.float32)
                tok = pos // bag
            g = tl.load(grad_out + tok[:, None] * stride_g + cols[None, :],
                        mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(g * w[:, None], axis=0)
            if NEED_DOTS:
                tl.store(dots + pid_d.to(tl.int64) * M + pos, tl.sum(g * v[None, :], axis=1),
                         mask=pmask)
        if slot < 0:
            tl.store(buf + row * stride_b + cols, (old + acc).to(buf.dtype.element_ty), mask=cmask)
        else:
            tl.store(partial + slot.to(tl.int64) * d + cols, acc, mask=cmask)


@triton.jit
def _fold_kernel(partial, fold_row, fold_slot, buf, d, stride_b,
                 BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (split row, column block): buf[row] += sum of its partial rows, in slot order
    (deterministic), one read-modify-write of the row. The grid is a static bound on the split
    rows; a program past the device-side count has an empty slot range (s0 == s1) and writes
    nothing (its row is a stand-in that a real fold may own)."""
    f = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row = tl.load(fold_row + f).to(tl.int64)
    s0 = tl.load(fold_slot + f)
    s1 = tl.load(fold_slot + f + 1)
    cmask = (cols < d) & (s1 > s0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(s0, s1, BLOCK_S):
        ss = (s + tl.arange(0, BLOCK_S)).to(tl.int64)
        x = tl.load(partial + ss[:, None] * d + cols[None, :],
                    mask=(ss < s1)[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(x, axis=0)
    ptrs = buf + row * stride_b + cols
    old = tl.load(ptrs, mask=cmask, other=0.0).to(tl.float32)
    tl.store(ptrs, (old + acc).to(buf.dtype.element_ty), mask=cmask)


@triton.jit
def _token_kernel(grad_out, values, indices, weights, buf, dots, M, bag, d,
                  stride_g, stride_v, stride_b, NEED_DOTS: tl.constexpr, SCATTER: tl.constexpr,
                  BAG_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (t, column block): loads g[t] once; SCATTER atomically adds w * g[t] into the
    fp32 ``buf`` rows (relaxed: only the sum matters); NEED_DOTS writes the partial weight
    grads <g[t], V[idx]> over its columns."""
    t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    g = tl.load(grad_out + t * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
    bs = tl.arange(0, BAG_BLOCK)
    rows = tl.load(indices + t * bag + bs, mask=bs < bag, other=0).to(tl.int64)
    for b0 in range(0, bag, BAG_BLOCK):
        bmask = b0 + bs < bag
        m2 = bmask[:, None] & cmask[None, :]
        if NEED_DOTS:
            v = tl.load(values + rows[:, None] * stride_v + cols[None, :], mask=m2, other=0.0)
        # Prefetch the next tile's indices while the row loads are in flight (as the forward
        # does): the gather address depends on them, so this takes one memory latency off
        # every iteration (measured ~10% faster on an H200, uniform and zipf indices;
        # benchmarks/RESULTS.md).
        nb = b0 + BAG_BLOCK + bs
        rows_next = tl.load(indices + t * bag + nb, mask=nb < bag, other=0).to(tl.int64)
        if NEED_DOTS:
            dot = tl.sum(v.to(tl.float32) * g[None, :], axis=1)
            tl.store(dots + pid_d.to(tl.int64) * M + t * bag + b0 + bs, dot, mask=bmask)
        if SCATTER:
            w = tl.load(weights + t * bag + b0 + bs, mask=bmask, other=0.0).to(tl.float32)
            tl.atomic_add(buf + rows[:, None] * stride_b + cols[None, :], w[:, None] * g[None, :],
                          mask=m2, sem="relaxed")
        rows = rows_next


# --------------------------------------------------------------------------------------------
# Launch configurations (chosen by d and element size; see kernels/README.md)
# --------------------------------------------------------------------------------------------

def _warps(tile: int) -> int:
    """Warps for a tile of `tile` elements: ~64 elements per thread keeps 4-8 vector loads in
    flight per thread without spilling."""
    return max(1, min(8, tile // 2048))


def gather_config(d: int, esize: int, bag: int) -> dict:
    """BLOCK_D / BAG_BLOCK / num_warps of the row-gathering kernels (forward, token)."""
    block_d = max(16, min(triton.next_power_of_2(d), 2048 // esize))
    budget = 16384 // esize                    # elements of one gathered tile (16 KiB of table)
    bag_block = max(1, min(triton.next_power_of_2(max(bag, 1)), budget // block_d, 32))
    return dict(BLOCK_D=block_d, BAG_BLOCK=bag_block, num_warps=_warps(block_d * bag_block))


def segment_config(d: int, esize: int) -> dict:
    """Small programs, many in flight: a run averages ~1.6 occurrences at T*bag ~ N, so each
    program is a short chain of dependent loads and occupancy hides their latency. In an H200
    sweep at d=4096, T=8192 (benchmarks/tune_segment.py; benchmarks/RESULTS.md): BLOCK_D=512
    (bf16), one occurrence per step, 2 warps ran fwd+bwd+main_grad fastest, ahead of 1024/2/2 and
    1024/4/4, and zipf-skewed indices stayed close to the best swept config."""
    block_d = max(16, min(triton.next_power_of_2(d), 1024 // esize))
    return dict(BLOCK_D=block_d, BLOCK_P=1, num_warps=max(1, min(8, block_d // 256)))


# The deferred fold's tile, from the H200 sweep of ``bench_table_grad.py --sweep`` (24 lookups,
# benchmarks/RESULTS.md): each program keeps BLOCK_P gradient slices of BLOCK_D columns in
# flight on one warp. 128 x 8 on 1 warp folded faster than the per-lookup tile (512 x 1 on
# 2 warps). Narrower blocks, meant to keep one block's slice of every gradient in L2,
# were slower (64 columns): every occurrence still moves its gradient slice, from L2
# instead of HBM, and L2 bandwidth is not much above HBM's.
FOLD_TILE = dict(BLOCK_D=128, BLOCK_P=8, num_warps=1)
# Occurrences of one row per fold chunk: the step's runs are ~lookups x longer than one lookup's,
# and the fp32 partial buffer is sized by M / FOLD_CHUNK (64 MiB at 2^24 occurrences, d = 2048).
FOLD_CHUNK = 4096
# Programs per SM along the fold's chunk axis (each walks chunks p, p + P, ...). One-warp
# programs: more of them resident hide more gather latency. H200, 24 zipf lookups at d = 2048
# (benchmarks/RESULTS.md): the time fell steadily from 4 to 128 programs per SM.
FOLD_PROGRAMS_PER_SM = 128


def fold_config(d: int) -> dict:
    """BLOCK_D / BLOCK_P / num_warps of the deferred fold (``launch_fold``): FOLD_TILE, its
    columns capped at next_pow2(d) (16 at least)."""
    return dict(FOLD_TILE, BLOCK_D=max(16, min(FOLD_TILE["BLOCK_D"], triton.next_power_of_2(d))))


# --------------------------------------------------------------------------------------------
# Launchers (also used by kernels/triton_product_key.py for its backward)
# --------------------------------------------------------------------------------------------

def launch_forward(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                   out_dtype: Optional[torch.dtype] = None, config: Optional[dict] = None):
    """values [N, d] (row stride free, unit column stride), indices/weights [T, bag] -> [T, d]."""
    T, bag = indices.shape
    d = values.shape[1]
    out = torch.empty(T, d, dtype=out_dtype or values.dtype, device=values.device)
    if T == 0 or d == 0:
        return out
    cfg = dict(config or gather_config(d, values.element_size(), bag))
    grid = (T, triton.cdiv(d, cfg["BLOCK_D"]))
    _forward_kernel[grid](values, indices.contiguous(), weights.contiguous(), out, bag, d,
                          values.stride(0), out.stride(0), **cfg)
    return out


# Segment-kernel grid: programs x column blocks ~ SEGMENT_BLOCKS_PER_SM per SM (at most one
# program per possible chunk). Each program walks chunks p, p + P, ... to the device-side count,
# so the grid needs no count from the host, and no program slot is spent on chunks that the
# bound allows but the indices do not have (about 1/3 of the bound at T*bag ~ N).
SEGMENT_BLOCKS_PER_SM = 512


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (an index-less device is the current one)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def segment_programs(bound: int, n_dblk: int, device: torch.device) -> int:
    """Programs along the chunk axis of _segment_kernel's grid: min(bound, SMs x
    SEGMENT_BLOCKS_PER_SM / column blocks); the bound itself off CUDA (the interpreter)."""
    if device.type != "cuda":
        return max(1, bound)
    return max(1, min(bound, triton.cdiv(_sm_count(device) * SEGMENT_BLOCKS_PER_SM, n_dblk)))


def launch_segment_backward(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                            weights: torch.Tensor, buf: torch.Tensor, need_dots: bool,
                            chunk: Optional[int] = None, config: Optional[dict] = None,
                            programs: Optional[int] = None):
    """buf[r] += sum_{(t,b): idx[t,b]=r} w[t,b] * grad_out[t] (fp32 sums, one RMW per row);
    returns the fp32 weight grads [T, bag] = <grad_out[t], V[idx[t, b]]> if need_dots else None.

    grad_out [T, d], values [N, d] (read only for the dots), buf [N, d] any float dtype.
    No host sync: every size comes from shapes and ``plan_bounds``. programs: the chunk axis of
    the kernel's grid (default ``segment_programs``; any value gives the same result).
    """
    T, bag = indices.shape
    M, d = indices.numel(), buf.shape[1]
    dev = buf.device
    if M == 0 or d == 0:
        return torch.zeros(T, bag, dtype=torch.float32, device=dev) if need_dots else None
    plan = segment_plan(indices, values.shape[0], chunk or SEGMENT_CHUNK)
    sorted_pos, chunk_start, chunk_row, chunk_slot, n_chunks, fold_row, fold_slot, S = plan
    cfg = dict(config or segment_config(d, grad_out.element_size()))
    n_dblk = triton.cdiv(d, cfg["BLOCK_D"])
    dots = torch.empty(n_dblk if need_dots else 1, M, dtype=torch.float32, device=dev)
    partial = torch.empty(max(S, 1), d, dtype=torch.float32, device=dev)
    grid = (programs or segment_programs(chunk_row.numel(), n_dblk, dev), n_dblk)
    _segment_kernel[grid](
        grad_out, values, weights.contiguous(), sorted_pos, chunk_start, chunk_row, chunk_slot,
        n_chunks, buf, partial, dots, M, bag, d, grad_out.stride(0), values.stride(0),
        buf.stride(0), NEED_DOTS=need_dots, **cfg)
    _fold_split_rows(partial, fold_row, fold_slot, buf)
    return dots.sum(0).view(T, bag) if need_dots else None


def _fold_split_rows(partial, fold_row, fold_slot, buf) -> None:
    """Add the split (hot) rows' fp32 partial sums into buf, in slot order."""
    if fold_row.numel():
        d = buf.shape[1]
        fold_d = max(16, min(triton.next_power_of_2(d), 256))
        _fold_kernel[(fold_row.numel(), triton.cdiv(d, fold_d))](
            partial, fold_row, fold_slot, buf, d, buf.stride(0), BLOCK_S=16, BLOCK_D=fold_d,
            num_warps=2)


def launch_fold(grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                buf: torch.Tensor, chunk: Optional[int] = None, config: Optional[dict] = None,
                programs: Optional[int] = None) -> None:
    """buf[r] += sum_{(t,b): idx[t,b]=r} w[t,b] * grad_out[t], for the many lookups of a step
    concatenated (DeferredTableGrad.fold): grad_out [T, d], indices/weights [T, bag], buf [N, d].

    The segment kernel in its SORTED form (tokens and weights read in sorted order, not
    gathered per occurrence) with the fold's own tile (``fold_config``), and chunks of
    FOLD_CHUNK occurrences. Deterministic (fixed chunk and slot order, like
    ``launch_segment_backward``); no host sync. chunk: the most occurrences one program reduces
    (FOLD_CHUNK); config and programs: any value gives the same sums.
    """
    T, bag = indices.shape
    M, d = indices.numel(), buf.shape[1]
    if M == 0 or d == 0:
        return
    plan = segment_plan(indices, buf.shape[0], chunk or FOLD_CHUNK)
    sorted_pos, chunk_start, chunk_row, chunk_slot, n_chunks, fold_row, fold_slot, S = plan
    # Each column block reads the plan again: tokens and weights in sorted order, 4 + 4 bytes.
    tokens = torch.div(sorted_pos, bag, rounding_mode="floor").to(torch.int32)
    sorted_w = weights.reshape(-1).to(torch.float32)[sorted_pos]
    del sorted_pos
    cfg = dict(config or fold_config(d))
    n_dblk = triton.cdiv(d, cfg["BLOCK_D"])
    partial = torch.empty(max(S, 1), d, dtype=torch.float32, device=buf.device)
    if programs is None and buf.device.type == "cuda":
        programs = _sm_count(buf.device) * FOLD_PROGRAMS_PER_SM
    grid = (max(1, min(chunk_row.numel(), programs or chunk_row.numel())), n_dblk)
    _segment_kernel[grid](
        grad_out, buf, sorted_w, tokens, chunk_start, chunk_row, chunk_slot, n_chunks, buf,
        partial, partial, M, 1, d, grad_out.stride(0), 0, buf.stride(0), NEED_DOTS=False,
        SORTED=True, **cfg)
    _fold_split_rows(partial, fold_row, fold_slot, buf)


def launch_token_backward(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                          weights: torch.Tensor, buf: Optional[torch.Tensor], need_dots: bool,
                          config: Optional[dict] = None):
    """Atomic strategy (buf fp32, or None for the weight grads alone): same contract as
    launch_segment_backward."""
    T, bag = indices.shape
    M, d = indices.numel(), values.shape[1]
    dev = values.device
    if M == 0 or d == 0:
        return torch.zeros(T, bag, dtype=torch.float32, device=dev) if need_dots else None
    cfg = dict(config or gather_config(d, values.element_size(), bag))
    n_dblk = triton.cdiv(d, cfg["BLOCK_D"])
    dots = torch.empty(n_dblk if need_dots else 1, M, dtype=torch.float32, device=dev)
    target = buf if buf is not None else dots
    _token_kernel[(T, n_dblk)](
        grad_out, values, indices.contiguous(), weights.contiguous(), target, dots, M, bag, d,
        grad_out.stride(0), values.stride(0), target.stride(0), NEED_DOTS=need_dots,
        SCATTER=buf is not None, **cfg)
    return dots.sum(0).view(T, bag) if need_dots else None


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

def _strategy(deterministic: Optional[bool]) -> str:
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return "segment"
    return "atomic" if deterministic is False else DEFAULT_STRATEGY


def _owns_grad(values: torch.Tensor) -> bool:
    """A trainable leaf Parameter: its gradient is accumulated in place, not returned."""
    return isinstance(values, torch.nn.Parameter) and values.is_leaf and values.requires_grad


def _grad_buffer(param: torch.nn.Parameter) -> torch.Tensor:
    """Megatron DDP's main_grad if set; else .grad, zero-created on first use in the param's
    dtype (autograd requires .grad to match it; the kernels still sum in fp32 and round once
    per row and step)."""
    main = getattr(param, "main_grad", None)
    if main is not None:
        return main
    if param.grad is None:
        param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
    if param.grad.stride(-1) != 1:
        raise ValueError("embedding_bag: the table's .grad needs unit column stride, got "
                         f"strides {tuple(param.grad.stride())}")
    return param.grad


def _table_backward(grad_out, values, indices, weights, buf, need_dots, deterministic):
    """Accumulate the table gradient into buf; return the fp32 weight grads (or None)."""
    if _strategy(deterministic) == "atomic" and buf.dtype == torch.float32:
        return launch_token_backward(grad_out, values, indices, weights, buf, need_dots)
    return launch_segment_backward(grad_out, values, indices, weights, buf, need_dots)


class _EmbeddingBag(torch.autograd.Function):
    """forward(values [N, d], indices [T, bag], weights [T, bag], deterministic) -> [T, d].

    backward: weight grads are returned; the table gradient of a trainable Parameter goes into
    its main_grad/.grad (None is returned for it), then ``memory_grad_ready_hook()`` runs if set;
    if the Parameter carries a ``memory_deferred_grad`` (DeferredTableGrad), its gradient is only
    recorded there, for the caller's ``fold()``. Any other table gets a normal dense gradient.
    """

    @staticmethod
    def forward(ctx, values, indices, weights, deterministic):
        ctx.save_for_backward(values, indices, weights)
        ctx.param = values  # the Python object: main_grad / hooks are attributes on it
        ctx.deterministic = deterministic
        return launch_forward(values, indices, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        need_v, _, need_w, _ = ctx.needs_input_grad
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        param = ctx.param
        grad_v = grad_w = None
        deferred = getattr(param, "memory_deferred_grad", None) if need_v else None
        if deferred is not None and _owns_grad(param):  # table gradient later, in one pass
            deferred.add(grad_out, indices, weights, param)
            dots = launch_token_backward(grad_out, values, indices, weights, None, True) \
                if need_w else None
        elif need_v:
            owned = _owns_grad(param)
            if owned:
                buf = _grad_buffer(param)
            else:  # a returned gradient; fp32 when atomics will add into it
                atomic = _strategy(ctx.deterministic) == "atomic"
                buf = torch.zeros(values.shape, device=values.device,
                                  dtype=torch.float32 if atomic else values.dtype)
            dots = _table_backward(grad_out, values, indices, weights, buf, need_w,
                                   ctx.deterministic)
            if owned:
                hook = getattr(param, "memory_grad_ready_hook", None)
                if callable(hook):
                    hook()
            else:
                grad_v = buf.to(values.dtype)
        elif need_w:
            dots = launch_token_backward(grad_out, values, indices, weights, None, True)
        if need_w:
            grad_w = dots.to(weights.dtype)
        return grad_v, None, grad_w, None


class DeferredTableGrad:
    """The table gradient of many lookups, added to the gradient buffer in one sorted pass.

    Why: every lookup's backward read-modify-writes the fp32 ``main_grad`` rows it touched
    (16 KB read + 16 KB written per row at d = 4096); with M micro-batches x L memory layers per
    step sharing one table, the rows touched overlap heavily, so one pass over all of them at
    the end of the step moves far fewer bytes. Cost: each lookup's output gradient [T, d] (and
    its indices and weights) stays alive until ``fold()``, plus one concatenated copy during it;
    the weight gradients are computed at once (token kernel), which reads the gathered rows.
    ``fold()`` is deterministic, but sums in another order than per-lookup passes (fp32
    rounding differs in the last bits).

    Memory can be bounded: once the recorded bytes reach ``max_bytes`` (None: no bound), ``add``
    folds them into the table's buffer at once, so a step of many micro-batches keeps at most
    about max_bytes recorded (twice that during a fold, for the concatenation). ``folded`` tells
    the owner that some gradient reached the buffer since its last ``clear``/``take_folded``
    (an early fold empties the record, so "nothing pending" does not mean "nothing added").
    """

    def __init__(self, max_bytes: Optional[int] = None):
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.max_bytes = float("inf") if max_bytes is None else max_bytes
        self.recorded = 0   # bytes held in parts
        self.folded = False

    def add(self, grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            values: Optional[torch.nn.Parameter] = None) -> None:
        """Record one lookup's grad_out [T, d], indices and weights [T, bag]; with ``values``
        (the table), fold into its buffer now if the record has reached max_bytes."""
        self.parts.append((grad_out, indices, weights))
        self.recorded += sum(t.numel() * t.element_size() for t in (grad_out, indices, weights))
        if values is not None and self.recorded >= self.max_bytes:
            self.fold(values)

    def clear(self) -> None:
        """Drop what is recorded (a step abandoned before its gradient reduction)."""
        self.parts, self.recorded, self.folded = [], 0, False

    def take_folded(self) -> bool:
        """Whether anything was folded since the last call (or ``clear``); resets it."""
        folded, self.folded = self.folded, False
        return folded

    def fold(self, values: torch.nn.Parameter) -> bool:
        """buf[r] += sum over every recorded (t, b) with idx = r of w * grad_out[t], into the
        table's main_grad/.grad; True if anything was pending."""
        if not self.parts:
            return False
        grads, idx, w = zip(*self.parts)
        self.parts, self.recorded, self.folded = [], 0, True
        bags = sorted({i.shape[1] for i in idx})
        if len(bags) > 1:
            raise ValueError(f"DeferredTableGrad: lookups of bag sizes {bags} cannot be folded "
                             "together")
        indices = torch.cat([i.to(idx[0].dtype) for i in idx])
        weights = torch.cat([x.to(w[0].dtype) for x in w])
        grad_out = torch.cat(grads)
        del grads, idx, w   # the recorded parts go as soon as their copies exist
        launch_fold(grad_out, indices, weights, _grad_buffer(values))
        return True


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def _check(values, indices, weights, deterministic) -> None:
    """One ValueError per problem, before any compute."""
    if values.dim() != 2:
        raise ValueError(f"embedding_bag: values must be [N, d], got shape {tuple(values.shape)}")
    if indices.dim() != 2:
        raise ValueError(f"embedding_bag: indices must be [T, bag], got shape {tuple(indices.shape)}")
    if weights.shape != indices.shape:
        raise ValueError(f"embedding_bag: weights shape {tuple(weights.shape)} != indices shape "
                         f"{tuple(indices.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"embedding_bag: indices must be int32 or int64, got {indices.dtype}")
    if values.dtype not in _TABLE_DTYPES + (torch.float64,):
        raise ValueError(f"embedding_bag: values dtype {values.dtype} unsupported "
                         "(bf16, fp16, fp32; fp64 uses the reference)")
    if weights.dtype not in _WEIGHT_DTYPES + (torch.float64,):
        raise ValueError(f"embedding_bag: weights dtype {weights.dtype} unsupported (fp32, bf16, fp16)")
    if not (values.device == indices.device == weights.device):
        raise ValueError(f"embedding_bag: tensors on different devices: values {values.device}, "
                         f"indices {indices.device}, weights {weights.device}")
    if values.stride(1) != 1 and values.shape[1] > 1:
        raise ValueError(f"embedding_bag: values needs unit column stride, got {tuple(values.stride())}")
    if indices.numel() >= 2**31:
        raise ValueError(f"embedding_bag: T*bag={indices.numel()} must stay below 2**31")
    if deterministic not in (None, True, False):
        raise ValueError(f"embedding_bag: deterministic must be None, True or False, got {deterministic!r}")
    main = getattr(values, "main_grad", None)
    if main is not None:
        if main.shape != values.shape:
            raise ValueError(f"embedding_bag: main_grad shape {tuple(main.shape)} != values shape "
                             f"{tuple(values.shape)}")
        if main.device != values.device or (main.stride(1) != 1 and main.shape[1] > 1):
            raise ValueError("embedding_bag: main_grad must be on the table's device with unit "
                             f"column stride, got {main.device}, strides {tuple(main.stride())}")
    if not values.is_cuda and not interpreting():
        raise ValueError("embedding_bag: the Triton op needs CUDA tensors (or TRITON_INTERPRET=1)")


def triton_embedding_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, *,
                         deterministic: Optional[bool] = None) -> torch.Tensor:
    """out[t] = sum_b weights[t, b] * values[indices[t, b]]: [N, d], [T, bag], [T, bag] -> [T, d].

    Pass the table Parameter itself: its gradient is accumulated into ``main_grad`` (fp32, if the
    attribute is set) or ``.grad``, and not returned by autograd (see _EmbeddingBag).
    deterministic: None = DEFAULT_STRATEGY, True = segment (also under
    torch.use_deterministic_algorithms), False = atomic. fp64 inputs run the torch reference.
    Indices must lie in [0, N): like F.embedding on CUDA, they are not range-checked.
    """
    _check(values, indices, weights, deterministic)
    if values.dtype == torch.float64 or weights.dtype == torch.float64:
        return embedding_bag_reference(values, indices, weights)
    return _EmbeddingBag.apply(values, indices, weights, deterministic)
