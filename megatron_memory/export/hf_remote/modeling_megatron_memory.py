# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""transformers model of an exported Memory+ GPT: ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` and ``generate()``.

A thin wrapper: the math is megatron_memory.export.standalone (copied beside this file as
megatron_memory_standalone.py), whose modules carry the checkpoint's names (``model.*``,
``lm_head``). transformers' Cache (DynamicCache) serves as the KV cache: the standalone attention
calls ``cache.update(k, v, layer_idx)`` exactly as transformers' own models do.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # inside an exported folder (transformers' dynamic module package)
    from .megatron_memory_standalone import Gain, MemoryGPTModel, ModelArgs, RMSNorm, Values
except ImportError:  # inside the megatron_memory package
    from megatron_memory.export.standalone import Gain, MemoryGPTModel, ModelArgs, RMSNorm, Values

try:
    from .configuration_megatron_memory import MemoryGPTConfig
except ImportError:
    from megatron_memory.export.hf_remote.configuration_megatron_memory import MemoryGPTConfig


def _args(config: MemoryGPTConfig) -> ModelArgs:
    names = [f.name for f in dataclasses.fields(ModelArgs)]
    return ModelArgs.from_config({n: getattr(config, n) for n in names if hasattr(config, n)})


class MemoryGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MemoryGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: MemoryGPTConfig):
        super().__init__(config)
        self.model = MemoryGPTModel(_args(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh init only (from_pretrained overwrites it): the reference's scales."""
        from transformers import initialization as init  # transformers loads this file: present then

        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (RMSNorm, Gain)):
            init.ones_(module.weight)
        elif isinstance(module, Values):
            init.normal_(module.weight, mean=0.0, std=module.weight.shape[1] ** -0.5)
        elif hasattr(module, "keys") and isinstance(module.keys, nn.Parameter):  # Memory
            bound = (2 * module.half) ** -0.5
            init.uniform_(module.keys, -bound, bound)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache=None,
                use_cache: Optional[bool] = None, labels: Optional[torch.LongTensor] = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [b, s]; attention_mask [b, cached + s] (1 = token, 0 = padding)."""
        if input_ids is None:
            raise ValueError("MemoryGPTForCausalLM needs input_ids (inputs_embeds are not supported)")
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden = self.model(input_ids, position_ids, cache if use_cache else None, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
