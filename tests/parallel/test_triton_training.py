# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The memory layer's whole GPU path trains like the torch reference path, on CPU ranks under
Triton's interpreter with TP = 2 and sequence parallelism (the query BatchNorm's statistics
all-reduced inside the fused op, the table's columns split over the ranks):
- the fused query and key norms and the Triton lookup, with the fp32 search: the reference's
  losses and gradient norms to fp32 rounding;
- with the bf16 search (its fused softmax and gradient scatter; the CUDA default): the same
  first forward (its selections and weights are the fp32 search's), the first gradients to bf16
  precision (its GEMMs give the query's and keys' gradients), then curves that stay close."""
from __future__ import annotations

import json

import pytest

from tests.parallel import workers
from tests.parallel.dist_utils import run_ranks


def test_gpu_path_trains_like_the_torch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def cfg():  # one per training (the Trainer resolves values into its config)
        # small enough for the interpreter: 64 values, 4 of 8 sub-keys per half, 16-token sequences
        return workers.tiny_config(tp=2, sp=True, dp_batch=4, steps=4, **{
            "model.seq_length": 16, "memory.n_keys": 8, "memory.k": 4, "memory.heads": 2})

    # one launch, three trainings: the torch reference path, then the GPU path with each search
    run_ranks(2, workers.several, [(workers.train, cfg(), str(tmp_path / "run_reference.json")),
                                   (workers.train_triton_all, cfg(), str(tmp_path / "run_fp32.json"), "torch"),
                                   (workers.train_triton_all, cfg(), str(tmp_path / "run_bf16.json"), "bf16")],
              tp=0)
    ref, fp32, bf16 = (json.load(open(tmp_path / f"run_{p}.json")) for p in ("reference", "fp32", "bf16"))
    assert len(ref["losses"]) == 4 and ref["losses"][-1] < ref["losses"][0]
    for key in ("losses", "grad_norms", "value_grad_norms"):
        assert fp32[key] == pytest.approx(ref[key], rel=1e-5), key
    assert bf16["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-6)
    assert bf16["grad_norms"][0] == pytest.approx(ref["grad_norms"][0], rel=2e-2)
    assert bf16["value_grad_norms"][0] == pytest.approx(ref["value_grad_norms"][0], rel=2e-2)
    assert bf16["losses"] == pytest.approx(ref["losses"], rel=5e-3)
