# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materialises the [b, np, s, s] scores (baddbmm, a
separate softmax, bmm), which at s = 2048 costs more time and memory than the projections around
it. ``SDPAttention`` is a drop-in ``core_attention`` module for the local spec: same constructor
and forward signature as Megatron-Core 0.19's DotProductAttention (it subclasses it, so the
sharded state dict and the per-partition head counts are Megatron's), and torch picks its flash /
cuDNN / memory-efficient backend on GPU, the math backend on CPU. Grouped-query attention passes
the [s, b, ng, hn] keys and values unrepeated (``enable_gqa``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

ATTENTION_IMPLS = ("sdpa", "local")


class SDPAttention(DotProductAttention):
    """Causal (or padding-masked) attention of one TP partition's heads.

    forward(query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask None or bool
    [b or 1, 1, sq, sk] with True = masked out, as Megatron's) -> context [sq, b, np*hn].
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type={config.softmax_type!r} is not supported "
                             "by scaled_dot_product_attention; use the local attention")
        if config.window_size is not None:
            raise ValueError("SDPAttention: sliding-window attention is not supported; use the "
                             "local attention")
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        # Megatron divides by the layer number for query-key layer scaling and multiplies it back
        # inside its fp32 softmax; SDPA has no such split, so the net scale is used directly.
        self.sdpa_scale = (softmax_scale if softmax_scale is not None
                           else 1.0 / math.sqrt(self.hidden_size_per_attention_head))
        self.dropout_p = self.attention_dropout.p

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention bias are not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, heads, hn] -> [b, heads, s, hn]: a strided view; SDPA needs only hn contiguous.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = attention_mask is None and mask_type == AttnMaskType.causal and q.shape[2] > 1
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.dropout_p if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                ctx = self._sdpa(q, k, v, mask, dropout, causal, gqa)
        else:
            ctx = self._sdpa(q, k, v, mask, dropout, causal, gqa)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return ctx.permute(2, 0, 1, 3).reshape(ctx.shape[2], ctx.shape[0], -1)

    def _sdpa(self, q, k, v, mask, dropout, causal, gqa):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=causal, scale=self.sdpa_scale,
                                              enable_gqa=gqa)


def core_attention_module(impl: str):
    """The ``core_attention`` class of the local spec for ``impl`` ("sdpa" or "local")."""
    if impl == "sdpa":
        return SDPAttention
    if impl == "local":
        return DotProductAttention
    raise ValueError(f"attention implementation {impl!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
