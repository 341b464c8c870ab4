# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The standalone model on CUDA (Triton lookup) gives the CPU reference logits; its KV cache
matches full recomputation there too. Skipped without a GPU."""
from __future__ import annotations

import torch

from megatron_memory import hf_format, kernels
from megatron_memory.standalone import MemoryGPT, ModelArgs, generate
from tests.conftest import requires_cuda
from tests.export.helpers import tiny_run_config


@requires_cuda
def test_cuda_triton_matches_cpu_reference(tmp_path):
    config = hf_format.hf_config(tiny_run_config(n_keys=32, k=8, k_dim=32), 256)
    torch.manual_seed(0)
    model = MemoryGPT(ModelArgs.from_config(config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    folder = hf_format.write_hf_folder(tmp_path / "m", model.state_dict().items(), config)
    tokens = torch.randint(0, 256, (4, 24))
    cpu = MemoryGPT.from_pretrained(folder)(tokens)
    gpu = MemoryGPT.from_pretrained(folder, device="cuda")
    assert kernels.use_triton(gpu.model.memory_values.weight)
    torch.testing.assert_close(gpu(tokens.cuda()).cpu(), cpu, rtol=1e-4, atol=1e-4)
    prompts = [[3, 4, 5, 6], [7]]
    assert generate(gpu, prompts, 12) == generate(gpu, prompts, 12, use_cache=False)
    bf16 = MemoryGPT.from_pretrained(folder, device="cuda", dtype=torch.bfloat16)
    err = (bf16(tokens.cuda()).float().cpu() - cpu).abs().max() / cpu.abs().max()
    assert err < 0.05, err
