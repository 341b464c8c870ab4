# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The CPU shims are scoped: active inside the Trainer's entry points (and ``cpu_shims()``
blocks, re-entrant), absent before, between and after them, so nothing else in the process runs
patched. A fresh process: the test session's own fixtures hold the shims open."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import torch
    import megatron.core.optimizer.optimizer as mopt
    from megatron_memory.training import cpu
    from megatron_memory.configs.presets import get_preset
    from megatron_memory.config import replace
    from megatron_memory.training.trainer import Trainer

    def unpatched():
        return (torch.Tensor.type is ORIGINAL and mopt.clip_grad_by_total_norm_fp32 is CLIP
                and torch._C._len_torch_function_stack() == 0
                and torch.zeros(1).type() == "torch.FloatTensor")

    ORIGINAL, CLIP = torch.Tensor.type, mopt.clip_grad_by_total_norm_fp32
    with cpu.cpu_shims() as active:
        with cpu.cpu_shims():  # re-entrant
            inner = torch.zeros(1).type()
        still = torch.zeros(1).type() == "torch.cuda.FloatTensor"
        made = torch.zeros(1, device="cuda").device.type  # the mode sends 'cuda' to the CPU
    assert active and inner == "torch.cuda.FloatTensor" and still and made == "cpu", (inner, still, made)
    assert unpatched(), "left patched after the block"
    cfg = replace(get_preset("tiny"), **{"model.num_layers": 2, "model.hidden_size": 32,
                  "memory.layers": [1], "train.steps": 2, "train.micro_batch_size": 2,
                  "train.eval_iters": 0, "train.tensorboard_dir": ""})
    trainer = Trainer(cfg, log=lambda line: None)
    assert unpatched(), "patched between the Trainer's calls"
    hist = trainer.fit()
    assert unpatched() and len(hist.losses) == 2
    trainer.close()
    assert unpatched()
    print("ok")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are a no-op with CUDA")
def test_shims_only_inside_their_scope(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
