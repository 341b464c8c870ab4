# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The segment backward's plan (kernels/triton_embedding_bag.py), in plain torch: sort the flat
indices, cut the runs of equal rows into chunks, number the chunks of split (hot) rows. Every
array is sized by static bounds and the real counts stay on the device, so building the plan
never waits for the GPU (no host sync on the training path)."""
from __future__ import annotations

import torch


def plan_bounds(M: int, n_rows: int, chunk: int) -> tuple[int, int, int]:
    """Static upper bounds (chunks C, split rows F, partial slots S) of the segment plan of M
    flat indices into n_rows rows, cut into chunks of <= `chunk`; known without looking at the
    indices, so nothing waits on the device.

    R <= min(n_rows, M) runs of lengths L_r give sum ceil(L_r / chunk) <= R + (M - R) // chunk
    chunks (increasing in R); a split run has L > chunk, so F <= M // (chunk + 1), and its
    ceil(L / chunk) = 1 + (L - 1) // chunk slots sum to S <= F + (M - F) // chunk.
    At T=8192, heads 4, k 32 (M = 2**20) into N = 2**20 rows, chunk 512: C = 1,048,576,
    F = 2,044, S = 4,088 (the fp32 partial buffer: 4,088 x d x 4 B = 64 MiB at d=4096, 32 MiB
    at d=2048, the TP=2 slice; the plan's int32 arrays: 4 B x C each).
    """
    runs = min(n_rows, M)
    splits = min(runs, M // (chunk + 1))
    return runs + (M - runs) // chunk, splits, splits + (M - splits) // chunk


def _first_at_least(cum: torch.Tensor, n: int, first: int = 0) -> torch.Tensor:
    """For a nondecreasing int32 [L] tensor: the first position where cum >= first + i, for
    i in [0, n) (L where there is none) -> [n] int64. A device-side compaction: no host sync."""
    targets = torch.arange(first, first + n, device=cum.device, dtype=cum.dtype)
    return torch.searchsorted(cum, targets)


def segment_plan(indices: torch.Tensor, n_rows: int, chunk: int):
    """Sort the flat indices and cut the runs of equal rows into chunks of <= `chunk`, every
    array sized by the static bounds of ``plan_bounds`` (C, F, S) so that no count leaves the
    device.

    Returns (sorted_pos [M] int64, chunk_start [C+1] int32 (entries past the real chunk count
    are M), chunk_row [C], chunk_slot [C] int32 (-1: the chunk owns its row; else its slot in
    the partial buffer), n_chunks [1] int32 (the real count, on the device), fold_row [F],
    fold_slot [F+1] int32 (past the real split rows: empty ranges), S). The real entries equal
    those of a host-side plan (runs from unique_consecutive): chunk order = sorted row order,
    slots in chunk order, so the summation order, and the result, is the same.
    """
    flat = indices.reshape(-1)
    if flat.dtype == torch.int64 and n_rows <= 2**31:
        flat = flat.to(torch.int32)   # 4-byte radix-sort keys: half the sort passes
    M, dev = flat.numel(), flat.device
    C, F, S = plan_bounds(M, n_rows, chunk)
    i32 = torch.int32
    sorted_rows, sorted_pos = torch.sort(flat, stable=True)  # stable: fixed summation order
    p = torch.arange(M, device=dev, dtype=i32)
    # Each position's run starts at the first occurrence of its row: a binary search of the
    # sorted rows for themselves. (A cummax over the run heads gives the same, but torch's
    # cummax is a scan with indices: 2.6 ms at M = 2^20 on an H100, 1/4 of a d=768 layer's
    # forward+backward, against ~0.1 ms for the search.)
    run_start = torch.searchsorted(sorted_rows, sorted_rows).to(i32)
    offset = p - run_start                                   # occurrence number within its run
    chunk_of = torch.cumsum(offset % chunk == 0, 0, dtype=i32)   # 1 + chunk of each position
    n_chunks = chunk_of[-1:]
    chunk_start = _first_at_least(chunk_of, C + 1, first=1).to(i32)
    first = chunk_start[:C].clamp(max=M - 1).long()
    chunk_row = sorted_rows[first]
    lead = offset[first] == 0                                # the first chunk of its run
    # A run is split iff it is longer than `chunk`: a later chunk exists, or (first chunk)
    # the position `chunk` further on still holds the same row (the rows are sorted).
    beyond = (first + chunk).clamp(max=M - 1)
    longer = (first + chunk < M) & (sorted_rows[beyond] == chunk_row)
    split = (chunk_start[:C] < M) & (~lead | longer)
    slots_to = torch.cumsum(split, 0, dtype=i32)             # split chunks up to c, inclusive
    chunk_slot = torch.where(split, slots_to - 1, -1).to(i32)
    fold_head = _first_at_least(torch.cumsum(split & lead, 0, dtype=i32), F + 1, first=1)
    slots_before = torch.cat([slots_to - split.to(i32), slots_to[-1:]])   # [C+1]
    fold_slot = slots_before[fold_head].to(i32)              # past the real folds: the total S
    fold_row = chunk_row[fold_head[:F].clamp(max=C - 1)]
    return sorted_pos, chunk_start, chunk_row, chunk_slot, n_chunks, fold_row, fold_slot, S
