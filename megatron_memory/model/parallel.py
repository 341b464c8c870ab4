# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Parallel plan of the memory layer (the single-device math is in ``layer.py``): the
tensor-parallel table with its token split and lookup, the layers of each pipeline stage, the
TP and PP gradient reductions.

The value table [N, v] is split along its width: TP rank r holds all N rows and columns
[r*v/TP, (r+1)*v/TP). Load is balanced whatever the index distribution, split sizes never depend
on data, and nothing waits on the host.

Forward of one memory layer on TP rank r (T_r tokens here, T = sum over the TP group):
  1. tokens: with sequence parallelism (SP) the rank already holds its T_r = T/TP tokens; without
     SP the activations are replicated and the layer keeps only its 1/TP share (the layer asks
     its table: ``ShardedMemoryValues.split_tokens``), so the query and product-key search run
     once per token, not TP times.
  2. query + search on the T_r tokens -> indices [T_r, bag] int64, weights [T_r, bag] fp32.
  3. all-gather indices and weights over TP -> [T, bag].
  4. local lookup of the column slice for all T tokens -> [T, v/TP].
  5. all-to-all (hidden-split -> token-split) -> [T_r, v]: each token's full-width result on the
     rank that owns it; gating (W1, silu) and W2 run there.
  6. without SP, all-gather the [T_r, d] outputs back to the replicated [T, d] layout.
Backward mirrors it: (5) all-to-all back, (4) the local table gradient needs no communication
(each rank owns its columns), the weights' gradient is a partial sum over columns, so (3) is a
reduce-scatter; (6)/(1) swap gather and split. Memory-layer parameters (query, keys, QK gain,
W1, W2) are replicated over TP and see only T_r tokens on each rank: ``finalize_memory_grads``
sums their gradients (``tp_partial_params``) over the TP group (values are not TP-reduced; DDP
averages over DP).

Memory parallelism (``parallel.memory_parallel_size`` M > TP): the columns are split over a
memory group of M ranks, the TP group and m = M/TP data-parallel ranks, so the table's bytes per
GPU fall with the cluster. Steps 1, 2 and 6 are unchanged (tokens and the query BatchNorm's
statistics stay per TP group); (3) gathers over the memory group, [M*T_r, bag]; (4) looks up
v/M columns for those tokens; (5) returns [T_r, v] by all-to-all over the memory group. The
group is Megatron's expert tensor-and-model-parallel group (``initialize_memory_parallel``) and
the table an ``allreduce=False`` parameter: Megatron DDP reduces its gradient over the expert
data-parallel group only (the DP/m ranks with the same slice; scaled by 1/DP like every
gradient, so the mean is today's), the distributed optimizer shards its state there, and its
grad norm sums squares over the expert tensor-model-pipeline group. Its checkpoint is the
global [N, v] with this slice's offset among the M, replicated over the expert DP group.
With M > TP, p below is M for the lookup's collectives.

Bytes each rank sends (and, symmetrically, receives) per token of the TP group, with
bag = heads*k, p = TP, e = activation bytes (2 for bf16), idx 8 B, weight 4 B:
  forward:  all-gather of indices+weights: (p-1)/p * bag * 12;  all-to-all of results:
            (p-1)/p * v/p * e;  without SP, the output all-gather: (p-1)/p * d * e.
  backward: reduce-scatter of weight grads: (p-1)/p * bag * 4;  all-to-all of result grads:
            (p-1)/p * v/p * e;  without SP, the input-grad all-gather: (p-1)/p * d * e.
At bag=128, v=d=4096, p=2, bf16: forward 768 B + 2048 B (+4096 B without SP) per token.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    all_to_all_hp2sp,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_memory import kernels
from megatron_memory.config import MemoryConfig
from megatron_memory.model.layer import MemoryPlus, MemoryValues


class MemoryDDP(DistributedDataParallel):
    """Megatron DDP aware of a table whose gradient the lookup kernel writes into ``main_grad``.

    On CUDA the Triton lookup adds the table gradient straight into the table's ``main_grad`` and
    returns None to autograd (kernels/README.md). Autograd still runs the table's AccumulateGrad
    node, once per micro-batch and after every lookup of that micro-batch has run its backward
    (the node waits for all its producers, i.e. the last memory layer in backward order), so
    DDP's post-hook fires exactly when the table's gradient is complete, but with ``.grad`` None.
    Megatron's hook asserts ``.grad`` is set when overlap_grad_reduce is on; for such a table
    this hook skips the copy (already in main_grad) and goes straight to DDP's per-param ready
    path, ``register_grad_ready``, which starts the table's bucket reduction as soon as its
    bucket is complete. A returned gradient (CPU reference lookup) takes Megatron's own path.
    """

    def __init__(self, config, ddp_config, module, *args, defer_table_grad: bool = False,
                 defer_max_bytes: Optional[int] = None, **kwargs):
        super().__init__(config, ddp_config, module, *args, **kwargs)
        # With defer_table_grad the Triton lookups only record their table gradient
        # (kernels.DeferredTableGrad); it is added to main_grad in one pass per step, right
        # before the table's gradient reduction starts (start_grad_sync / finish_grad_sync),
        # and earlier whenever the record reaches defer_max_bytes (None: no bound).
        self.deferred_tables = []
        if defer_table_grad and kernels.HAVE_TRITON:  # else the lookups return their gradient
            for p in self.module.parameters():
                if getattr(p, "is_memory_value", False) and p.requires_grad:
                    p.memory_deferred_grad = kernels.DeferredTableGrad(defer_max_bytes)
                    self.deferred_tables.append(p)

    def _make_backward_post_hook(self, param: torch.nn.Parameter):
        ddp_hook = super()._make_backward_post_hook(param)
        if not getattr(param, "is_memory_value", False):
            return ddp_hook

        def hook(*unused):
            if param.grad is not None:  # a returned gradient: Megatron's path adds and clears it
                return ddp_hook(*unused)
            if getattr(param, "memory_deferred_grad", None) is not None:
                return  # not complete yet: fold_deferred_grads marks it ready
            if self.ddp_config.overlap_grad_reduce and param in self.param_to_bucket_group:
                self.param_to_bucket_group[param].register_grad_ready(param, self.force_all_reduce)

        return hook

    def fold_deferred_grads(self, register: bool) -> None:
        """Add every recorded table gradient to main_grad; with ``register`` (and overlapped
        reduction) mark the table ready if anything reached main_grad this step, which starts
        its bucket's reduction. Early folds (the record reached its byte bound during the
        backward) count: the table is marked once per step, here, never from inside backward,
        where more lookups may follow."""
        for p in self.deferred_tables:
            deferred = p.memory_deferred_grad
            deferred.fold(p)
            if deferred.take_folded() and register and self.ddp_config.overlap_grad_reduce \
                    and p in self.param_to_bucket_group:
                self.param_to_bucket_group[p].register_grad_ready(p, self.force_all_reduce)

    def start_grad_sync(self, *unused):
        self.fold_deferred_grads(register=False)  # every bucket starts here anyway
        super().start_grad_sync(*unused)

    def finish_grad_sync(self, *args, **kwargs):
        self.fold_deferred_grads(register=True)
        super().finish_grad_sync(*args, **kwargs)

    def zero_grad_buffer(self):
        for p in self.deferred_tables:  # a step that never reached its reduction leaves nothing
            p.memory_deferred_grad.clear()
        super().zero_grad_buffer()


def tp_world_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def memory_parallel_world_size() -> int:
    """M, the ranks one copy of the value table is split over: the TP group, or with
    ``parallel.memory_parallel_size`` > TP the TP group and M/TP data-parallel ranks, which is
    Megatron's expert tensor-and-model-parallel group of the grid ``initialize_memory_parallel``
    sets up (expert_tensor_parallel_size = TP, expert_model_parallel_size = M/TP)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return max(tp_world_size(), parallel_state.get_expert_tensor_and_model_parallel_world_size())


def initialize_memory_parallel(tp: int, pp: int, memory_parallel_size: int) -> None:
    """Megatron's model-parallel state with the memory-parallel groups.

    Megatron's expert grid orders ranks tp, ep, dp, pp (fastest first), the dense grid tp, dp,
    pp: with expert_tensor_parallel_size = TP and expert_model_parallel_size = m = M/TP, the
    expert tensor-and-model-parallel group (tp-ep) holds the TP groups of m consecutive DP
    ranks (the memory group; its rank = tp_rank + TP * ep_rank, so its TP part is the TP
    group) and the expert data-parallel group holds the DP/m ranks with the same slice (its
    replicas). The pipeline groups are the same in both grids (Megatron asserts it)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=memory_parallel_size // tp, expert_tensor_parallel_size=tp)


class ShardedMemoryValues(MemoryValues):
    """The value table split along its width over the memory-parallel group: the TP group, or
    the TP group and M/TP data-parallel ranks (module docstring)."""

    def __init__(self, config: TransformerConfig, memory_config: MemoryConfig):
        self.memory_parallel = memory_parallel_world_size()
        self.over_dp = self.memory_parallel > tp_world_size()
        rank = (parallel_state.get_expert_tensor_and_model_parallel_rank() if self.over_dp
                else parallel_state.get_tensor_model_parallel_rank())
        full = memory_config.value_dim(config.hidden_size)
        width = full // self.memory_parallel
        super().__init__(config, memory_config, columns=(rank * width, (rank + 1) * width))
        # Counted once per slice in grad norms; checkpointed as a slice along dim 1.
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=1, stride=1)
        if self.over_dp:
            # Megatron's expert-parallel path: DDP reduces this gradient over the expert
            # data-parallel group only (the slice's replicas), the distributed optimizer shards
            # its state there, grad norms sum it over the expert tensor-model-pipeline group.
            self.weight.allreduce = False

    def memory_group(self):
        """The group the lookup gathers indices over and sends results back through."""
        if self.over_dp:
            return parallel_state.get_expert_tensor_and_model_parallel_group()
        return parallel_state.get_tensor_model_parallel_group()

    def split_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, d] replicated over TP -> this rank's [s/TP, b, d] (identity with SP or TP=1)."""
        if tp_world_size() == 1 or self.config.sequence_parallel:
            return hidden_states
        return scatter_to_sequence_parallel_region(hidden_states)

    def gather_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """Inverse of ``split_tokens``: [s/TP, b, d] -> [s, b, d] on every TP rank."""
        if tp_world_size() == 1 or self.config.sequence_parallel:
            return out
        return gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)

    def lookup(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This rank's tokens: indices, weights [T_r, bag] -> full-width results [T_r, v]."""
        group = self.memory_group()
        all_indices = gather_from_sequence_parallel_region(indices, tensor_parallel_output_grad=False,
                                                           group=group)
        all_weights = gather_from_sequence_parallel_region(weights, tensor_parallel_output_grad=True,
                                                           group=group)
        columns = kernels.embedding_bag(self.weight, all_indices, all_weights)   # [M*T_r, v/M]
        return all_to_all_hp2sp(columns, group=group)                            # [T_r, v]

    def token_group(self):
        """The TP group: each rank holds T/TP of the layer's tokens (with SP or without); the
        other ranks of the memory group hold other samples, not other tokens of these."""
        return parallel_state.get_tensor_model_parallel_group() if tp_world_size() > 1 else None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """[N, v] global, this slice offset along dim 1 among the M slices; replicas: the other
        ranks holding the same slice (DP, or over the expert data-parallel group when M > TP)
        and the pipeline copies."""
        if not self.over_dp:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return self._sharded(prefix, sharded_offsets,
                             tp_group=parallel_state.get_expert_tensor_and_model_parallel_group(),
                             dp_cp_group=parallel_state.get_expert_data_parallel_group(
                                 with_gtp_remat=False))


def tp_partial_params(model_chunks) -> list[torch.nn.Parameter]:
    """The own parameters of memory layers whose table is sharded: such a layer handles 1/TP
    of the tokens on each rank (``ShardedMemoryValues.split_tokens``), so their gradients are
    partial sums that ``finalize_memory_grads`` adds up over the TP group."""
    return [p for chunk in model_chunks for m in chunk.modules()
            if isinstance(m, MemoryPlus) and isinstance(m.values, ShardedMemoryValues)
            for p in m.parameters() if p.requires_grad]


def _grad_buffer(p: torch.nn.Parameter):
    """Megatron DDP's fp32 main_grad when present, else .grad."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def reduce_tp_partial_grads(model_chunks) -> None:
    if tp_world_size() == 1:
        return
    grads = [g for g in map(_grad_buffer, tp_partial_params(model_chunks)) if g is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def local_layer_ids(config: TransformerConfig, vp_stage: Optional[int] = None,
                    pp_rank: Optional[int] = None) -> list[int]:
    """Global 0-based ids of the layers built on this pipeline stage."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage,
                                                                pp_rank=pp_rank)))


def memory_stages(config: TransformerConfig, memory_config: MemoryConfig) -> list[int]:
    """Pipeline stages that build at least one memory layer (each holds a copy of the table)."""
    layers = set(memory_config.resolved_layers(config.num_layers))
    return [s for s in range(config.pipeline_model_parallel_size)
            if layers.intersection(local_layer_ids(config, pp_rank=s))]


def build_stage_group(stages: list[int]):
    """The group of this rank's pipeline peers at ``stages`` (None if fewer than two stages).

    Collective over the whole world: every rank creates every such group in the same order.
    """
    if len(stages) < 2:
        return None
    mine = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    group_of_mine = None
    for pp_ranks in sorted({tuple(r) for r in every}):
        group = dist.new_group([pp_ranks[s] for s in stages])
        if tuple(mine) == pp_ranks:
            group_of_mine = group
    return group_of_mine if parallel_state.get_pipeline_model_parallel_rank() in stages else None


def _sync_table_copies(model_chunks) -> None:
    """Sum the value-table gradient over the pipeline stages holding a copy: the logical table
    is one, so every copy takes the same (total) gradient and the same optimizer step."""
    for chunk in model_chunks:
        for m in chunk.modules():
            group = getattr(m, "stage_group", None)
            if isinstance(m, MemoryValues) and group is not None:
                dist.all_reduce(_grad_buffer(m.weight), group=group)


def finalize_memory_grads(model_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """Megatron's ``finalize_model_grads`` plus the memory layers' reductions (TP partial sums,
    table copies across pipeline stages); install as ``TransformerConfig.finalize_model_grads_func``."""
    finalize_model_grads(model_chunks, num_tokens, pg_collection=pg_collection,
                         force_all_reduce=force_all_reduce)
    reduce_tp_partial_grads(model_chunks)
    _sync_table_copies(model_chunks)
    finish_query_norm_step(model_chunks)


def finish_query_norm_step(model_chunks) -> None:
    """Fold each query BatchNorm's step statistics into its running ones, summed over the ranks
    holding the step's other tokens (TP when the table is sharded, DP); once per optimizer step."""
    dp = (parallel_state.get_data_parallel_group()
          if parallel_state.model_parallel_is_initialized() else None)
    for chunk in model_chunks:
        for m in chunk.modules():
            if isinstance(m, MemoryPlus) and m.query_bn is not None:
                m.query_bn.finish_step((m.values.token_group(), dp))
