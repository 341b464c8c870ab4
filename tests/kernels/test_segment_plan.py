# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The segment backward's plan and launch without host syncs (CPU).

``segment_plan`` (kernels/segment_plan.py) sizes every array by ``plan_bounds`` and keeps the counts on the device; these
tests check that its real entries equal the host-side plan it replaced (runs from
``unique_consecutive``, split runs from ``nonzero``: the same chunks in the same order, so the
same sums), that the entries past the real counts are inert, that the bounds hold and are
reached, and that nothing in it turns a tensor into a Python value. Under Triton's interpreter,
the launcher gives bit-identical gradients for any number of programs and for a looser (fake)
bound. The GPU counterpart, under ``torch.cuda.set_sync_debug_mode("error")``, is
tests/model/test_no_host_sync.py.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_memory.kernels import segment_plan as sp
from megatron_memory.kernels import triton_embedding_bag as eb
from megatron_memory.kernels.reference import embedding_bag_reference
from tests.kernels.test_embedding_bag import run_interpreted


def host_plan(indices: torch.Tensor, chunk: int):
    """The plan as the segment backward built it before (host syncs on the counts): an
    independent reference -> (chunk_start [C+1], chunk_row [C], chunk_slot [C], fold_row [F],
    fold_slot [F+1], S), every entry real."""
    sorted_rows, _ = torch.sort(indices.reshape(-1), stable=True)
    M = sorted_rows.numel()
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    nch = (counts + chunk - 1) // chunk
    split = nch > 1
    seg = torch.repeat_interleave(torch.arange(rows.numel()), nch)
    first_chunk = torch.cumsum(nch, 0) - nch
    k_in_seg = torch.arange(seg.numel()) - first_chunk[seg]
    starts = (torch.cumsum(counts, 0) - counts)[seg] + k_in_seg * chunk
    chunk_split = split[seg]
    slot = torch.where(chunk_split, torch.cumsum(chunk_split, 0) - 1, -1)
    split_seg = torch.nonzero(split).squeeze(1)
    fold_slot = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(nch[split_seg], 0)])
    return (torch.cat([starts, torch.tensor([M])]), rows[seg], slot, rows[split_seg], fold_slot,
            int(nch[split].sum()))


@contextlib.contextmanager
def no_host_values():
    """Fail on every way a tensor's value reaches Python (item, tolist, bool/int/float/index),
    and on the ops whose output size depends on the data (a host sync on CUDA)."""
    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name}: a tensor value reaches the host")
        return fail

    patches = [(torch.Tensor, m) for m in ("item", "tolist", "__bool__", "__int__", "__float__",
                                           "__index__", "nonzero", "unique", "unique_consecutive")]
    patches += [(torch, f) for f in ("nonzero", "unique", "unique_consecutive", "masked_select")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patches]
    try:
        for owner, name in patches:
            setattr(owner, name, refuse(name))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _runs(lengths, gen):
    """Flat indices made of runs of the given lengths over distinct rows, shuffled."""
    rows = torch.randperm(10 * len(lengths) + 10, generator=gen)[: len(lengths)]
    flat = torch.repeat_interleave(rows, torch.tensor(lengths))
    return flat[torch.randperm(flat.numel(), generator=gen)]


CASES = {  # name -> (indices [T, bag], n_rows, chunk)
    "random": lambda g: (torch.randint(0, 500, (40, 16), generator=g), 500, 4),
    "dup": lambda g: (torch.randint(0, 7, (30, 9), generator=g), 7, 5),
    "hot": lambda g: (torch.full((13, 11), 3), 4, 6),
    "one-row": lambda g: (torch.zeros(5, 3, dtype=torch.int64), 1, 512),
    "single": lambda g: (torch.tensor([[2]]), 5, 1),
    "chunk-1": lambda g: (torch.randint(0, 9, (6, 5), generator=g), 9, 1),
    "distinct": lambda g: (torch.randperm(96, generator=g).view(12, 8), 96, 3),
    "runs-chunk+1": lambda g: (_runs([5] * 20, g).view(10, 10), 300, 4),
    "mixed-runs": lambda g: (_runs([1, 4, 5, 9, 12, 3, 8, 17], g).view(-1, 1), 200, 4),
    "int32": lambda g: (torch.randint(0, 50, (20, 7), generator=g, dtype=torch.int32), 50, 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_equals_host_plan_without_host_values(name):
    idx, n_rows, chunk = CASES[name](torch.Generator().manual_seed(len(name)))
    with no_host_values():
        plan = sp.segment_plan(idx, n_rows, chunk)
    sorted_pos, chunk_start, chunk_row, chunk_slot, n_chunks, fold_row, fold_slot, S = plan
    want_start, want_row, want_slot, want_fold_row, want_fold_slot, want_S = host_plan(idx, chunk)
    M, C, F = idx.numel(), want_row.numel(), want_fold_row.numel()
    C_max, F_max, S_max = sp.plan_bounds(M, n_rows, chunk)
    assert C <= C_max and F <= F_max and want_S <= S_max == S
    assert chunk_row.numel() == C_max and fold_row.numel() == F_max
    assert int(n_chunks) == C and n_chunks.dtype == torch.int32
    assert torch.equal(sorted_pos, torch.sort(idx.reshape(-1), stable=True).indices)
    assert torch.equal(chunk_start[: C + 1].long(), want_start)
    assert torch.equal(chunk_row[:C].long(), want_row.long())
    assert torch.equal(chunk_slot[:C].long(), want_slot)
    assert torch.equal(fold_row.long()[:F], want_fold_row.long())
    assert torch.equal(fold_slot[: F + 1].long(), want_fold_slot)
    # Past the real counts: empty chunk ranges that own nothing, empty fold ranges.
    assert bool((chunk_start[C:] == M).all()) and bool((chunk_slot[C:] == -1).all())
    assert bool((fold_slot[F:] == want_S).all())


def test_the_guard_catches_the_host_plan():
    """The control: the plan this replaced takes counts to the host, and the guard says so."""
    with pytest.raises(AssertionError, match="reaches the host"), no_host_values():
        host_plan(torch.randint(0, 5, (4, 3)), 2)


def test_bounds_hold_and_are_reached():
    """C is reached by distinct rows, F and S by runs of chunk + 1; a few hand-counted values."""
    assert sp.plan_bounds(1 << 20, 1 << 20, 512) == (1 << 20, 2044, 4088)   # T=8192, 4 x 32
    assert sp.plan_bounds(10, 1, 4) == (3, 1, 3)          # one row: ceil(10 / 4) chunks, all split
    assert sp.plan_bounds(7, 100, 512) == (7, 0, 0)       # nothing can split
    gen = torch.Generator().manual_seed(0)
    for idx, n_rows, chunk in (CASES["distinct"](gen), CASES["runs-chunk+1"](gen)):
        _, _, _, fold_row, fold_slot, S = host_plan(idx, chunk)
        C_max, F_max, S_max = sp.plan_bounds(idx.numel(), n_rows, chunk)
        real = (sp.segment_plan(idx, n_rows, chunk)[4].item(), fold_row.numel(), S)
        if fold_row.numel():
            assert real[1:] == (F_max, S_max), (real, F_max, S_max)
        else:
            assert real[0] == C_max, (real, C_max)


# ------------------------------------------------------------------------------------------
# Interpreter: the launcher with any program count and a fake (looser) bound
# ------------------------------------------------------------------------------------------

def interpreter_segment_launch():
    """Returns the number of launches compared; raises on any difference."""
    gen = torch.Generator().manual_seed(4)
    N, d, T, bag, chunk = 23, 9, 12, 5, 3
    idx = torch.randint(0, N, (T, bag), generator=gen)
    idx[:, :3] = 7                                           # a hot row: split over chunks
    V = torch.randn(N, d, generator=gen)
    w = torch.rand(T, bag, generator=gen)
    g = torch.randn(T, d, generator=gen)
    Vr = V.double().requires_grad_()
    wr = w.double().requires_grad_()
    embedding_bag_reference(Vr, idx, wr).backward(g.double())
    real_bounds = sp.plan_bounds
    results = []
    for programs, slack in ((None, 0), (1, 0), (2, 0), (5, 0), (None, 7), (3, 7)):
        # A looser bound than the real one: more padding chunks, folds and partial rows.
        sp.plan_bounds = lambda M, n, c, s=slack: tuple(b + s for b in real_bounds(M, n, c))
        buf = torch.zeros(N, d)
        dots = eb.launch_segment_backward(g, V, idx, w, buf, True, chunk=chunk, programs=programs)
        sp.plan_bounds = real_bounds
        results.append((buf, dots))
        assert (buf.double() - Vr.grad).abs().max() <= 1e-5 * Vr.grad.abs().max()
        assert (dots.double() - wr.grad).abs().max() <= 1e-5 * wr.grad.abs().max()
    for buf, dots in results[1:]:
        assert torch.equal(buf, results[0][0]) and torch.equal(dots, results[0][1])
    return len(results)


def test_interpreter_launch_is_exact_for_any_programs_and_bound():
    assert run_interpreted("tests.kernels.test_segment_plan", "interpreter_segment_launch") == 6
