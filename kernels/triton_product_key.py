# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Product-key top-k search in Triton (Lample et al. 2019), with autograd.

Per token t and head h: s1 = <q[t,h,0], K[h,0,i]>, s2 = <q[t,h,1], K[h,1,j]> for all n sub-keys,
top-k of each half, the k*k candidate sums s1[i] + s2[j], their top-k; index i*n + j.
Shapes: query [T, H, 2, half], keys [H, 2, n, half] -> scores [T, H, k] fp32 (descending),
indices [T, H, k] int64.

Forward, two kernels and no large intermediate (nothing of size [T, H, 2, n] or [T, H, k, k]):
  1. _half_topk_kernel, program (token block, head, half): score tiles with tl.dot (fp32 inputs
     in exact "ieee" mode, so the selected sets match the fp32 reference; bf16/fp16 on tensor
     cores), each tile reduced to its top K_PAD and merged into a running top K_PAD in registers.
     Writes [T, H, 2, K_PAD] scores and sub-key ids (tiny).
  2. _candidates_kernel, program (block of (t, h) rows): only the pairs (a, b) of ranks with
     (a+1)(b+1) <= k can be in the top-k of the sums (each dominates (a+1)(b+1)-1 others), so it
     scores ~k*ln(k) candidates instead of k*k (119 for k=32), takes their top-k, and maps
     ranks back to i*n + j.
Top-k on (score, index) pairs: the fp32 score's bits are mapped to an order-preserving int32
and packed above the index into one int64 key, so tl.topk / tl.sort (value-only bitonic
networks) carry the index along.

Backward: dscores flows to the chosen s1[i] and s2[j]. Both gradients are weighted sums of
rows, i.e. the embedding-bag ops of kernels/triton_embedding_bag.py on the [H*2*n, half] table of
sub-keys, with bags of k rows per (t, h, half): dq = gather-sum of key rows (its forward
kernel), dK = table gradient with the query rows as output gradient (its deterministic segment
kernel). No [T, H, 2, n] gradient is formed.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from megatron_memory.kernels.triton_embedding_bag import interpreting, launch_forward, launch_segment_backward
from megatron_memory.kernels.reference import product_key_search_reference

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# tl.dot mode for fp32 inputs (the layer's QK-norm output): "ieee" is exact fp32, so the chosen
# sets match the fp32 reference; "tf32x3" (~fp32 accuracy on tensor cores) is the faster option
# the benchmark measures; plain "tf32" (10-bit mantissa) would reorder near-equal scores.
FP32_PRECISION = "ieee"


@triton.jit
def _pack(scores, idx):
    """fp32 scores, int indices in [0, 2**31) -> int64 keys ordered as (score, index)."""
    b = scores.to(tl.int32, bitcast=True)
    m = b ^ ((b >> 31) & 0x7FFFFFFF)          # negative floats: reverse their magnitude order
    return (m.to(tl.int64) << 32) | idx.to(tl.int64)


@triton.jit
def _unpack(key):
    """Inverse of _pack -> (fp32 scores, int32 indices); the bit map is its own inverse."""
    m = (key >> 32).to(tl.int32)
    b = m ^ ((m >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True), (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _row_dots(q_row, k_rows, rmask, half, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 dots of one query row (pointer q_row) with ROWS key rows (pointers k_rows [ROWS],
    rows with rmask False read as 0), the half width summed in BLOCK_D-column blocks whose
    [ROWS, BLOCK_D] loads are all in flight at once (the searches for few tokens use it)."""
    acc = tl.zeros([ROWS], dtype=tl.float32)
    for d0 in range(0, half, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < half
        qv = tl.load(q_row + ds, mask=dmask, other=0.0).to(tl.float32)
        kv = tl.load(k_rows[:, None] + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(kv * qv[None, :], axis=1)
    return acc


@triton.jit
def _store_top(key, top_s, top_i, row, k, K_PAD: tl.constexpr):
    """The top K_PAD of packed keys -> top_s / top_i[row, :] (fp32 scores, int32 ids,
    descending); slots k..K_PAD-1 written as zeros."""
    s, i = _unpack(tl.topk(key, K_PAD))
    ks = tl.arange(0, K_PAD)
    keep = ks < k
    tl.store(top_s + row * K_PAD + ks, tl.where(keep, s, 0.0))
    tl.store(top_i + row * K_PAD + ks, tl.where(keep, i, 0))


@triton.jit
def _half_topk_kernel(q, keys, top_s, top_i, T, H, n, half,
                      stride_qt, stride_qh, stride_qc, stride_kh, stride_kc, stride_kn,
                      K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (token block, h*2 + c): top K_PAD of <q[t,h,c], K[h,c,:]> for BLOCK_T tokens.

    Consecutive programs share (h, c), so the n x half sub-key matrix they stream stays in L2.
    """
    hc = tl.program_id(1)
    h = hc // 2
    c = hc % 2
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    q_rows = q + ts.to(tl.int64)[:, None] * stride_qt + h * stride_qh + c * stride_qc
    k_base = keys + h * stride_kh + c * stride_kc
    run = tl.full([BLOCK_T, K_PAD], -9223372036854775808, tl.int64)   # below every real key
    for n0 in range(0, n, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < n
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for h0 in range(0, half, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            hmask = hs < half
            qt = tl.load(q_rows + hs[None, :], mask=tmask[:, None] & hmask[None, :], other=0.0)
            kt = tl.load(k_base + ns[None, :].to(tl.int64) * stride_kn + hs[:, None],
                         mask=hmask[:, None] & nmask[None, :], other=0.0)     # [BLOCK_H, BLOCK_N]
            if UPCAST:  # the interpreter has no bf16 matmul
                qt = qt.to(tl.float32)
                kt = kt.to(tl.float32)
            acc = tl.dot(qt, kt, acc, input_precision=PRECISION)
        key = tl.where(nmask[None, :], _pack(acc, ns[None, :]), -9223372036854775808)
        new = tl.topk(key, K_PAD, dim=1)                       # [BLOCK_T, K_PAD], descending
        # run is descending, flip(new) ascending: their elementwise max holds the top K_PAD of
        # the union as a bitonic sequence, which one bitonic merge sorts (log2(K_PAD) stages).
        run = tl.bitonic_merge(tl.maximum(run, tl.flip(new, 1)), dim=1, descending=True)
    s, i = _unpack(run)
    out = (ts.to(tl.int64)[:, None] * (2 * H) + hc) * K_PAD + tl.arange(0, K_PAD)[None, :]
    tl.store(top_s + out, s, mask=tmask[:, None])
    tl.store(top_i + out, i, mask=tmask[:, None])


@triton.jit
def _candidates_kernel(top_s, top_i, pair_a, pair_b, scores, indices, ranks, R, n, k,
                       K_PAD: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr,
                       WRITE_RANKS: tl.constexpr = False, SOFTMAX: tl.constexpr = False):
    """Program (BLOCK_R rows r = t*H + h): top-k of s1[a] + s2[b] over the P candidate rank
    pairs (padding pairs have a = -1), written as scores and i*n + j; with WRITE_RANKS also the
    ranks a * K_PAD + b of each choice (int32, for a backward on the per-half lists); with
    SOFTMAX the row's softmax over its k scores is written in their place (fp32, max-shifted as
    torch.softmax; the layer's weights, one launch less than a separate softmax)."""
    rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rs < R
    base = rs.to(tl.int64) * (2 * K_PAD)
    ps = tl.arange(0, P)
    a = tl.load(pair_a + ps)
    b = tl.load(pair_b + ps)
    valid = a >= 0
    m2 = rmask[:, None] & valid[None, :]
    s1 = tl.load(top_s + base[:, None] + a[None, :], mask=m2, other=0.0)
    s2 = tl.load(top_s + base[:, None] + K_PAD + b[None, :], mask=m2, other=0.0)
    key = tl.where(valid[None, :], _pack(s1 + s2, ps[None, :]), -9223372036854775808)
    sc, p = _unpack(tl.topk(key, K_PAD, dim=1))
    ks = tl.arange(0, K_PAD)
    omask = rmask[:, None] & (ks < k)[None, :]
    ra = tl.load(pair_a + p, mask=omask, other=0)
    rb = tl.load(pair_b + p, mask=omask, other=0)
    i = tl.load(top_i + base[:, None] + ra, mask=omask, other=0)
    j = tl.load(top_i + base[:, None] + K_PAD + rb, mask=omask, other=0)
    out = rs.to(tl.int64)[:, None] * k + ks[None, :]
    if SOFTMAX:
        live = (ks < k)[None, :]
        top = tl.max(tl.where(live, sc, float("-inf")), axis=1)
        e = tl.where(live, tl.exp(sc - top[:, None]), 0.0)
        sc = e / tl.sum(e, axis=1)[:, None]
    tl.store(scores + out, sc, mask=omask)
    tl.store(indices + out, i.to(tl.int64) * n + j, mask=omask)
    if WRITE_RANKS:
        tl.store(ranks + out, ra * K_PAD + rb, mask=omask)


@functools.lru_cache(maxsize=None)
def _pairs(k: int, k_pad: int, device: torch.device):
    """Rank pairs (a, b) with (a+1)(b+1) <= k, padded with a = b = -1 to a power of two >= k_pad."""
    pairs = [(a, b) for a in range(k) for b in range(k // (a + 1))]
    P = max(triton.next_power_of_2(len(pairs)), k_pad)
    pa = torch.full((P,), -1, dtype=torch.int32)
    pb = torch.full((P,), -1, dtype=torch.int32)
    pa[: len(pairs)] = torch.tensor([p[0] for p in pairs], dtype=torch.int32)
    pb[: len(pairs)] = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
    return pa.to(device), pb.to(device), P


def search_config(half: int, k_pad: int) -> dict:
    """Tile sizes of _half_topk_kernel: tl.dot needs every dim >= 16; a tile's top-k needs
    BLOCK_N >= K_PAD; registers hold [BLOCK_T, BLOCK_N] int64 keys during the sort. At k=32,
    half=256 this compiles for sm_90 without spills (ptxas: 192 registers fp32-ieee, 120 bf16);
    4 warps or BLOCK_H=64 spill."""
    return dict(BLOCK_T=32 if k_pad <= 64 else 16, BLOCK_N=max(64, k_pad),
                BLOCK_H=max(16, min(32, triton.next_power_of_2(half))), num_warps=8)


def candidates_block(P: int) -> int:
    """(t, h) rows per _candidates_kernel program: ~2048 int64 keys in registers."""
    return max(1, min(16, 2048 // P))


# Below this many (t, h) rows the product step runs one row per program on one warp. A decode
# step (T = 1, 4 heads) has 4 rows: as one 16-row program on 4 warps the kernel took two thirds
# of the search on an H100 (benchmarks/RESULTS.md); its sorting network is latency-bound.
SMALL_ROWS = 256
# (rows per program, warps) of the product step above SMALL_ROWS rows; None: (candidates_block, 4).
# One warp per 4-row program: an H200 sweep (bench_search.py --sweep; benchmarks/RESULTS.md)
# measured the T = 8192 training forward faster than with 16 rows on 4 warps (the product step
# several times faster); its sorting network is latency-bound, like a decode step's.
CANDIDATES_TILE = (4, 1)


def half_lists(T: int, H: int, k: int, device) -> tuple:
    """Uninitialised per-half lists top_s [T, H, 2, K_PAD] fp32, top_i int32, K_PAD = the
    power of two >= k (at least 2) that the product step takes."""
    k_pad = max(2, triton.next_power_of_2(k))
    return (torch.empty(T, H, 2, k_pad, dtype=torch.float32, device=device),
            torch.empty(T, H, 2, k_pad, dtype=torch.int32, device=device))


def product_step(top_s, top_i, n: int, k: int, write_ranks: bool = False,
                 softmax: bool = False) -> tuple:
    """Per-half lists top_s / top_i [T, H, 2, K_PAD] -> (scores [T, H, k] fp32, indices int64),
    and ranks int32 (a * K_PAD + b of each choice) when write_ranks; with softmax the scores'
    softmax per row instead of the scores. Tiles by R = T * H rows."""
    T, H, _, k_pad = top_s.shape
    dev = top_s.device
    scores = torch.empty(T, H, k, dtype=torch.float32, device=dev)
    indices = torch.empty(T, H, k, dtype=torch.int64, device=dev)
    ranks = torch.empty(T, H, k, dtype=torch.int32, device=dev) if write_ranks else indices
    R = T * H
    if R:
        pa, pb, P = _pairs(k, k_pad, dev)
        block_r, warps = (1, 1) if R <= SMALL_ROWS else (CANDIDATES_TILE or (candidates_block(P), 4))
        _candidates_kernel[(triton.cdiv(R, block_r),)](
            top_s, top_i, pa, pb, scores, indices, ranks, R, n, k, K_PAD=k_pad, P=P,
            BLOCK_R=block_r, WRITE_RANKS=write_ranks, SOFTMAX=softmax, num_warps=warps)
    return (scores, indices, ranks) if write_ranks else (scores, indices)


def search_forward(query: torch.Tensor, keys: torch.Tensor, k: int, config=None, precision=None):
    """query [T, H, 2, half], keys [H, 2, n, half] (same dtype, unit last stride) -> (scores, indices).
    precision: tl.dot mode for fp32 inputs (default FP32_PRECISION)."""
    T, H, _, half = query.shape
    n = keys.shape[2]
    top_s, top_i = half_lists(T, H, k, query.device)
    k_pad = top_s.shape[-1]
    if T and H:
        cfg = dict(config or search_config(half, k_pad))
        _half_topk_kernel[(triton.cdiv(T, cfg["BLOCK_T"]), 2 * H)](
            query, keys, top_s, top_i, T, H, n, half, query.stride(0), query.stride(1),
            query.stride(2), keys.stride(0), keys.stride(1), keys.stride(2), K_PAD=k_pad,
            PRECISION=(precision or FP32_PRECISION) if query.dtype == torch.float32 else None,
            UPCAST=interpreting() and query.dtype == torch.bfloat16, **cfg)
    return product_step(top_s, top_i, n, k)


def search_backward(grad_scores, query, keys, indices, need_q: bool, need_k: bool):
    """dscores [T, H, k] -> (dq [T, H, 2, half] or None, dK [H, 2, n, half] or None)."""
    T, H, _, half = query.shape
    n, k = keys.shape[2], indices.shape[-1]
    dev = query.device
    # Bag (t, h, c) of k rows of the flat sub-key table [H*2*n, half], weights dscores.
    base = (torch.arange(H, device=dev) * (2 * n)).view(1, H, 1)
    rows = torch.stack([base + indices // n, base + n + indices % n], dim=2).view(T * H * 2, k)
    w = grad_scores.float().unsqueeze(2).expand(T, H, 2, k).reshape(T * H * 2, k)
    table = keys.reshape(H * 2 * n, half)
    dq = dk = None
    if need_q:
        dq = launch_forward(table, rows, w, out_dtype=query.dtype).view(query.shape)
    if need_k:
        acc = torch.zeros(H * 2 * n, half, dtype=torch.float32, device=dev)
        launch_segment_backward(query.reshape(T * H * 2, half), table, rows, w, acc, need_dots=False)
        dk = acc.to(keys.dtype).view(keys.shape)
    return dq, dk


class _ProductKeySearch(torch.autograd.Function):
    """forward(query, keys, k) -> (scores, indices); gradients reach query and keys through the
    scores (indices are not differentiable)."""

    @staticmethod
    def forward(ctx, query, keys, k):
        scores, indices = search_forward(query, keys, k)
        ctx.save_for_backward(query, keys, indices)
        ctx.mark_non_differentiable(indices)
        return scores, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores, _grad_indices):
        query, keys, indices = ctx.saved_tensors
        need_q, need_k, _ = ctx.needs_input_grad
        dq, dk = search_backward(grad_scores, query, keys, indices, need_q, need_k)
        return dq, dk, None


def _check(query, keys, k) -> None:
    """One ValueError per problem, before any compute."""
    if query.dim() != 4 or query.shape[2] != 2:
        raise ValueError(f"product_key_search: query must be [T, H, 2, half], got {tuple(query.shape)}")
    if keys.dim() != 4 or keys.shape[1] != 2:
        raise ValueError(f"product_key_search: keys must be [H, 2, n_keys, half], got {tuple(keys.shape)}")
    if keys.shape[0] != query.shape[1] or keys.shape[3] != query.shape[3]:
        raise ValueError(f"product_key_search: keys {tuple(keys.shape)} do not match query "
                         f"{tuple(query.shape)} in heads or half width")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= keys.shape[2]:
        raise ValueError(f"product_key_search: k must be an int in [1, n_keys={keys.shape[2]}], got {k!r}")
    for name, t in (("query", query), ("keys", keys)):
        if t.dtype not in _DTYPES + (torch.float64,):
            raise ValueError(f"product_key_search: {name} dtype {t.dtype} unsupported "
                             "(bf16, fp16, fp32, fp64)")
    if query.device != keys.device:
        raise ValueError(f"product_key_search: query on {query.device}, keys on {keys.device}")
    if not query.is_cuda and not interpreting():
        raise ValueError("product_key_search: the Triton op needs CUDA tensors (or TRITON_INTERPRET=1)")


def triton_product_key_search(query: torch.Tensor, keys: torch.Tensor, k: int):
    """Top-k product keys: query [T, H, 2, half], keys [H, 2, n, half] -> (scores [T, H, k] fp32
    descending, indices [T, H, k] int64 = i * n + j). Mixed dtypes compute in the promoted one;
    fp64 runs the torch reference."""
    _check(query, keys, k)
    if torch.float64 in (query.dtype, keys.dtype):
        return product_key_search_reference(query, keys, k)
    dtype = torch.promote_types(query.dtype, keys.dtype)
    query, keys = query.to(dtype).contiguous(), keys.to(dtype).contiguous()
    return _ProductKeySearch.apply(query, keys, k)
