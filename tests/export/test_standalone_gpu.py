# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The standalone model on CUDA (Triton lookup) gives the CPU reference logits; its KV cache
matches full recomputation there too. Skipped without a GPU."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_memory import kernels
from megatron_memory.export import hf_format, standalone
from megatron_memory.export.standalone import MemoryGPT, ModelArgs, generate
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



@requires_cuda
@pytest.mark.parametrize("norm", ["batchnorm", "center", "none"])
def test_fused_query_prologue_matches_torch_ops(monkeypatch, norm):
    """At inference on CUDA the memory query's norm, QK-norm and gain run as one Triton kernel
    and the search takes cached bf16 keys; query and output match the torch ops with the
    search casting the keys itself."""
    config = hf_format.hf_config(tiny_run_config(n_keys=128, k=16, k_dim=64), 256)
    args = dataclasses.replace(ModelArgs.from_config(config), memory_query_norm=norm)
    torch.manual_seed(0)
    mem = standalone.Memory(args).cuda()
    values = torch.randn(128 * 128, args.memory_v_dim, device="cuda")
    with torch.no_grad():
        for p in mem.parameters():
            p.normal_(0.0, 0.3).requires_grad_(False)
        if mem.query_bn is not None:
            mem.query_bn.running_mean.normal_(0.0, 0.3)
            mem.query_bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(3, 5, args.hidden_size, device="cuda")
        q = mem.query(x.reshape(-1, args.hidden_size))
        fused, out = mem.normed_query(q), mem(x, values)
        assert mem._inference_cache.get("keys/bf16") is not None
        real = standalone.product_key_search
        monkeypatch.setattr(standalone, "fused_query_prologue", None)
        monkeypatch.setattr(standalone, "product_key_search",
                            lambda q, keys, k, keys_bf16=None: real(q, keys, k))
        mem._inference_cache.clear()
        plain, want = mem.normed_query(q), mem(x, values)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
