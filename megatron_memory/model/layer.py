# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Memory / Memory+ layer math on one device (Berges et al. 2025, product keys of Lample et al.).

Shapes: s = sequence, b = batch, d = hidden, T = s*b tokens, H = memory heads, n = sub-keys per
half, N = n**2 values, k = top-k per head, v = value width.

    q = W_q x + b_q                         [T, H, 2, k_dim/2]   (two halves per head)
    s1 = <q_1, K_1>, s2 = <q_2, K_2>        [T, H, n] each        (QK-norm optional)
    top-k of s1, s2; top-k of the k*k sums  -> scores, indices [T, H, k], index = i*n + j
    w = softmax(scores) in float32          [T, H*k]
    y = sum_j w_j V[index_j]                [T, v]               (EmbeddingBag, kernels/)
    Memory+: out = W2 (y * silu(W1 x + b1)) + b2;  plain memory: out = y.

One value table V serves every memory layer: the model owns it (``MemoryValues``) and hands it to
each layer explicitly; a layer keeps an unregistered reference so that the table appears once in
``parameters()``, state dicts and optimizer groups. The table also carries the layer's
distribution strategy: which tokens this device handles (``split_tokens`` / ``gather_tokens``)
and how a lookup reaches the values (``lookup``). Here all three are single-device; the
tensor-parallel table (``parallel.ShardedMemoryValues``) overrides them, and the math in this
file is unchanged by it. This module imports nothing of the parallel plan.
"""
from __future__ import annotations

import math
from typing import Optional

import megatron.core.optimizer.optimizer as mopt
import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_memory import kernels
from megatron_memory.config import MemoryConfig, QueryNorm
from megatron_memory.model.query_norm import QueryBatchNorm

VALUE_GRAD_NORM_GROUP = "memory_values"
# Rows generated per chunk when initialising the table: bounds the temporary [rows, v] buffer.
_INIT_CHUNK_ELEMS = 1 << 26


def _param_device(config: TransformerConfig):
    return "cpu" if config.use_cpu_initialization else torch.cuda.current_device()


def register_value_grad_norm_group() -> None:
    """Let Megatron's optimizer clip the value table by its own gradient norm (the reference
    clips values and the rest separately): Megatron 0.19 clips each name registered in its
    SEPARATE_GRAD_NORM_GROUPS on its own, and the table's param carries that name."""
    if VALUE_GRAD_NORM_GROUP not in mopt.SEPARATE_GRAD_NORM_GROUPS:
        mopt.SEPARATE_GRAD_NORM_GROUPS = mopt.SEPARATE_GRAD_NORM_GROUPS + (VALUE_GRAD_NORM_GROUP,)


def seeded_generator(device, seed: int) -> torch.Generator:
    """A private generator: memory params get the same init whatever the TP/PP layout."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class MemoryValues(MegatronModule):
    """The value table V [N, v] shared by all memory layers of a model, and the single-device
    strategy of the layers that use it (every token handled here, the lookup local).

    ``columns`` selects the slice of the full width held here (all of it on one device; the
    tensor-parallel subclass holds v/TP columns). The init draws the full-width table row chunk
    by row chunk from a seeded generator and keeps ``columns``, so every layout starts from the
    same table.
    """

    def __init__(self, config: TransformerConfig, memory_config: MemoryConfig,
                 columns: Optional[tuple[int, int]] = None):
        super().__init__(config=config)
        self.memory_config = memory_config
        self.full_dim = memory_config.value_dim(config.hidden_size)
        self.columns = columns or (0, self.full_dim)
        width = self.columns[1] - self.columns[0]
        device = _param_device(config)
        self.weight = torch.nn.Parameter(torch.empty(memory_config.num_values, width,
                                                     dtype=config.params_dtype, device=device))
        self.weight.is_memory_value = True  # selects the value param group (LR multiplier)
        register_value_grad_norm_group()
        self.weight.grad_norm_group = VALUE_GRAD_NORM_GROUP  # clipped on its own
        self.stage_group = None  # set when other pipeline stages hold copies (parallel.py)
        if config.perform_initialization:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.memory_config.value_init_std or self.full_dim ** -0.5
        gen = seeded_generator(self.weight.device, self.memory_config.seed)
        n, (c0, c1) = self.weight.shape[0], self.columns
        rows = max(1, _INIT_CHUNK_ELEMS // self.full_dim)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            full = torch.empty(r1 - r0, self.full_dim, device=self.weight.device, dtype=torch.float32)
            full.normal_(0.0, std, generator=gen)
            self.weight[r0:r1].copy_(full[:, c0:c1])

    def split_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, d] -> the [s', b, d] tokens a layer handles on this device: all of them here."""
        return hidden_states

    def gather_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """Inverse of ``split_tokens``: [s', b, d] -> [s, b, d] (identity here)."""
        return out

    def lookup(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices, weights [T, bag] -> [T, v]: the weighted sum of the selected rows."""
        return kernels.embedding_bag(self.weight, indices, weights)

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``lookup`` as a module call. Layers must use the table this way: Megatron DDP's
        overlapped parameter all-gather waits for a bucket in a forward pre-hook, which only a
        module call runs; a plain method call would read the table before its all-gather is
        done and leave that all-gather unwaited (the next step's dispatch then asserts)."""
        return self.lookup(indices, weights)

    def token_group(self):
        """The process group whose ranks hold the other tokens of a layer's batch (their sums
        make the query BatchNorm's statistics); None: every token is here."""
        return None

    def mark_pipeline_copy(self, group, main: bool) -> None:
        """This table is one of several identical copies on pipeline stages joined by ``group``;
        ``main`` marks the copy counted in grad norms and written as the main checkpoint replica."""
        self.stage_group = group
        self.weight.shared = not main  # Megatron's grad-norm code skips ``shared`` params

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """[N, v] global; a TP slice is offset along dim 1; pipeline copies are replicas."""
        return self._sharded(prefix, sharded_offsets)

    def _sharded(self, prefix: str, sharded_offsets: tuple, **groups):
        """``groups``: tp_group (the slices' group) and dp_cp_group (the replicas'), default
        Megatron's TP and DP groups."""
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        axis = {} if self.columns == (0, self.full_dim) else {"weight": 1}
        out = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets, **groups)
        if getattr(self.weight, "shared", False):
            for t in out.values():
                t.replica_id = (1,) + tuple(t.replica_id[1:])
        return out


class MemoryPlus(MegatronModule):
    """Memory+ (or plain memory) block in the ``mlp`` slot of a Megatron TransformerLayer.

    Built from a ModuleSpec with params ``memory_config``, ``values`` (the shared MemoryValues,
    which also decides the token split and the lookup: see the module docstring) and
    ``layer_id`` (0-based global layer index, which also seeds this layer's init). Megatron
    passes ``pg_collection``, ``is_mtp_layer`` and ``name``; they are accepted and unused.
    forward(hidden_states [s, b, d]) -> (out [s, b, d], None).
    """

    def __init__(self, config: TransformerConfig, memory_config: MemoryConfig,
                 values: MemoryValues, layer_id: int, pg_collection=None,
                 is_mtp_layer: bool = False, name: Optional[str] = None):
        super().__init__(config=config)
        if values is None:
            raise ValueError("MemoryPlus needs the model's shared MemoryValues table (values=None)")
        mc = memory_config
        self.memory_config, self.layer_id = mc, layer_id
        d, v = config.hidden_size, mc.value_dim(config.hidden_size)
        self.half = mc.k_dim // 2
        # Not registered as a submodule: the model owns the one table (see module docstring).
        object.__setattr__(self, "values", values)
        self.key_usage = None  # a metrics.KeyUsage when the trainer tracks key usage
        # a graphs.MemoryLayerGraph when the trainer captures this layer in CUDA graphs
        self.cuda_graph = None
        kw = dict(device=_param_device(config), dtype=config.params_dtype)
        self.query = torch.nn.Linear(d, mc.heads * mc.k_dim, bias=True, **kw)
        self.keys = torch.nn.Parameter(torch.empty(mc.heads, 2, mc.n_keys, self.half, **kw))
        # 1-D so that the standard optimizer rule skips weight decay on this gain.
        self.query_norm_weight = (torch.nn.Parameter(torch.ones(mc.heads * mc.k_dim, **kw))
                                  if mc.qk_norm else None)
        self.query_bn = (None if QueryNorm(mc.query_norm) is QueryNorm.NONE else QueryBatchNorm(
            mc.heads * mc.k_dim, mc.query_norm, mc.query_norm_eps, mc.query_norm_momentum, **kw))
        if mc.plus:
            self.w1 = torch.nn.Linear(d, v, bias=True, **kw)
            self.w2 = torch.nn.Linear(v, d, bias=True, **kw)
        if config.perform_initialization:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        mc = self.memory_config
        d = self.config.hidden_size
        gen = seeded_generator(self.keys.device, mc.seed + 1000003 * (self.layer_id + 1))
        # Reference init: xavier query, keys U(+-1/sqrt(k_dim)), W1/W2 N(0, d^-1/2), zero biases.
        bound = math.sqrt(6.0 / (self.query.in_features + self.query.out_features))
        self.query.weight.uniform_(-bound, bound, generator=gen)
        self.keys.uniform_(-mc.k_dim ** -0.5, mc.k_dim ** -0.5, generator=gen)
        self.query.bias.zero_()
        if mc.plus:
            self.w1.weight.normal_(0.0, d ** -0.5, generator=gen)
            self.w2.weight.normal_(0.0, d ** -0.5, generator=gen)
            self.w1.bias.zero_()
            self.w2.bias.zero_()
        if self.query_bn is not None:
            self.query_bn.reset_parameters()

    def _normalised(self, q: torch.Tensor, keys: torch.Tensor):
        """QK-norm: RMS-normalise query halves (learnable gain) and sub-keys, scale 1/sqrt(half)."""
        mc = self.memory_config
        if not mc.qk_norm:
            return q, keys
        gain = self.query_norm_weight.view(mc.heads, 2, self.half)
        acc = kernels.acc_dtype(q)
        q = F.rms_norm(q.to(acc), (self.half,), eps=mc.qk_norm_eps) * gain.to(acc)
        return q, self._normalised_keys(keys, acc)

    def _normalised_keys(self, keys: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """QK-norm of the sub-keys alone (the fused training path normalises the query)."""
        return F.rms_norm(keys.to(acc), (self.half,), eps=self.memory_config.qk_norm_eps) * self.half ** -0.5

    def _fused_query(self, q: torch.Tensor, keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Training with query BatchNorm and QK-norm: both on the query [T, D] in one op
        (kernels/query_norm_train.py, the same math and running-statistics accumulation as
        ``query_bn`` + ``_normalised``) -> [T, H, 2, half] fp32; None where it does not serve
        q (CPU, eval, centring, no QK-norm): the torch path runs."""
        bn, mc = self.query_bn, self.memory_config
        if not (self.training and mc.qk_norm and bn is not None and bn.mode is QueryNorm.BATCHNORM):
            return None
        return kernels.fused_query_norm_train(q, bn.weight, bn.bias, self.query_norm_weight, bn.eps,
                                              mc.qk_norm_eps, self.half, bn.step_sums, keep,
                                              self.values.token_group())

    def select(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None):
        """x [T, d] -> indices [T, H*k] int64, weights [T, H*k] float32 (softmax per head).

        keep [T] (1 = real token, 0 = padding) only matters to the query BatchNorm's statistics.
        """
        mc = self.memory_config
        q = self.query(x)
        fused = self._fused_query(q, keep)
        keys_bf16 = None
        if fused is not None:
            q = fused
            # the sub-keys' QK-norm as one op, with the bf16 copy the bf16 search multiplies by
            normed = kernels.fused_key_norm(self.keys, mc.qk_norm_eps)
            keys, keys_bf16 = normed or (self._normalised_keys(self.keys, fused.dtype), None)
        else:
            if self.query_bn is not None:
                q_bn = self.query_bn(q, keep, self.values.token_group())
                # Without QK-norm the search sees the query in the model's dtype, as before.
                q = q_bn if mc.qk_norm else q_bn.to(q.dtype)
            q, keys = self._normalised(q.view(x.shape[0], mc.heads, 2, self.half), self.keys)
        if self.key_usage is not None and self.training:
            self.key_usage.observe(x, q.reshape(x.shape[0], -1))
        weights, indices = kernels.product_key_search(q, keys, mc.k, keys_bf16=keys_bf16, softmax=True,
                                                      backend=mc.search, select=mc.search_select,
                                                      rescore=mc.search_rescore)
        return indices.flatten(1), weights.flatten(1)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Memory+ gating and output projection: x [T, d], y [T, v] -> [T, d]."""
        if not self.memory_config.plus:
            return y
        return self.w2(y * F.silu(self.w1(x)))

    def _keep(self, padding_mask) -> Optional[torch.Tensor]:
        """Megatron's padding_mask [b, s'] (True = padding; with SP already this rank's share)
        -> keep [s'' * b] float, in this layer's token order and split."""
        if padding_mask is None or self.query_bn is None:
            return None
        keep = (~padding_mask.bool()).t().unsqueeze(-1).to(torch.float32)   # [s', b, 1]
        return self.values.split_tokens(keep).reshape(-1)

    def forward(self, hidden_states: torch.Tensor, padding_mask=None):
        if self.cuda_graph is not None:  # replays its graphs where they serve, else eager
            return self.cuda_graph(hidden_states, padding_mask), None
        return self.eager_forward(hidden_states, padding_mask), None

    def eager_forward(self, hidden_states: torch.Tensor, padding_mask=None) -> torch.Tensor:
        """hidden_states [s, b, d] -> out [s, b, d], op by op (what the CUDA graphs capture)."""
        x = self.values.split_tokens(hidden_states)                # [s', b, d], s' = s / TP
        flat = x.reshape(-1, x.shape[-1])
        indices, weights = self.select(flat, self._keep(padding_mask))
        if self.key_usage is not None and self.training:
            self.key_usage.update(indices)
        y = self.values(indices, weights)  # a module call: see MemoryValues.forward
        out = self.mix(flat, y.to(flat.dtype)).view(x.shape)
        return self.values.gather_tokens(out)
