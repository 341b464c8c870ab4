# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The spec puts Memory+ exactly in the chosen layers of a real GPTModel; one shared table."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.mlp import MLP

from megatron_memory.config import MemoryConfig, default_memory_layers
from megatron_memory.model.layer import MemoryPlus
from megatron_memory.model.gpt import MemoryGPTModel, optimizer_overrides
from tests.conftest import tiny_transformer_config

MC = dict(n_keys=8, heads=2, k=4, k_dim=16)


def make(layers, num_layers=6):
    cfg = tiny_transformer_config(num_layers=num_layers)
    return MemoryGPTModel(cfg, MemoryConfig(layers=layers, **MC), vocab_size=64, max_sequence_length=16)


@pytest.mark.parametrize("layers", [[0], [1, 4], [5, 0, 2], None])
def test_memory_exactly_in_chosen_layers(megatron_world, layers):
    model = make(layers)
    chosen = set(layers if layers is not None else default_memory_layers(6))
    for i, layer in enumerate(model.decoder.layers):
        assert isinstance(layer.mlp, MemoryPlus) == (i in chosen), i
        assert isinstance(layer.mlp, MLP) == (i not in chosen), i
        if i in chosen:
            assert layer.mlp.layer_id == i and layer.mlp.values is model.memory_values
    tables = [p for n, p in model.named_parameters() if getattr(p, "is_memory_value", False)]
    assert len(tables) == 1 and tables[0] is model.memory_values.weight
    assert sum(k.endswith("memory_values.weight") for k in model.state_dict()) == 1


def test_dense_model_has_no_table(megatron_world):
    model = make([])
    assert model.memory_values is None and not model.memory_layers()


def test_default_layers_are_evenly_spaced_and_centred():
    assert default_memory_layers(24) == [4, 12, 20]
    assert default_memory_layers(32) == [5, 16, 26]
    assert default_memory_layers(6) == [1, 3, 5]
    assert default_memory_layers(3) == [0, 1, 2]


def test_forward_backward_reaches_every_parameter(megatron_world):
    model = make([1, 3])
    tok = torch.randint(0, 64, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    model(tok, pos, None, labels=tok).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_value_param_group_gets_its_lr_multiplier(megatron_world):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer import _get_param_groups

    model = make([2])
    oc = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4)
    groups = _get_param_groups([model], oc, optimizer_overrides(oc, model.memory_config))
    table = [g for g in groups if any(p is model.memory_values.weight for p in g["params"])]
    assert len(table) == 1 and len(table[0]["params"]) == 1
    assert table[0]["max_lr"] == pytest.approx(1e-2) and table[0]["min_lr"] == pytest.approx(1e-3)
    assert table[0]["wd_mult"] == 1.0  # the reference decays the values too
    others = [g for g in groups if g is not table[0]]
    assert all(g["max_lr"] == pytest.approx(1e-3) for g in others)
    gain = model.decoder.layers[2].mlp.query_norm_weight
    assert any(any(p is gain for p in g["params"]) and g["wd_mult"] == 0.0 for g in others)
