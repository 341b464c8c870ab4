# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Query BatchNorm under TP=2 (with and without SP) x DP=2 (gloo, CPU) equals the unsharded
layer: training outputs and every gradient (batch statistics summed over the TP group), the
running statistics after a step (summed over TP and DP), and eval outputs (running statistics).
The "fused" case runs the training query norm through kernels/query_norm_train.py (Triton's
interpreter on the CPU ranks), the others through the torch ops."""
from __future__ import annotations

import json

import pytest
import torch

from tests.parallel.dist_utils import run_ranks
from tests.parallel.test_tp_layer import layer_pair

S, B, D = 8, 3, 16


def _parity(sp: bool, norm: str, fused: bool = False) -> None:
    from megatron.core import parallel_state as ps

    calls = []
    if fused:   # the ranks run with TRITON_INTERPRET=1; the op serves their CPU tensors
        from tests.kernels.test_embedding_bag import install_interpreter_shim

        install_interpreter_shim()
        from megatron_memory import kernels
        from megatron_memory.kernels import query_norm_train as qnt

        kernels.fused_query_norm_train = lambda *a, **k: calls.append(1) or qnt.query_norm_train(*a, **k)

    from megatron_memory.config import MemoryConfig
    from megatron_memory.model.parallel import finish_query_norm_step, reduce_tp_partial_grads
    from tests.conftest import tiny_transformer_config

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp, dr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    assert (tp, dp) == (2, 2)
    cfg = tiny_transformer_config(hidden_size=D, tensor_model_parallel_size=tp, sequence_parallel=sp)
    mc = MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8, query_norm=norm, query_norm_momentum=0.5)
    values, layer, ref_values, ref_layer = layer_pair(cfg, mc)
    with torch.no_grad():
        # A shared component in every token, as training produces: the norm must remove it.
        shift = torch.randn(mc.heads * mc.k_dim, generator=torch.Generator().manual_seed(3)) * 4
        for m in (layer, ref_layer):
            m.query.bias.copy_(shift)

    def data(rank):  # each DP rank its own batch; the reference sees both
        gen = torch.Generator().manual_seed(5 + rank)
        return torch.randn(S, B, D, generator=gen), torch.randn(S, B, D, generator=gen)

    rows = slice(r * S // tp, (r + 1) * S // tp) if sp else slice(None)
    x, g = data(dr)
    x_in = x[rows].clone().requires_grad_(True)
    out, _ = layer(x_in)
    out.backward(g[rows])
    reduce_tp_partial_grads([layer])
    finish_query_norm_step([layer])

    tol = dict(rtol=1e-5, atol=1e-5)
    for rank in range(dp):  # reference: one unsharded layer per DP batch, statistics over both
        xr, gr = data(rank)
        x_ref = xr.clone().requires_grad_(True)
        ref_out, _ = ref_layer(x_ref)
        ref_out.backward(gr)
        if rank == dr:
            torch.testing.assert_close(out, ref_out[rows], **tol)
            torch.testing.assert_close(x_in.grad, x_ref.grad[rows], **tol)
            for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters()):
                torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")
        ref_layer.zero_grad()
    ref_layer.query_bn.finish_step(())
    for name in ("running_mean", "running_var", "num_updates"):
        torch.testing.assert_close(getattr(layer.query_bn, name), getattr(ref_layer.query_bn, name),
                                   **tol, msg=lambda m: f"{name}: {m}")
    assert float(layer.query_bn.running_mean.abs().max()) > 1.0  # the shift was measured
    assert len(calls) == (1 + dp if fused else 0)  # this layer's forward and the references'

    layer.eval()
    ref_layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x[rows])[0], ref_layer(x)[0][rows], **tol)


# (sp, norm, fused); the fused case last: it patches the ranks' dispatch for the rest of the launch
CASES = [(False, "batchnorm", False), (True, "batchnorm", False), (False, "center", False),
         (True, "batchnorm", True)]


def _every_case(out_file: str) -> None:
    """Each of CASES in turn on this launch's ranks; rank 0 lists the cases passed so far in
    out_file. A failing case ends the launch (a rank that went on alone would wait forever in
    the next case's collectives)."""
    import torch.distributed as dist

    done = []
    for case in CASES:
        _parity(*case)
        done.append(list(case))
        if dist.get_rank() == 0:
            json.dump(done, open(out_file, "w"))


@pytest.fixture(scope="module")
def cases_run(tmp_path_factory):
    """One launch of four ranks (TP=2 x DP=2) for every case -> (cases passed, the launch's
    error or None). The ranks run with TRITON_INTERPRET=1 (read by Triton in the spawned ranks;
    the torch cases do not touch Triton)."""
    out = tmp_path_factory.mktemp("query_norm_tp") / "passed.json"
    error = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        try:
            run_ranks(4, _every_case, str(out), tp=2)
        except Exception as e:   # reported by the case that failed and those it kept from running
            error = e
    return (json.load(open(out)) if out.exists() else []), error


@pytest.mark.parametrize("sp,norm,fused", CASES,
                         ids=["batchnorm-no-sp", "batchnorm-sp", "center-no-sp", "batchnorm-sp-fused"])
def test_query_norm_tp2_dp2_matches_unsharded(cases_run, sp, norm, fused):
    passed, error = cases_run
    assert [sp, norm, fused] in passed, f"failed, or not reached after an earlier case failed: {error!r}"
