# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Per-GPU memory of a training run: weights, gradients, optimizer state, the value-table shard
and activations, for every pipeline stage of a TP x PP x DP layout with memory-parallel size M
(``estimate``).

The numbers model how this project trains (Megatron DDP with fp32 grad buffers, Megatron
mixed-precision optimizer over torch's fused AdamW, local GPT spec, fused Triton lookup):

  bf16: weights 2 B/param, grad buffer 4 B, fp32 master + Adam m, v 12 B (/DP with the
  distributed optimizer); fp32 (CPU): 4 + 4 + 8. No optimizer-step temporary is counted: on the
  H200 runs of benchmarks/RESULTS.md peaks showed none the size of a param group. The value
  table: N x v/M params per GPU (M = parallel.memory_parallel_size, TP by default), the same
  bytes per param, its optimizer state divided over its TP x DP / M replicas with the
  distributed optimizer.
  Activations per micro-batch and layer (e = 2 bytes, T = s*b tokens, t = TP, t_sp = t with
  sequence parallelism else 1), counted from the tensors autograd saves (checked on CPU in
  tests/tools): attention e*T*h*(3/t_sp + 4/t) + 6*b*(a/t)*s^2 (fp32 softmax kept for its
  backward plus the bf16 probabilities); dense SwiGLU e*T*(3h/t_sp + 5f/t); memory layer
  e*T*3h/t_sp + T/t*(e*h + 12*H*k_dim + 12*bag + 4*e*v) + 12*T*M/t*bag when M > 1 (indices
  and weights gathered over the memory group; the looked-up columns [M*T/t, v/M] and the
  all-to-all result [T/t, v] hold T/t*v values whatever M). With --recompute-activations the softmax term goes and the dense FFN keeps
  e*T*3h/t_sp (memory layers are never recomputed). 1F1B keeps min(M, pp - stage) micro-batches
  of activations on a stage; the last stage adds the logits (e + 4 fp32 bytes per vocab entry
  and token).

  Deferred table gradient (``train.defer_table_grad``, on by default with CUDA): every lookup
  of a step keeps its output gradient [M*T/t, v/M] (e bytes) and the gathered indices/weights
  (12 B per token and bag entry) until the fold, which concatenates them (a second copy).
  Counted as max(activations + stash, 2 x stash), with stash = L x T*(e*v/t + 12*bag*M/t) for the
  L = M x (memory layers) lookups of a step, at most the lookups that reach
  ``train.defer_table_grad_gib`` (a fold comes as soon as the stash reaches it).

  Checkpoint save (``save_peak``): with the distributed optimizer, megatron-core's
  fully-reshardable save all-gathers the data-parallel group's optimizer state onto every rank
  (NCCL, its default), so a rank briefly holds DP x its shard. The blocks freed by the
  activations are not reused for those buffers in practice, so the save peak is the training
  peak plus (DP - 1) x the optimizer shard (the table's: replicas - 1), which matched the measured save peak of the 8B
  Memory+ model on 4 x H200 (TP=2, DP=2; see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_memory.config import ConfigError, Environment, RunConfig, replace, resolve

GIB = 1024 ** 3


@dataclass
class StageMemory:
    stage: int
    layers: list[int]
    memory_layers: list[int]
    dense_params: int          # per GPU, excluding the value table
    table_params: int          # per GPU (its slice of N x v/M), 0 if this stage has no copy
    weights: float
    grads: float
    optimizer: float
    activations: float
    save_extra: float = 0.0    # what a checkpoint save adds (module docstring)
    deferred: float = 0.0      # the deferred table gradient's stash (module docstring)

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer
                + max(self.activations + self.deferred, 2 * self.deferred))

    @property
    def save_peak(self) -> float:
        return self.total + self.save_extra


def _layer_params(cfg: RunConfig, memory: bool, tp: int) -> tuple[int, int]:
    """(TP-sharded params, TP-replicated params) of one transformer layer on one GPU."""
    m, mc = cfg.model, cfg.memory
    h = m.hidden_size
    d_kv = m.query_groups() * (h // m.num_attention_heads)  # key/value width (GQA)
    attention = (2 * h * h + 2 * h * d_kv) // tp
    norms = 2 * h
    if not memory:
        return attention + 3 * h * m.ffn_size() // tp, norms
    v = mc.value_dim(h)
    own = (h * mc.heads * mc.k_dim + mc.heads * mc.k_dim + mc.heads * mc.k_dim * mc.n_keys
           + (mc.heads * mc.k_dim if mc.qk_norm else 0) + (2 * h * v + v + h if mc.plus else 0)
           # query BatchNorm's affine (its running statistics are buffers of 2*H*k_dim floats)
           + (2 * mc.heads * mc.k_dim if str(mc.query_norm) == "batchnorm" else 0))
    return attention, norms + own


def _activations(cfg: RunConfig, layers: list[int], mem_layers: set[int], mbs: int, tp: int,
                 e: int, mp: int = 0) -> float:
    """Activation bytes of ``layers`` for one micro-batch; ``mp``: the memory-parallel size
    (default TP)."""
    mp = mp or tp
    m, mc = cfg.model, cfg.memory
    s, h, a, f = m.seq_length, m.hidden_size, m.num_attention_heads, m.ffn_size()
    T = s * mbs
    t_sp = tp if cfg.parallel.sequence_parallel else 1
    softmax = 4 + (e if e < 4 else 0)  # fp32 probabilities, plus their low-precision copy
    d_kv = m.query_groups() * (h // a)
    # norm in/normed/out; q, k, v, context (the projection's input)
    attention = e * T * (3 * h / t_sp + (2 * h + 2 * d_kv) / tp)
    if cfg.train.recompute_activations:  # core attention and FFN replayed: only inputs kept
        dense = e * T * 3 * h / t_sp
    else:
        # local attention keeps the [s, s] probabilities; SDPA only a float32 log-sum-exp per row
        attention += (softmax * mbs * (a / tp) * s * s if m.attention == "local"
                      else 4 * mbs * (a / tp) * s)
        dense = e * T * (3 * h / t_sp + 5 * f / tp)      # norm, fc1 out (2f), silu, product, ...
    v = mc.value_dim(h)
    memory = (3 * e * T * h / t_sp + T / tp * (e * h + 12 * mc.heads * mc.k_dim + 12 * mc.bag_size
                                          + 4 * e * v) + (12 * T * mp / tp * mc.bag_size if mp > 1 else 0))
    return sum(attention + (memory if i in mem_layers else dense) for i in layers)


def estimate(cfg: RunConfig, world_size: int, vocab_size: int, cuda: bool = True) -> list[StageMemory]:
    """Per-GPU memory of each pipeline stage (the max over its TP/DP ranks) of a run on
    ``world_size`` ranks on CUDA (else CPU). ``cfg`` is resolved for them unless it is already
    ``resolve``'s output: the calculator reads the same derived defaults as the Trainer."""
    r = cfg if cfg.resolved else resolve(cfg, Environment(world_size, cuda))
    cfg, t = r, r.train
    tp, pp, mp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.memory_parallel_size
    dp = world_size // (tp * pp)
    replicas = tp * dp // mp  # ranks holding the same table slice
    dist_opt, bf16 = t.distributed_optimizer, t.bf16
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    e, b_w, b_g, b_o = (2, 2, 4, 12) if bf16 else (4, 4, 4, 8)
    mem = set(cfg.memory.resolved_layers(cfg.model.num_layers))
    h, v = cfg.model.hidden_size, cfg.memory.value_dim(cfg.model.hidden_size)
    out = []
    for stage in range(pp):
        per_stage = cfg.model.num_layers // pp  # Megatron's even split (validated divisible)
        layers = list(range(stage * per_stage, (stage + 1) * per_stage))
        sharded = replicated = 0
        for i in layers:
            a_, b_ = _layer_params(cfg, i in mem, tp)
            sharded, replicated = sharded + a_, replicated + b_
        if stage == 0:
            sharded += vocab_size * h // tp
        if stage == pp - 1:
            sharded += vocab_size * h // tp + h
        here = sorted(mem.intersection(layers))  # this stage's memory layers
        table = cfg.memory.num_values * v // mp if here else 0
        params = sharded + replicated + table
        opt_div, table_div = (dp, replicas) if dist_opt else (1, 1)
        acts = _activations(cfg, layers, mem, t.micro_batch_size, tp, e, mp) * min(micro, pp - stage)
        if stage == pp - 1:
            acts += t.micro_batch_size * cfg.model.seq_length * vocab_size / tp * (e + 4)
        dense_optimizer, table_optimizer = (sharded + replicated) * b_o / opt_div, table * b_o / table_div
        optimizer = dense_optimizer + table_optimizer
        tokens = t.micro_batch_size * cfg.model.seq_length
        per_lookup = tokens * (e * v / tp + 12 * cfg.memory.bag_size * mp / tp)
        lookups = min(micro * len(here), math.ceil(t.defer_table_grad_gib * 2**30 / per_lookup))
        # only Triton lookups (CUDA) record; the torch reference returns its gradient at once
        deferred = lookups * per_lookup if t.defer_table_grad and cuda and here else 0.0
        out.append(StageMemory(stage, layers, here, sharded + replicated,
                               table, params * b_w, params * b_g, optimizer, acts,
                               save_extra=(dense_optimizer * (dp - 1) + table_optimizer * (replicas - 1)
                                           if dist_opt else 0.0),
                               deferred=deferred))
    return out


@dataclass
class Layout:
    """One TP x PP x DP candidate with memory-parallel size ``mp`` and its predicted peak (the
    largest stage)."""

    tp: int
    pp: int
    dp: int
    peak: float  # bytes per GPU: the larger of training and checkpoint-save peaks
    fits: bool
    mp: int = 0  # memory-parallel size; 0: TP

    def flags(self) -> list[str]:
        """Training flags of this layout; sequence parallelism whenever TP > 1 (it splits the
        norm and dropout activations over TP at the cost of nothing but the reduce-scatter that
        replaces an all-reduce); --memory-parallel-size when the table spans DP ranks."""
        return (["--tp", str(self.tp), "--pp", str(self.pp)]
                + (["--sequence-parallel"] if self.tp > 1 else [])
                + (["--memory-parallel-size", str(self.mp)] if self.mp > self.tp else []))


def memory_parallel_sizes(tp: int, dp: int) -> list[int]:
    """The valid memory-parallel sizes of a TP x DP layout: multiples of TP dividing TP x DP."""
    return [m for m in range(tp, tp * dp + 1, tp) if (tp * dp) % m == 0]


def layouts(cfg: RunConfig, world_size: int, vocab_size: int, gpu_bytes: float,
            headroom: float = 0.1, max_tp: int = 8, cuda: bool = True) -> list[Layout]:
    """Every valid TP x PP x M layout of ``world_size`` GPUs for ``cfg`` (TP <= ``max_tp``: one
    node's NVLink domain), best first: fitting ones (peak, training or checkpoint save, whichever
    is larger, <= (1 - headroom) x card, the rest for
    the CUDA context, NCCL buffers and allocator slack) before the others, then fewest
    model-parallel ranks (the most data parallelism), then the shallower pipeline (fewer bubbles
    and stages; TP inside a node costs less at these sizes), then the smallest memory-parallel
    size (its lookup traffic crosses data-parallel ranks, possibly nodes), then the lower peak."""
    out = []
    for tp in (t for t in range(1, min(max_tp, world_size) + 1) if world_size % t == 0):
        for pp in (p for p in range(1, world_size // tp + 1) if (world_size // tp) % p == 0):
            dp = world_size // (tp * pp)
            for mp in memory_parallel_sizes(tp, dp):
                trial = replace(cfg, **{"parallel.tp": tp, "parallel.pp": pp,
                                        "parallel.sequence_parallel": tp > 1,
                                        "parallel.memory_parallel_size": mp})
                try:
                    peak = max(s.save_peak for s in estimate(trial, world_size, vocab_size, cuda))
                except ConfigError:  # heads, groups, layers, widths or the batch do not divide
                    continue
                out.append(Layout(tp, pp, dp, peak, peak <= (1 - headroom) * gpu_bytes, mp))
    return sorted(out, key=lambda l: (not l.fits, l.tp * l.pp, l.pp, l.mp, l.peak))


def largest_table(cfg: RunConfig, world_size: int, vocab_size: int, gpu_bytes: float,
                  headroom: float = 0.1, max_tp: int = 8, cuda: bool = True):
    """(n_keys, best Layout) of the largest table (memory.n_keys, at least memory.k) that some
    layout of ``world_size`` GPUs fits, or None when not even the smallest does."""
    fits = lambda n: next((l for l in layouts(replace(cfg, **{"memory.n_keys": n}), world_size,  # noqa: E731
                                              vocab_size, gpu_bytes, headroom, max_tp, cuda)
                           if l.fits), None)
    lo, hi = cfg.memory.k, cfg.memory.n_keys
    if fits(lo) is None:
        return None
    while lo < hi:  # the peak grows with n_keys: the largest n with a fit
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) is not None else (lo, mid - 1)
    return lo, fits(lo)


def smallest_world(cfg: RunConfig, world_size: int, vocab_size: int, gpu_bytes: float,
                   headroom: float = 0.1, max_tp: int = 8, cuda: bool = True,
                   limit: int = 1 << 14) -> int | None:
    """The smallest world size (``world_size`` doubled, up to ``limit``) at which some layout fits
    ``cfg`` (the global batch kept), or None."""
    w = world_size * 2
    while w <= limit:
        if any(l.fits for l in layouts(cfg, w, vocab_size, gpu_bytes, headroom, max_tp, cuda)):
            return w
        w *= 2
    return None
