# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Product-key search on bf16 tensor cores with exact float32 re-scoring of the candidates.

Shapes: query [T, H, 2, half], keys [H, 2, n, half] (any float dtype; the layer passes its fp32
QK-norm output) -> scores [T, H, k] fp32 descending, indices [T, H, k] int64 = i * n + j.

Forward (no [T, H, 2, n] float32 tensor, no host sync):
  1. bf16 scores of every sub-key: one batched GEMM per (head, half) on tensor cores,
     [2H, T, n] bf16 (half the bytes of the fp32 reference's scores, written once, read once).
  2. candidates: per (t, h, half) the top K1 = k + margin sub-keys of the bf16 scores
     (``_select_kernel``: a threshold found by bisection in registers, one read of the scores). bf16 rounding (inputs and output) moves a score by ~1e-2 at the layer's
     scale, a few ranks at most near the k-th, so the fp32 top-k lies inside the K1 candidates.
  3. exact fp32 re-scoring of the 2H*T*K1 candidates and the top-k of those per half, sorted
     (``_rescore_topk_kernel``: one program per (token, head, half) gathers its K1 key rows at
     once and sorts in registers; rescore="loop" runs the earlier ``_rescore_kernel``, a
     serial loop over the K1 candidates, then torch.topk and the padding copies).
  4. the product step of the fused search (``triton_product_key._candidates_kernel``): only
     rank pairs with (a+1)(b+1) <= k can reach the top-k of the sums; it also returns the ranks.
Backward: dscores flows to s1[a] and s2[b]; summed per rank in registers and stored at the
sub-key ids into a zeroed bf16 [2H, T, n] gradient of the scores (``_score_grad_kernel``), two
bf16 GEMMs give dq and dK (fp32 accumulation; the result has bf16 precision, like every other
activation gradient in bf16 training). No sort, no atomics, no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_memory.kernels.reference import product_key_search_reference, score_softmax
from megatron_memory.kernels.triton_product_key import _check, _pack, _row_dots, _store_top, half_lists, product_step

# Extra bf16 candidates per half beyond k (K1 = k + RESCORE_MARGIN). At the layer's scale
# (unit-RMS queries, keys scaled 1/sqrt(half)) bf16 moves a score by < 0.02; 16 extra ranks
# cover that with a wide margin (benchmarks/bench_memory_layer.py counts agreeing sets).
RESCORE_MARGIN = 16
# How the K1 candidates are picked from the bf16 scores (``select``; MemoryConfig.search_select):
# "threshold" (``_select_kernel``: one pass, bisection on the K1-th largest value in registers)
# or "topk" (torch.topk, radix select).
SELECTS = ("threshold", "topk")
# How the candidates are re-scored (``rescore``; MemoryConfig.search_rescore). "fused"
# (``_rescore_topk_kernel``): gather, fp32 dot and top-k in one kernel with every candidate row
# load in flight at once; a decode step (T = 1) takes one launch where "loop" took ~38 us of
# dependent loads plus ~6 small torch kernels (H100 profile; see benchmarks/RESULTS.md).
# "loop": ``_rescore_kernel`` + torch.topk.
RESCORES = ("fused", "loop")
# Launch tiles of the training-size kernels, from an H200 sweep (benchmarks/RESULTS.md;
# ``bench_search.py --sweep``: the whole forward per tile at T = 4096 and 8192).
# _select_kernel: rows per program and warps; 2 warps were faster than 4 or 8; the early exit
# shortened the whole forward by a few percent.
SELECT_TILE = dict(ROWS=1, num_warps=2, EARLY=True)
# _rescore_topk_kernel: None takes ``rescore_config``; a dict(BLOCK_D=, num_warps=) overrides it.
RESCORE_TILE = None
# At or above this many (token, head, half) rows the re-scoring takes the training tile of
# ``rescore_config``: fewer columns per block on 2 warps (32, then 16) made the T = 8192 forward
# faster on an H200; decode-sized calls keep the tile their latency was measured with.
RESCORE_TRAINING_ROWS = 8192


@triton.jit
def _bisect(key, lo, hi, K1):
    """One bisection step per row of the largest t with #(key >= t) >= K1, in [lo, hi)."""
    mid = (lo + hi) // 2
    enough = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1) >= K1
    return tl.where(enough, mid, lo), tl.where(enough, hi, mid)


@triton.jit
def _select_kernel(scores, cand, R, n, K1, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   EARLY: tl.constexpr = False):
    """Program (ROWS rows of [R = 2H*T, n] bf16 scores): each row's column ids of its K1 largest
    values, in column order (ties at the K1-th value broken by column), into cand[row, :K1].

    bf16 has 16 significant bits: its order-preserving integer key (the top half of the fp32
    bit map of ``triton_product_key._pack``) is bisected 17 times for the largest t with
    #(key >= t) >= K1; then every key > t and the first K1 - #(key > t) keys == t are kept, their
    output slots given by a running count. Rows are independent: every reduction is along axis 1.
    EARLY: stop once every row's bracket is one key wide (log2(max - min) steps, ~13 for the
    layer's scores, whose bf16 keys span a few thousand values); a finished row stays put
    (mid = lo keeps #(key >= lo) >= K1), so the result is the same."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    valid = rmask[:, None] & (cols < n)[None, :]
    x = tl.load(scores + rows[:, None] * n + cols[None, :], mask=valid,
                other=float("-inf")).to(tl.float32)
    b = x.to(tl.int32, bitcast=True)
    key = (b ^ ((b >> 31) & 0x7FFFFFFF)) >> 16            # order-preserving, in [-2**15, 2**15)
    key = tl.where(valid, key, -65536)                    # padding below every real key
    lo = tl.min(key, axis=1)                              # #(key >= lo) >= K1 always holds
    hi = tl.max(key, axis=1) + 1                          # #(key >= hi) = 0 < K1
    if EARLY:
        while tl.max(hi - lo, axis=0) > 1:
            lo, hi = _bisect(key, lo, hi, K1)
    else:
        for _ in range(17):
            lo, hi = _bisect(key, lo, hi, K1)
    above = key > lo[:, None]
    tie = key == lo[:, None]
    room = K1 - tl.sum(above.to(tl.int32), axis=1)
    take = valid & (above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= room[:, None])))
    slot = tl.cumsum(take.to(tl.int32), axis=1) - 1
    tl.store(cand + rows[:, None] * K1 + slot, cols[None, :].to(tl.int64), mask=take)


def _candidates(approx: torch.Tensor, k1: int, select: str = "threshold") -> torch.Tensor:
    """approx [2H, T, n] bf16 -> column ids [2H, T, K1] int64 of each row's K1 largest."""
    if select == "topk":
        return approx.topk(k1, dim=-1, sorted=False).indices
    hc, T, n = approx.shape
    cand = torch.empty(hc, T, k1, dtype=torch.int64, device=approx.device)
    tile = SELECT_TILE
    _select_kernel[(triton.cdiv(hc * T, tile["ROWS"]),)](
        approx, cand, hc * T, n, k1, BLOCK_N=triton.next_power_of_2(n), **tile)
    return cand


@triton.jit
def _rescore_kernel(q, keys, cand, out, T, half, K1,
                    stride_qt, stride_qh, stride_qc, stride_kh, stride_kc, stride_kn,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, h*2 + c): out[hc, t, j] = <q[t, h, c], K[h, c, cand[hc, t, j]]> in
    fp32 for the K1 candidates of each token; the key rows come from L2 (one (h, c) slice of
    the sub-keys is n * half * 4 bytes, 1 MiB at the paper's sizes)."""
    hc = tl.program_id(1)
    h = hc // 2
    c = hc % 2
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    ds = tl.arange(0, BLOCK_D)
    m2 = tmask[:, None] & (ds < half)[None, :]
    qt = tl.load(q + ts.to(tl.int64)[:, None] * stride_qt + h * stride_qh + c * stride_qc
                 + ds[None, :], mask=m2, other=0.0).to(tl.float32)
    k_base = keys + h * stride_kh + c * stride_kc
    row = (hc * T + ts.to(tl.int64)) * K1
    for j in range(0, K1):
        idx = tl.load(cand + row + j, mask=tmask, other=0)
        kr = tl.load(k_base + idx.to(tl.int64)[:, None] * stride_kn + ds[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        tl.store(out + row + j, tl.sum(qt * kr, axis=1), mask=tmask)


@triton.jit
def _rescore_topk_kernel(q, keys, cand, top_s, top_i, T, half, K1, k,
                         stride_qt, stride_qh, stride_qc, stride_kh, stride_kc, stride_kn,
                         K_PAD: tl.constexpr, K1_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token t, h*2 + c): the exact fp32 scores <q[t, h, c], K[h, c, cand[hc, t, j]]>
    of the K1 candidates, their top k sorted descending (ties: larger sub-key id first, as the
    fused search) into top_s / top_i[t, h, c, :k]; slots k..K_PAD-1 are written as zeros.

    All K1 key rows are gathered per column block at once ([K1_PAD, BLOCK_D] loads in flight),
    so a decode step's latency is a few L2/HBM round trips, not K1 of them."""
    t = tl.program_id(0).to(tl.int64)
    hc = tl.program_id(1)
    h = hc // 2
    c = hc % 2
    js = tl.arange(0, K1_PAD)
    jmask = js < K1
    ids = tl.load(cand + (hc * T + t) * K1 + js, mask=jmask, other=0)            # int64
    q_row = q + t * stride_qt + h * stride_qh + c * stride_qc
    k_rows = keys + h * stride_kh + c * stride_kc + ids * stride_kn
    acc = _row_dots(q_row, k_rows, jmask, half, K1_PAD, BLOCK_D)
    key = tl.where(jmask, _pack(acc, ids), -9223372036854775808)                # below any real
    _store_top(key, top_s, top_i, t * tl.num_programs(1) + hc, k, K_PAD)


def rescore_config(half: int, rows: int = 1) -> dict:
    """_rescore_topk_kernel tiles for ``rows`` = T * 2H programs: [K1_PAD, BLOCK_D] gathered fp32
    values and their int64 addresses live in registers. Few rows (decode): 64 columns per block
    on 4 warps, the fewest dependent steps per program. Many rows (training): 16 columns on 2
    warps, more programs resident per SM (16 columns measured faster than 32 at T = 8192 on an
    H200, benchmarks/RESULTS.md). Both compile for sm_90 without spills at K1_PAD = 64
    (tests/kernels/test_bf16_search.py)."""
    if rows >= RESCORE_TRAINING_ROWS:
        return dict(BLOCK_D=16, num_warps=2)
    return dict(BLOCK_D=max(16, min(64, triton.next_power_of_2(half))), num_warps=4)


def _per_half_topk(query, keys, k: int, margin: int, kb=None, select: str = "threshold",
                   rescore: str = "fused"):
    """-> top_s [T, H, 2, K_PAD] fp32, top_i [T, H, 2, K_PAD] int32 (first k sorted, rest
    unused), qb [2H, T, half] bf16, kb [2H, n, half] bf16 (kept for the backward; given kb,
    the bf16 keys already cast, e.g. by an inference model that caches them, it is used as is)."""
    T, H, _, half = query.shape
    n = keys.shape[2]
    k1 = min(n, k + margin)
    k_pad = max(2, triton.next_power_of_2(k))
    qb = query.to(torch.bfloat16).permute(1, 2, 0, 3).reshape(2 * H, T, half)
    kb = keys.to(torch.bfloat16).reshape(2 * H, n, half) if kb is None else kb.view(2 * H, n, half)
    approx = torch.bmm(qb, kb.transpose(1, 2))                          # [2H, T, n] bf16
    cand = _candidates(approx, k1, select)                              # [2H, T, K1] int64
    del approx
    if rescore == "fused":
        top_s, top_i = half_lists(T, H, k, query.device)
        _rescore_topk_kernel[(T, 2 * H)](
            query, keys, cand, top_s, top_i, T, half, k1, k, query.stride(0), query.stride(1),
            query.stride(2), keys.stride(0), keys.stride(1), keys.stride(2), K_PAD=k_pad,
            K1_PAD=max(k_pad, triton.next_power_of_2(k1)), **(RESCORE_TILE or rescore_config(half, T * 2 * H)))
        return top_s, top_i, qb, kb
    exact = torch.empty(2 * H, T, k1, dtype=torch.float32, device=query.device)
    block_t = 16
    _rescore_kernel[(triton.cdiv(T, block_t), 2 * H)](
        query, keys, cand, exact, T, half, k1, query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), BLOCK_T=block_t,
        BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    best, pos = exact.topk(k, dim=-1)                                   # [2H, T, k] sorted
    top_s = torch.zeros(T, H, 2, k_pad, dtype=torch.float32, device=query.device)
    top_i = torch.zeros(T, H, 2, k_pad, dtype=torch.int32, device=query.device)
    top_s[..., :k] = best.view(H, 2, T, k).permute(2, 0, 1, 3)
    top_i[..., :k] = cand.gather(-1, pos).view(H, 2, T, k).permute(2, 0, 1, 3)
    return top_s, top_i, qb, kb


def bf16_search_forward(query, keys, k: int, margin: int = RESCORE_MARGIN, kb=None,
                        softmax: bool = False, select: str = "threshold", rescore: str = "fused"):
    """-> scores [T, H, k] fp32 (with softmax: their softmax per row), indices [T, H, k] int64,
    and for the backward: per-half ids top_i [T, H, 2, K_PAD] int32, ranks [T, H, k] int32
    (a * K_PAD + b), qb, kb. select, rescore: see SELECTS, RESCORES."""
    top_s, top_i, qb, kb = _per_half_topk(query, keys, k, margin, kb, select, rescore)
    scores, indices, ranks = product_step(top_s, top_i, keys.shape[2], k, write_ranks=True,
                                          softmax=softmax)
    return scores, indices, top_i, ranks, qb, kb


@triton.jit
def _score_grad_kernel(grad, w, ranks, top_i, ds, T, H, n, k, K_PAD: tl.constexpr,
                       SOFTMAX: tl.constexpr = False):
    """Program (row r = t*H + h): with SOFTMAX, grad is that of the weights w = softmax(scores)
    and becomes the scores' first (w * (grad - <w, grad>), as torch's softmax backward). Then
    the gradient of the k chosen scores is summed onto their per-half ranks (chosen pair
    j = ranks a_j * K_PAD + b_j adds grad[j] to rank a_j of half 0 and b_j of half 1; a rank is
    shared by several pairs) and stored as bf16 at the ranks' sub-key ids into the zeroed
    ds [2H, T, n]. The k ids of a half are distinct: no two stores meet, no atomics. One
    [K_PAD, K_PAD] one-hot reduction per half, in registers."""
    r = tl.program_id(0)
    t = r // H
    h = r % H
    js = tl.arange(0, K_PAD)
    jm = js < k
    g = tl.load(grad + r.to(tl.int64) * k + js, mask=jm, other=0.0).to(tl.float32)
    if SOFTMAX:
        wv = tl.load(w + r.to(tl.int64) * k + js, mask=jm, other=0.0)
        g = wv * (g - tl.sum(wv * g, axis=0))
    rk = tl.load(ranks + r.to(tl.int64) * k + js, mask=jm, other=0)
    a = tl.where(jm, rk // K_PAD, -1)                # padding pairs match no rank
    b = tl.where(jm, rk % K_PAD, -1)
    s0 = tl.sum(tl.where(a[:, None] == js[None, :], g[:, None], 0.0), axis=0)     # [K_PAD]
    s1 = tl.sum(tl.where(b[:, None] == js[None, :], g[:, None], 0.0), axis=0)
    base = r.to(tl.int64) * (2 * K_PAD)
    id0 = tl.load(top_i + base + js, mask=jm, other=0).to(tl.int64)
    id1 = tl.load(top_i + base + K_PAD + js, mask=jm, other=0).to(tl.int64)
    row0 = (2 * h * T + t).to(tl.int64) * n           # ds[2h, t, :] and ds[2h + 1, t, :]
    row1 = ((2 * h + 1) * T + t).to(tl.int64) * n
    tl.store(ds + row0 + id0, s0.to(tl.bfloat16), mask=jm)
    tl.store(ds + row1 + id1, s1.to(tl.bfloat16), mask=jm)


def score_grad_reference(grad_scores, top_i, ranks, n: int) -> torch.Tensor:
    """The torch form of ``_score_grad_kernel``: dscores [T, H, k] -> ds [2H, T, n] bf16."""
    T, H, k = grad_scores.shape
    k_pad = top_i.shape[-1]
    g, ranks = grad_scores.float(), ranks.long()
    per_rank = torch.zeros(T, H, 2, k_pad, dtype=torch.float32, device=g.device)
    per_rank[:, :, 0].scatter_add_(-1, ranks // k_pad, g)
    per_rank[:, :, 1].scatter_add_(-1, ranks % k_pad, g)
    ds = torch.zeros(2 * H, T, n, dtype=torch.bfloat16, device=g.device)
    ds.scatter_(-1, top_i.permute(1, 2, 0, 3).reshape(2 * H, T, k_pad)[..., :k].long(),
                per_rank.permute(1, 2, 0, 3).reshape(2 * H, T, k_pad)[..., :k].to(torch.bfloat16))
    return ds


def score_grad(grad_scores, top_i, ranks, n: int, weights=None) -> torch.Tensor:
    """dscores [T, H, k] (any float dtype), top_i [T, H, 2, K_PAD] int32, ranks [T, H, k] int32
    -> the gradient of the bf16 scores ds [2H, T, n] bf16: a memset and one launch where the
    torch form took ten ops (two casts, two scatter_adds, the rank split, layout copies). Given
    weights [T, H, k] fp32 (the search returned softmax(scores)), grad_scores is the weights'
    gradient and the softmax backward runs first, in the same launch."""
    T, H, k = grad_scores.shape
    ds = torch.zeros(2 * H, T, n, dtype=torch.bfloat16, device=grad_scores.device)
    if T * H:
        g = grad_scores.contiguous()
        _score_grad_kernel[(T * H,)](g, g if weights is None else weights, ranks.contiguous(),
                                     top_i, ds, T, H, n, k, K_PAD=top_i.shape[-1],
                                     SOFTMAX=weights is not None, num_warps=1)
    return ds


def bf16_search_backward(grad_scores, top_i, ranks, qb, kb, need_q: bool, need_k: bool,
                         weights=None):
    """dscores [T, H, k] -> (dq [T, H, 2, half] bf16 or None, dK [H, 2, n, half] bf16 or None).
    The gradient of every chosen pair goes to its two per-half ranks and from there to the
    sub-key ids (``score_grad``; given weights, grad_scores is the softmax weights'), then two
    bf16 GEMMs."""
    T, H, k = grad_scores.shape
    n, half = kb.shape[1], kb.shape[2]
    ds = score_grad(grad_scores, top_i, ranks, n, weights)
    dq = dk = None
    if need_q:
        dq = torch.bmm(ds, kb).view(H, 2, T, half).permute(2, 0, 1, 3)
    if need_k:
        dk = torch.bmm(ds.transpose(1, 2), qb).view(H, 2, n, half)
    return dq, dk


class _Bf16Search(torch.autograd.Function):
    """forward(query, keys, k, margin, keys_bf16, softmax, select, rescore) -> (scores or
    their softmax, indices); gradients reach query and keys."""

    @staticmethod
    def forward(ctx, query, keys, k, margin, keys_bf16, softmax, select, rescore):
        out, indices, top_i, ranks, qb, kb = bf16_search_forward(query, keys, k, margin, keys_bf16,
                                                                 softmax, select, rescore)
        ctx.save_for_backward(top_i, ranks, qb, kb, out if softmax else None)
        ctx.dtypes = (query.dtype, keys.dtype)
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_indices):
        top_i, ranks, qb, kb, weights = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        dq, dk = bf16_search_backward(grad_out, top_i, ranks, qb, kb, need_q, need_k, weights)
        q_dtype, k_dtype = ctx.dtypes
        return (None if dq is None else dq.to(q_dtype), None if dk is None else dk.to(k_dtype),
                None, None, None, None, None, None)


def bf16_product_key_search(query: torch.Tensor, keys: torch.Tensor, k: int,
                            margin: int = RESCORE_MARGIN, keys_bf16: Optional[torch.Tensor] = None,
                            softmax: bool = False, select: str = "threshold", rescore: str = "fused"):
    """Top-k product keys (same contract as ``triton_product_key_search``); bf16 tensor-core
    scores, candidates re-scored in fp32 from the inputs as given. fp64 runs the reference.

    keys_bf16: optional ``keys.to(torch.bfloat16)`` made once by the caller (an inference model
    whose keys do not change); saves the cast, a read of the fp32 keys, on every call.
    softmax: return each row's softmax over its k scores (fp32) in place of the scores; the
    product step writes it and the backward's scatter kernel takes its gradient.
    select, rescore: how the candidates are picked and re-scored (SELECTS, RESCORES)."""
    if select not in SELECTS or rescore not in RESCORES:
        raise ValueError(f"product_key_search: select must be one of {SELECTS} and rescore one of "
                         f"{RESCORES}, got {select!r}, {rescore!r}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"product_key_search: margin must be an int >= 0, got {margin!r}")
    if keys_bf16 is not None and (keys_bf16.dtype != torch.bfloat16 or keys_bf16.shape != keys.shape
                                  or keys_bf16.device != keys.device):
        raise ValueError(f"product_key_search: keys_bf16 must be bf16 {tuple(keys.shape)} on "
                         f"{keys.device} (keys cast to bfloat16), got {keys_bf16.dtype} "
                         f"{tuple(keys_bf16.shape)} on {keys_bf16.device}")
    _check(query, keys, k)
    if torch.float64 in (query.dtype, keys.dtype):
        scores, indices = product_key_search_reference(query, keys, k)
        return (score_softmax(scores) if softmax else scores), indices
    return _Bf16Search.apply(query.contiguous(), keys.contiguous(), k, margin,
                             None if keys_bf16 is None else keys_bf16.contiguous(), bool(softmax),
                             select, rescore)
