# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Layer specs: Megatron-Core's GPT layer spec with Memory+ in the ``mlp`` slot of the chosen
layers. The local spec (Megatron's own modules) runs on CPU and on any GPU; the Transformer Engine
spec (``model.transformer_impl``) is used only where TE is importable: it fuses each layer's
norms into the following linear layer, so a memory layer gets a norm of its own there."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_memory.model.attention import core_attention_module
from megatron_memory.config import MemoryConfig
from megatron_memory.errors import note_once
from megatron_memory.model.layer import MemoryPlus, MemoryValues
from megatron_memory.model.parallel import local_layer_ids

try:  # Apex is not on PyPI; Megatron's fused norms need it.
    import apex  # noqa: F401
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    HAVE_APEX = True
except ImportError:
    HAVE_APEX = False


class TorchNorm:
    """torch RMSNorm/LayerNorm usable with sequence parallelism: Megatron's WrappedTorchNorm
    refuses SP, so the gains are marked ``sequence_parallel`` here and Megatron's
    finalize_model_grads sums their gradients over the TP group."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def norm_impl():
    """Apex's fused norm when present, else TorchNorm (with one note per process)."""
    if HAVE_APEX:
        return FusedLayerNorm
    note_once("apex", "Apex is not installed: torch norms instead of its fused ones (same math; "
                      "slower on GPU)")
    return TorchNorm


def _local_spec(config: TransformerConfig, attention: str = "sdpa") -> ModuleSpec:
    """Megatron's local layer spec with our norms and ``attention``'s core attention ("sdpa":
    torch's fused kernels; "local": Megatron's unfused DotProductAttention, the reference)."""
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm_impl()
    spec.submodules.self_attention.submodules.core_attention = core_attention_module(attention)
    return spec


def _te_norm():
    """Transformer Engine's norm (RMSNorm/LayerNorm by config, sequence-parallel aware)."""
    # Function-local: megatron's TE extension is only importable in full where TE is installed.
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def _te_spec() -> ModuleSpec:
    """Megatron's TE layer spec: TE attention, norms fused into linear_qkv and FC1."""
    return get_gpt_layer_with_transformer_engine_spec()


def _layer_spec(config: TransformerConfig, attention: str, impl: str) -> ModuleSpec:
    return _te_spec() if impl == "transformer_engine" else _local_spec(config, attention)


def memory_mlp_spec(memory_config: MemoryConfig, values: MemoryValues, layer_id: int) -> ModuleSpec:
    """The ``mlp`` submodule spec of memory layer ``layer_id`` (0-based, global)."""
    return ModuleSpec(module=MemoryPlus,
                      params={"memory_config": memory_config, "values": values, "layer_id": layer_id})


def memory_gpt_layer_specs(config: TransformerConfig, memory_config: MemoryConfig,
                           values: Optional[MemoryValues], attention: str = "sdpa",
                           impl: str = "local") -> list[ModuleSpec]:
    """One spec per layer of the whole model (all pipeline stages), 0-based; ``values`` may be
    None where this rank builds no memory layer; ``attention`` as in ``_local_spec`` (the TE spec
    brings its own); ``impl`` 'local' or 'transformer_engine'."""
    memory_layers = set(memory_config.resolved_layers(config.num_layers))
    specs = []
    for i in range(config.num_layers):
        spec = _layer_spec(config, attention, impl)
        if i in memory_layers:
            spec.submodules.mlp = memory_mlp_spec(memory_config, values, i)
            if impl == "transformer_engine":
                # TE's FC1 normalises its own input (pre_mlp_layernorm is an IdentityOp in its
                # spec); Memory+ reads the residual stream, so it needs the norm back.
                spec.submodules.pre_mlp_layernorm = _te_norm()
        specs.append(spec)
    return specs


def memory_gpt_block_spec(config: TransformerConfig, memory_config: MemoryConfig,
                          values: Optional[MemoryValues], vp_stage: Optional[int] = None,
                          pp_rank: Optional[int] = None, attention: str = "sdpa",
                          impl: str = "local") -> TransformerBlockSubmodules:
    """The decoder block spec of this pipeline stage (as get_gpt_decoder_block_spec slices it)."""
    specs = memory_gpt_layer_specs(config, memory_config, values, attention, impl)
    ids = local_layer_ids(config, vp_stage, pp_rank)
    if values is None and set(ids).intersection(memory_config.resolved_layers(config.num_layers)):
        raise ValueError("memory layers on this stage need the shared MemoryValues table")
    local = [specs[i] for i in ids]
    final_norm = _te_norm() if impl == "transformer_engine" else norm_impl()
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=final_norm)
