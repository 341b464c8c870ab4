# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""--transformer-impl transformer_engine: Memory+ in the mlp slot of Megatron's TE layer spec,
with a norm of its own (TE fuses the pre-MLP norm into FC1). Transformer Engine cannot be
installed here, so the composition is checked on CPU against a stand-in with the TE spec's
structure (norms as IdentityOp), the refusals are checked without TE, and a training test runs
where TE and CUDA exist."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from megatron.core.transformer.identity_op import IdentityOp

from megatron_memory.model import spec as spec_mod
from megatron_memory.config import ConfigError, MemoryConfig, replace
from megatron_memory.configs.presets import get_preset
from megatron_memory.model.layer import MemoryPlus
from tests.conftest import tiny_transformer_config

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


class _TENormStandIn:
    """Marks where the TE norm goes."""


def _fused_like_te(config):
    """The local spec reshaped as the TE spec is: both layer norms folded into the next linear."""
    s = spec_mod._local_spec(config)
    s.submodules.input_layernorm = s.submodules.pre_mlp_layernorm = IdentityOp
    return s


def test_memory_layers_get_their_own_norm_in_the_te_spec(monkeypatch, megatron_world):
    config = tiny_transformer_config(num_layers=4)
    monkeypatch.setattr(spec_mod, "_te_spec", lambda: _fused_like_te(config))
    monkeypatch.setattr(spec_mod, "_te_norm", lambda: _TENormStandIn)
    mem = MemoryConfig(layers=[1, 3], n_keys=8, heads=2, k=4, k_dim=16)
    specs = spec_mod.memory_gpt_layer_specs(config, mem, values=None, impl="transformer_engine")
    for i, s in enumerate(specs):
        if i in (1, 3):
            assert s.submodules.mlp.module is MemoryPlus and s.submodules.mlp.params["layer_id"] == i
            assert s.submodules.pre_mlp_layernorm is _TENormStandIn   # the norm is back
        else:
            assert getattr(s.submodules.mlp, "module", None) is not MemoryPlus
            assert s.submodules.pre_mlp_layernorm is IdentityOp       # still fused into FC1
        assert s.submodules.input_layernorm is IdentityOp             # fused into linear_qkv
    block = spec_mod.memory_gpt_block_spec(config, MemoryConfig(layers=[]), None,
                                           impl="transformer_engine")
    assert block.layer_norm is _TENormStandIn
    # the local spec is untouched by all this
    local = spec_mod.memory_gpt_layer_specs(config, mem, values=None)
    assert local[1].submodules.pre_mlp_layernorm is spec_mod.norm_impl()


@pytest.mark.skipif(HAVE_TE, reason="checks the refusal where Transformer Engine is missing")
def test_te_without_transformer_engine_is_one_error():
    cfg = replace(get_preset("tiny"), **{"model.transformer_impl": "transformer_engine"})
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        cfg.validate()
    proc = subprocess.run([sys.executable, "-m", "megatron_memory.train", "--transformer-impl",
                           "transformer_engine", "--steps", "1"], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "needs Transformer Engine" in errors[0]
    with pytest.raises(ConfigError, match="choose 'local' or 'transformer_engine'"):
        replace(get_preset("tiny"), **{"model.transformer_impl": "te"}).validate()


@pytest.mark.skipif(not (HAVE_TE and torch.cuda.is_available()),
                    reason="needs Transformer Engine and a CUDA GPU")
def test_te_spec_trains_with_memory_layers(tmp_path):
    from tests.parallel import workers
    from tests.parallel.dist_utils import run_ranks

    cfg = workers.tiny_config(steps=20, **{"model.transformer_impl": "transformer_engine",
                                           "train.bf16": True})
    out = tmp_path / "te.json"
    run_ranks(1, workers.train, cfg, str(out), tp=0)
    import json

    losses = json.load(open(out))["losses"]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
