# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Honest FLOP counting (for MFU) and key-usage statistics of the memory layers.

FLOPs per token, forward (training = 3x: backward does two matmuls per forward one):
  attention projections 2·d·(d + 2·d_kv) + 2·d·d (d_kv = groups · head width: GQA); causal attention core 2·s·d (QKᵀ and PV over
  the s/2 earlier positions on average); SwiGLU FFN 2·3·d·f;
  memory layer: query 2·d·H·k_dim, sub-key scores 2·H·k_dim·n_keys, lookup 2·bag·v (one
  multiply-add per gathered element, NOT 2·N·v as if the table were a dense matmul), W1 and W2
  2·2·d·v; LM head 2·d·V.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_memory.config import RunConfig

# bf16 dense tensor-core peaks (vendor datasheets, without sparsity), TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def flops_per_token(cfg: RunConfig, vocab_size: int) -> float:
    """Training FLOPs (forward + backward) per token of the whole model."""
    m, mem = cfg.model, cfg.memory
    d, s, f = m.hidden_size, m.seq_length, m.ffn_size()
    d_kv = m.query_groups() * (d // m.num_attention_heads)
    attention = 2 * d * (d + 2 * d_kv) + 2 * d * d + 2 * s * d
    dense_ffn = 2 * 3 * d * f
    v = mem.value_dim(d)
    memory = (2 * d * mem.heads * mem.k_dim + 2 * mem.heads * mem.k_dim * mem.n_keys
              + 2 * mem.bag_size * v + (4 * d * v if mem.plus else 0))
    n_mem = len(mem.resolved_layers(m.num_layers))
    forward = (m.num_layers * attention + (m.num_layers - n_mem) * dense_ffn + n_mem * memory
               + 2 * d * vocab_size)
    return 3.0 * forward


def peak_flops(device: torch.device) -> Optional[float]:
    """Per-GPU bf16 peak in FLOP/s, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# Key-usage histogram: bucket b counts the values selected in [2**(b-1), 2**b) times in a window
# (b=0: never), followed by min, max, sum and sum of squares of the counts. Fixed power-of-two
# edges give every stage the same shape, so one all-reduce collects all layers' histograms.
USAGE_BUCKETS, USAGE_STATS = 40, 4


def usage_histogram(counts: torch.Tensor) -> torch.Tensor:
    """Per-value selection counts [N] (int) -> float64 [USAGE_BUCKETS + USAGE_STATS]."""
    bucket = torch.floor(torch.log2(counts.clamp(min=1).double())).long() + 1
    bucket = torch.where(counts > 0, bucket, 0).clamp(max=USAGE_BUCKETS - 1)
    c = counts.double()
    stats = torch.stack([c.min(), c.max(), c.sum(), (c * c).sum()])
    return torch.cat([torch.bincount(bucket, minlength=USAGE_BUCKETS).double(), stats])


class KeyUsage:
    """Counts how often each value row is selected by one memory layer over a window of steps.

    ``fraction`` is the share of the N values selected at least once; ``effective`` is
    exp(entropy of the selection distribution) / N, which is 1 only for perfectly even use.
    """

    def __init__(self, num_values: int, device):
        self.counts = torch.zeros(num_values, dtype=torch.int64, device=device)
        self.last_histogram: Optional[torch.Tensor] = None

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        self.counts.index_add_(0, indices.reshape(-1).long(),
                               torch.ones(indices.numel(), dtype=torch.int64, device=indices.device))

    @torch.no_grad()
    def summarize(self, groups=()) -> tuple[float, float]:
        """(fraction, effective) over the window, counts summed over ``groups``; then reset."""
        counts = self.counts
        for group in groups:
            if torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(counts, group=group)
        self.last_histogram = usage_histogram(counts)  # read by tracking.Tracker.key_usage
        total = counts.sum()
        if total == 0:
            return 0.0, 0.0
        p = counts[counts > 0].double() / total
        fraction = float((counts > 0).double().mean())
        effective = float(torch.exp(-(p * p.log()).sum()) / counts.numel())
        counts.zero_()
        return fraction, effective
