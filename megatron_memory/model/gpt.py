# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""MemoryGPTModel: Megatron-Core's GPTModel with Memory+ layers and the one shared value table."""
from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_memory.config import MemoryConfig
from megatron_memory.model.layer import MemoryPlus, MemoryValues
from megatron_memory.model.parallel import (
    ShardedMemoryValues,
    build_stage_group,
    local_layer_ids,
    memory_parallel_world_size,
    memory_stages,
)
from megatron_memory.model.spec import memory_gpt_block_spec


def build_values(config: TransformerConfig, memory_config: MemoryConfig) -> MemoryValues:
    """The value table of this rank: whole on one device, a column slice under tensor or memory
    parallelism (the table also splits the memory layers' tokens and runs their lookup)."""
    if memory_parallel_world_size() > 1:
        return ShardedMemoryValues(config, memory_config)
    return MemoryValues(config, memory_config)


class MemoryGPTModel(GPTModel):
    """GPTModel whose layers ``memory_config.layers`` use Memory+ instead of the FFN.

    The table lives here as ``memory_values`` on every pipeline stage that builds a memory layer
    (None elsewhere); each layer receives it explicitly. ``attention`` picks the core attention
    ("sdpa": torch's scaled_dot_product_attention; "local": Megatron's unfused reference). Extra
    keyword arguments go to GPTModel.
    """

    def __init__(self, config: TransformerConfig, memory_config: MemoryConfig, vocab_size: int,
                 max_sequence_length: int, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None, attention: str = "sdpa",
                 transformer_impl: str = "local", **gpt_kwargs):
        memory_config.validate(config.num_layers, config.hidden_size,
                               config.tensor_model_parallel_size)
        mem = set(memory_config.resolved_layers(config.num_layers))
        local_memory = [i for i in local_layer_ids(config, vp_stage) if i in mem]
        values = build_values(config, memory_config) if local_memory else None
        spec = memory_gpt_block_spec(config, memory_config, values, vp_stage=vp_stage,
                                     attention=attention, impl=transformer_impl)
        gpt_kwargs.setdefault("position_embedding_type", "rope")
        super().__init__(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                         max_sequence_length=max_sequence_length, pre_process=pre_process,
                         post_process=post_process, vp_stage=vp_stage, **gpt_kwargs)
        self.memory_config = memory_config
        self.memory_layer_ids = local_memory
        self.memory_values = values  # registered once, here
        # With --recompute-activations the dense FFNs are recomputed, never a memory layer: a
        # second lookup costs more than the activations it saves.
        for layer in self.decoder.layers:
            if isinstance(layer.mlp, MemoryPlus):
                layer.recompute_mlp = False
        self._link_pipeline_copies(config, memory_config)

    def _link_pipeline_copies(self, config, memory_config) -> None:
        """Memory layers on several pipeline stages: each of those stages holds an identical
        copy (same seeded init); gradients are summed across them (``finalize_memory_grads``)
        so the copies stay equal, like Megatron's tied embeddings."""
        if config.pipeline_model_parallel_size == 1:
            return
        stages = memory_stages(config, memory_config)
        group = build_stage_group(stages)  # collective: every rank takes part
        if group is not None:  # this stage holds one of several copies
            self.memory_values.mark_pipeline_copy(group, main=ps.get_pipeline_model_parallel_rank() == stages[0])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Layers are keyed one by one (``decoder.layers.<i>.``) instead of stacked along a layer
        axis: memory and dense layers have different parameters, and a model without memory
        layers is keyed the same way so that one name mapping (hf_format) serves every
        checkpoint (stacked, a dense model's layers were missing from its export)."""
        metadata = dict(metadata or {})
        metadata["non_homogeneous_layers"] = True
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def memory_layers(self) -> list[MemoryPlus]:
        return [m for m in self.modules() if isinstance(m, MemoryPlus)]


def optimizer_overrides(opt_config: OptimizerConfig, memory_config: MemoryConfig) -> dict:
    """Megatron param-group overrides: the standard weight-decay skips plus the value table's
    own group at ``value_lr_mult`` x the learning rate (same schedule shape)."""
    overrides = get_standard_config_overrides(opt_config)
    mult = memory_config.value_lr_mult
    overrides[ParamKey(attr="is_memory_value")] = {
        "max_lr": opt_config.lr * mult,
        "min_lr": (opt_config.min_lr or 0.0) * mult,
    }
    return overrides
