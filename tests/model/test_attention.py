# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""SDPA core attention equals Megatron's local DotProductAttention (fp32, CPU): logits and every
gradient, multi-head and grouped-query, one rank and TP=2 with sequence parallelism; GQA config
plumbing (validation, presets, checkpoint architecture, HF config both ways)."""
from __future__ import annotations

import pytest
import torch

from megatron_memory.model.attention import SDPAttention
from megatron_memory.config import ConfigError, MemoryConfig, ModelConfig, ParallelConfig, replace
from tests.conftest import tiny_transformer_config
from tests.parallel.dist_utils import run_ranks

MC = dict(n_keys=8, heads=2, k=4, k_dim=16)


def _logits_and_grads(attention: str, tokens, **tcfg):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_memory.model.gpt import MemoryGPTModel

    torch.manual_seed(7)
    model_parallel_cuda_manual_seed(7)
    cfg = tiny_transformer_config(**tcfg)
    model = MemoryGPTModel(cfg, MemoryConfig(layers=[1], **MC), vocab_size=64,
                           max_sequence_length=tokens.shape[1], attention=attention)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert all(isinstance(c, SDPAttention) == (attention == "sdpa") for c in cores)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, pos, None)
    (logits.float() ** 2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(tokens, **tcfg):
    ref_logits, ref_grads = _logits_and_grads("local", tokens, **tcfg)
    logits, grads = _logits_and_grads("sdpa", tokens, **tcfg)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("groups", [None, 2, 1])
def test_sdpa_equals_local_attention(megatron_world, groups):
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    _compare(tokens, num_query_groups=groups)


def _tp2_body():
    from megatron.core import parallel_state as ps

    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    assert ps.get_tensor_model_parallel_world_size() == 2
    _compare(tokens, num_query_groups=2, tensor_model_parallel_size=2, sequence_parallel=True)


def test_sdpa_equals_local_attention_tp2_gqa():
    run_ranks(2, _tp2_body, tp=2)


def test_query_group_validation():
    with pytest.raises(ConfigError, match="num_query_groups=3"):
        ModelConfig(num_attention_heads=4, num_query_groups=3).validate()
    with pytest.raises(ConfigError, match="divisible by parallel.tp=2"):
        ParallelConfig(tp=2).validate(ModelConfig(num_attention_heads=4, num_query_groups=1))
    with pytest.raises(ConfigError, match="model.attention"):
        ModelConfig(attention="flash").validate()


def test_presets_and_exported_config_carry_query_groups():
    from megatron_memory.checkpointing import checkpoint
    from megatron_memory.export import hf_format
    from megatron_memory.configs.presets import get_preset

    cfg = get_preset("8b-memory")
    assert cfg.model.num_query_groups == 8 and get_preset("8b-dense").model.num_query_groups == 8
    assert get_preset("1.3b-memory").model.num_query_groups is None
    arch = checkpoint.architecture(cfg, 128256)
    assert arch["model.num_query_groups"] == 8
    # A checkpoint written before the field existed is a multi-head model.
    mha = replace(cfg, **{"model.num_query_groups": None})
    old = {k: v for k, v in checkpoint.architecture(mha, 128256).items() if k != "model.num_query_groups"}
    checkpoint.check_architecture(old, checkpoint.architecture(mha, 128256), "old")
    with pytest.raises(ConfigError, match="num_query_groups"):
        checkpoint.check_architecture(old, arch, "old")
    config = hf_format.hf_config(cfg, 128256)
    assert config["num_key_value_heads"] == 8
    back = hf_format.run_config_from_hf(config)
    assert back.model.num_query_groups == 8
    assert hf_format.run_config_from_hf(hf_format.hf_config(mha, 128256)).model.num_query_groups is None
