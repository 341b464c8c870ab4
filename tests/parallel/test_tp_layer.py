# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""One Memory+ layer with the value table split over TP ranks (gloo, CPU) equals the unsharded
single-process math: output, input gradient, the table gradient slice, every layer gradient."""
from __future__ import annotations

import json

import pytest
import torch

from tests.parallel.dist_utils import run_ranks

S, B, D = 8, 3, 16


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def layer_pair(cfg, mc):
    """(table, layer) of this rank's layout and an unsharded reference (table, layer), with the
    same random weights (imports inside: the spawned ranks import Megatron after their shims)."""
    from megatron_memory.model.layer import MemoryPlus, MemoryValues
    from megatron_memory.model.gpt import build_values

    values = build_values(cfg, mc)
    layer = MemoryPlus(cfg, mc, values, layer_id=2)
    ref_values = MemoryValues(cfg, mc)
    ref_layer = MemoryPlus(cfg, mc, ref_values, layer_id=2)
    for m in (layer, ref_layer):
        _randomise(m, seed=11)
    _randomise(ref_values, seed=12)
    c0, c1 = values.columns
    with torch.no_grad():
        values.weight.copy_(ref_values.weight[:, c0:c1])
    return values, layer, ref_values, ref_layer


def _layer_parity(sp: bool) -> None:
    from megatron.core import parallel_state as ps

    from megatron_memory.config import MemoryConfig
    from megatron_memory.model.parallel import ShardedMemoryValues, reduce_tp_partial_grads
    from tests.conftest import tiny_transformer_config

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = tiny_transformer_config(hidden_size=D, tensor_model_parallel_size=tp,
                                  sequence_parallel=sp)
    mc = MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8)
    values, layer, ref_values, ref_layer = layer_pair(cfg, mc)
    assert isinstance(values, ShardedMemoryValues) == (tp > 1)
    c0, c1 = values.columns

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(S, B, D, generator=gen)
    g = torch.randn(S, B, D, generator=gen)
    rows = slice(r * S // tp, (r + 1) * S // tp) if sp else slice(None)
    x_in = x[rows].clone().requires_grad_(True)
    out, _ = layer(x_in)
    out.backward(g[rows])
    reduce_tp_partial_grads([layer])

    x_ref = x.clone().requires_grad_(True)
    flat = x_ref.reshape(-1, D)
    idx, w = ref_layer.select(flat)
    ref_out = ref_layer.mix(flat, ref_values.lookup(idx, w)).view_as(x)
    ref_out.backward(g)

    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out[rows], **tol)
    torch.testing.assert_close(x_in.grad, x_ref.grad[rows], **tol)
    torch.testing.assert_close(values.weight.grad, ref_values.weight.grad[:, c0:c1], **tol)
    for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")


def _every_sp(sps: list, out_file: str) -> None:
    """``_layer_parity`` for each of ``sps`` in turn on this launch's ranks; rank 0 lists those
    passed so far in out_file (a failure ends the launch)."""
    import torch.distributed as dist

    done = []
    for sp in sps:
        _layer_parity(sp)
        done.append(sp)
        if dist.get_rank() == 0:
            json.dump(done, open(out_file, "w"))


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """One launch per TP size (without and with sequence parallelism in turn) -> {tp: (sp values
    passed, the launch's error or None)}."""
    tmp, out = tmp_path_factory.mktemp("tp_layer"), {}
    for tp in (1, 2, 4):
        f, error = tmp / f"tp{tp}.json", None
        try:
            run_ranks(tp, _every_sp, [False] if tp == 1 else [False, True], str(f), tp=tp)
        except Exception as e:   # reported by the case that failed and those it kept from running
            error = e
        out[tp] = (json.load(open(f)) if f.exists() else []), error
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_sharded_layer_matches_unsharded(parity_run, tp, sp):
    if sp and tp == 1:
        pytest.skip("sequence parallelism needs TP > 1")
    passed, error = parity_run[tp]
    assert sp in passed, f"failed, or not reached after an earlier case failed: {error!r}"
