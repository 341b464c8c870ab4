# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""transformers config of an exported Memory+ GPT (config.json, written by
megatron_memory.export.hf_format.hf_config); loaded with ``trust_remote_code=True``."""
from __future__ import annotations

from transformers import PretrainedConfig


class MemoryGPTConfig(PretrainedConfig):
    """Megatron local GPT (RMSNorm, RoPE, SwiGLU, untied output) with Memory+ layers.

    Field meanings as in megatron_memory.export.standalone.ModelArgs; ``memory_layers`` are 0-based.
    """

    model_type = "megatron_memory_gpt"

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    memory_layers: list[int] | None = None
    memory_n_keys: int = 64
    memory_heads: int = 4
    memory_k: int = 8
    memory_k_dim: int = 64
    memory_v_dim: int | None = None
    memory_qk_norm: bool = True
    memory_qk_norm_eps: float = 1e-6
    memory_plus: bool = True
    memory_query_norm: str = "none"
    memory_query_norm_eps: float = 1e-5
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.memory_layers is None:
            self.memory_layers = []
        if self.memory_v_dim is None:
            self.memory_v_dim = self.hidden_size
        super().__post_init__(**kwargs)
