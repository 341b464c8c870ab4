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

from dataclasses import dataclass, field
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


def shared_share(sum_x: torch.Tensor, sum_sq: float, count: float) -> float:
    """Shared-direction share of a set of vectors x_t: ||mean_t x_t||^2 / mean_t ||x_t||^2.

    It is the share of the vectors' energy that lies in the one direction common to all of them
    (the mean); 1 when every token carries the same vector, ~1/T for T independent zero-mean ones.
    Chosen over the top singular value's share because it is exactly what statistics across
    tokens (BatchNorm, centring) remove, it costs one pass, and its parts (sum of x, sum of
    ||x||^2, count) add up over TP/DP ranks and micro-batches, so it is exact for any layout.
    """
    if count <= 0 or sum_sq <= 0:
        return 0.0
    mean = sum_x / count
    return float((mean * mean).sum()) / (sum_sq / count)


def hit_buckets(counts: torch.Tensor, buckets: int) -> torch.Tensor:
    """Histogram of per-value hit counts in power-of-two buckets -> [buckets] int64:
    bucket 0 = never selected, bucket b >= 1 = selected in [2^(b-1), 2^b) times (last: and more)."""
    b = torch.zeros_like(counts)
    hit = counts > 0
    b[hit] = (torch.log2(counts[hit].double()).floor().long() + 1).clamp(max=buckets - 1)
    return torch.bincount(b, minlength=buckets)


@dataclass
class UsageStats:
    """Key-usage health of one memory layer (``KeyUsage.summarize``)."""

    SCALARS = ("fraction", "effective", "cumulative", "span_tokens", "input_shared", "query_shared")

    fraction: float           # share of the N values selected at least once in the window
    effective: float          # exp(entropy of the window's selection distribution) / N
    cumulative: float         # share selected at least once since the current span began
    span_tokens: int          # tokens in the current span (it restarts after span_tokens_max)
    input_shared: float       # shared-direction share of the memory input (``shared_share``)
    query_shared: float       # ... of the query as the search sees it (after query norm, QK-norm)
    hits: list = field(default_factory=list)  # ``hit_buckets`` of the window, as ints


class KeyUsage:
    """Key-usage health of one memory layer, accumulated over a log window of training steps.

    The layer calls ``update(indices)`` and ``observe(x, q)`` on every training forward;
    ``summarize(groups)`` sums everything over the ranks that hold the layer's other tokens (TP,
    DP: one collective of N int64 and one of 2(d + D + 2) float64), returns ``UsageStats`` and
    starts a new window. The cumulative share counts values touched since the span began; a span
    ends at the first summary after ``span_tokens`` tokens (e.g. 10M, the issue's yardstick).
    """

    BUCKETS = 32

    def __init__(self, num_values: int, device, span_tokens: int = 10_000_000):
        self.counts = torch.zeros(num_values, dtype=torch.int64, device=device)
        self.touched = torch.zeros(num_values, dtype=torch.bool, device=device)
        self.span_tokens_max, self.span_tokens = span_tokens, 0
        self.moments: Optional[torch.Tensor] = None  # [sum x (d), sum|x|^2, n, sum q (D), sum|q|^2, n]
        self.dims = (0, 0)
        self.last_histogram: Optional[torch.Tensor] = None  # read by tracking.Tracker.key_usage

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        self.counts.index_add_(0, indices.reshape(-1).long(),
                               torch.ones(indices.numel(), dtype=torch.int64, device=indices.device))

    @torch.no_grad()
    def observe(self, x: torch.Tensor, q: torch.Tensor) -> None:
        """x [T, d] the memory input, q [T, D] the query the search sees: add their moments."""
        parts = []
        for t in (x.detach(), q.detach()):
            # float64 sums without a float64 copy of [T, d] (268 MB at T=8192, d=4096)
            n = torch.full((1,), float(t.shape[0]), dtype=torch.float64, device=t.device)
            parts += [t.sum(0, dtype=torch.float64),
                      t.float().square().sum(dtype=torch.float64).view(1), n]
        flat = torch.cat(parts)
        if self.moments is None:
            self.moments, self.dims = torch.zeros_like(flat), (x.shape[1], q.shape[1])
        self.moments += flat

    def _shared(self) -> tuple[float, float]:
        if self.moments is None:
            return 0.0, 0.0
        d, e = self.dims
        m = self.moments
        x = shared_share(m[:d], float(m[d]), float(m[d + 1]))
        q = shared_share(m[d + 2:d + 2 + e], float(m[d + 2 + e]), float(m[d + 3 + e]))
        return x, q

    @torch.no_grad()
    def summarize(self, groups=()) -> UsageStats:
        """Statistics of the window, summed over ``groups`` (collective); then a new window."""
        counts = self.counts
        for group in groups:
            if torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(counts, group=group)
                if self.moments is not None:
                    torch.distributed.all_reduce(self.moments, group=group)
        self.last_histogram = usage_histogram(counts)
        total = int(counts.sum())
        if total == 0:
            return UsageStats(0.0, 0.0, 0.0, self.span_tokens, 0.0, 0.0, [0] * self.BUCKETS)
        p = counts[counts > 0].double() / total
        fraction = float((counts > 0).double().mean())
        effective = float(torch.exp(-(p * p.log()).sum()) / counts.numel())
        self.touched |= counts > 0
        if self.moments is not None:  # tokens: rows observed (x's count), summed over the ranks
            self.span_tokens += int(self.moments[self.dims[0] + 1])
        cumulative = float(self.touched.double().mean())
        x_shared, q_shared = self._shared()
        stats = UsageStats(fraction, effective, cumulative, self.span_tokens, x_shared, q_shared,
                           hit_buckets(counts, self.BUCKETS).tolist())
        if self.span_tokens >= self.span_tokens_max:
            self.touched.zero_()
            self.span_tokens = 0
        counts.zero_()
        if self.moments is not None:
            self.moments.zero_()
        return stats


def usage_scalars(usage: dict) -> dict[str, float]:
    """{'memory/<stat>_layer<i>': value} of every layer's UsageStats (TensorBoard / W&B tags)."""
    out = {}
    for lid, u in usage.items():
        for name in UsageStats.SCALARS:
            tag = {"fraction": "keys_used", "effective": "effective_usage"}.get(name, name)
            out[f"memory/{tag}_layer{lid}"] = float(getattr(u, name))
    return out


def format_key_usage(usage: dict) -> str:
    """Compact progress-line part: per layer used/effective/cumulative % and the input's shared
    share, e.g. ``keys L4 25/9/60% s.97``."""
    if not usage:
        return ""
    return " | keys " + " ".join(
        f"L{lid} {u.fraction:.0%}/{u.effective:.0%}/{u.cumulative:.0%} s{u.input_shared:.2f}".replace("%/", "/")
        .replace(" s0.", " s.").replace(" s1.00", " s1")
        for lid, u in usage.items())


def pack_usage(u: UsageStats) -> list[float]:
    """UsageStats -> a flat list (to sum over pipeline stages in one collective)."""
    return [float(getattr(u, n)) for n in UsageStats.SCALARS] + [float(h) for h in u.hits]


def unpack_usage(vals: list[float]) -> UsageStats:
    k = len(UsageStats.SCALARS)
    kw = dict(zip(UsageStats.SCALARS, vals[:k]))
    kw["span_tokens"] = int(kw["span_tokens"])
    return UsageStats(**kw, hits=[int(h) for h in vals[k:]])


def track_key_usage(model, device: torch.device, span_tokens: int) -> None:
    """Give every memory layer of ``model`` a ``KeyUsage`` counter (read by the Trainer's
    progress line and TensorBoard, summarised per log window)."""
    for layer in model.memory_layers():
        layer.key_usage = KeyUsage(model.memory_config.num_values, device, span_tokens)
