# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Training checkpoints on megatron-core ``dist_checkpointing``: periodic save, exact resume,
resharding to another TP/PP/DP layout.

A save directory, Megatron-style::

    DIR/latest_checkpointed_iteration.txt   the last complete iteration; replaced only after
                                            a save has completed (write, fsync, rename)
    DIR/iter_0000200/                       one checkpoint (megatron-core torch_dist format):
        *.distcp, metadata.json, ...        model and optimizer state, sharded; common state:
                                            iteration, consumed samples, LR schedule,
                                            architecture, resolved run config, layout
        integrity.json                      SHA-256 of every file (megatron-core), checked on load
        run_config.json                     the resolved run configuration, for people and tools

A save is written to ``iter_N.partial`` and renamed when every rank has finished, so a crash or
``kill -9`` mid-save leaves the previous checkpoint (and the tracker naming it) intact.

Optimizer state uses the distributed optimizer's ``fully_reshardable`` format (one canonical tensor
per parameter and state, so any TP/PP/DP layout loads it; saving gathers each DP group's state on
its DP rank 0). RNG states (python, numpy, torch, CUDA, Megatron's model-parallel tracker) are
saved per rank and restored only when the layout is unchanged; another layout gets fresh RNG
streams (the model itself has no dropout, so the trajectory does not depend on them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_memory.config import ConfigError, QueryNorm, RunConfig
from megatron_memory.errors import CheckpointError
from megatron_memory.checkpointing.integrity import MANIFEST, IntegrityError, verify_manifest, write_manifest

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: str | os.PathLike) -> Optional[int]:
    """The last complete iteration recorded in ``root``, or None when there is no tracker."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def resolve(path: str | os.PathLike) -> Path:
    """A save root (its tracker picks the latest iteration) or one ``iter_*`` directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    latest = read_tracker(path)
    if latest is not None:
        target = iteration_dir(path, latest)
        if not target.is_dir():
            raise CheckpointError(f"{path / TRACKER} names iteration {latest}, but {target} is missing")
        return target
    if (path / "metadata.json").is_file():
        return path
    partial = sorted(p.name for p in path.glob("iter_*.partial")) if path.is_dir() else []
    hint = f" (only unfinished saves: {', '.join(partial)})" if partial else ""
    raise CheckpointError(f"{path} holds no checkpoint: no {TRACKER} and no metadata.json{hint}")


def architecture(cfg: RunConfig, vocab_size: int) -> dict:
    """The fields that fix the model's parameters: a checkpoint loads only into the same ones."""
    m, mem = cfg.model, cfg.memory
    layers = mem.resolved_layers(m.num_layers)
    arch = {"model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
            "model.num_attention_heads": m.num_attention_heads,
            "model.num_query_groups": m.query_groups(),
            "model.ffn_hidden_size": m.ffn_size(), "model.vocab_size": vocab_size,
            "memory.layers": layers}
    if layers:
        arch.update({"memory.n_keys": mem.n_keys, "memory.heads": mem.heads, "memory.k": mem.k,
                     "memory.k_dim": mem.k_dim, "memory.v_dim": mem.value_dim(m.hidden_size),
                     "memory.qk_norm": mem.qk_norm, "memory.plus": mem.plus})
        if str(mem.query_norm) != "none":  # absent before query norms existed: old ones still load
            arch["memory.query_norm"] = str(mem.query_norm)
    if m.transformer_impl != "local":  # TE's fused norms name their weights differently
        arch["model.transformer_impl"] = m.transformer_impl
    return arch


def saved_run_config(common: dict) -> RunConfig:
    """The run configuration a checkpoint was trained with. Fields newer than the checkpoint
    take the value its model actually had, not today's default (query norms came later: none)."""
    saved = common["run_config"]
    cfg = RunConfig.from_dict(saved)
    if "query_norm" not in saved.get("memory", {}):
        cfg.memory.query_norm = QueryNorm.NONE
    return cfg


def check_architecture(saved: dict, mine: dict, where: Path) -> None:
    """One error naming every field in which the checkpoint's model differs from this run's."""
    if "model.num_query_groups" not in saved and "model.num_attention_heads" in saved:
        # Checkpoints from before grouped-query attention was configurable are multi-head.
        saved = {**saved, "model.num_query_groups": saved["model.num_attention_heads"]}
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {mine.get(k)!r}"
             for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
    if diffs:
        raise ConfigError(f"checkpoint {where} holds a different model ({'; '.join(diffs)}); "
                          "load it with the same model flags, or convert it")


def check_files(target: Path) -> None:
    """Every shard file the checkpoint's metadata names exists and is long enough: a missing or
    truncated file is named here, before any rank starts reading (cheap: sizes only; the SHA-256
    manifest, when present, catches changed bytes at load)."""
    try:
        meta = dcp.FileSystemReader(str(target)).read_metadata()
    except Exception as err:  # noqa: BLE001 - unreadable metadata is one line, not a traceback
        raise CheckpointError(f"{target / '.metadata'}: unreadable ({_first_line(err)})") from err
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        file = target / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the checkpoint's metadata names it)")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file}: truncated ({file.stat().st_size} bytes, the checkpoint "
                                  f"needs {size})")


def peek(path: str | os.PathLike) -> tuple[Path, dict]:
    """(checkpoint directory, its common state) without building anything; errors are one line."""
    target = resolve(path)
    check_files(target)
    try:
        common = dist_checkpointing.load_common_state_dict(str(target))
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one clear line
        raise CheckpointError(f"cannot read checkpoint {target}: {_first_line(err)}") from err
    if not isinstance(common, dict) or "format_version" not in common:
        raise CheckpointError(f"{target} is a Megatron checkpoint but not one written by "
                              "megatron-memory (no format_version in its common state)")
    return target, common


def saved_distributed_optimizer(common: dict) -> Optional[bool]:
    """Whether a training checkpoint's optimizer state was written by megatron-core's distributed
    optimizer (None for a weights-only checkpoint). Older checkpoints do not record it: then the
    saving run's setting, where it was unset the default (DP > 1), decides."""
    if common.get("iteration", 0) == 0 or common.get("scheduler") is None:
        return None
    if "distributed_optimizer" in common:
        return bool(common["distributed_optimizer"])
    chosen = common.get("run_config", {}).get("train", {}).get("distributed_optimizer")
    return bool(chosen) if chosen is not None else common.get("layout", {}).get("dp", 1) > 1


def optimizer_kind(requested: Optional[bool], dp: int, resume: Optional[tuple] = None,
                   finetune: bool = False) -> bool:
    """Whether a run uses the distributed optimizer: ``requested`` when set, else DP > 1. A run
    resuming ``resume`` = (directory, common state) keeps the checkpoint's kind: the two kinds
    store their state in formats megatron-core 0.19 cannot load into each other (the distributed
    optimizer runs at DP=1 too); a contrary explicit choice is one clear error before anything is
    built. --finetune loads weights only: free."""
    saved = saved_distributed_optimizer(resume[1]) if resume and not finetune else None
    if saved is None:
        return requested if requested is not None else dp > 1
    if requested is None or requested == saved:
        return saved
    kind = "distributed" if saved else "non-distributed"
    raise CheckpointError(
        f"checkpoint {resume[0]} holds the optimizer state of the {kind} optimizer, which "
        f"megatron-core cannot load into the {'non-distributed' if saved else 'distributed'} one: "
        f"drop --{'no-' if not requested else ''}use-distributed-optimizer (the run then keeps the "
        f"checkpoint's kind), or pass --finetune to start a fresh optimizer from its weights")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split("\n")[:4])


def _layout() -> dict:
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_object(state):
    """This rank's RNG state as a ShardedObject on the (pp, tp, dp) grid of ranks."""
    lay = _layout()
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, (lay["pp"], lay["tp"], lay["dp"]), offset, replica_id=0)


def rng_state() -> dict:
    """Every random stream a step may draw from, on this rank."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


@dataclass
class TrainingState:
    """What a training checkpoint holds, handed over by its owner (the Trainer): checkpointing
    reads these and nothing else, and ``load`` returns what it restored instead of writing it
    back into the owner."""

    model: torch.nn.Module      # the unwrapped MemoryGPTModel of this rank
    optimizer: Any              # Megatron's (chained, maybe distributed) optimizer
    scheduler: Any              # Megatron's OptimizerParamScheduler
    cfg: RunConfig              # the resolved run config: saved as run_config and architecture
    vocab_size: int
    distributed_optimizer: bool
    progress: dict              # the owner's state_dict(): iteration, consumed_samples


@dataclass
class Loaded:
    """What ``load`` restored beyond the tensors it loaded in place."""

    progress: dict              # iteration (0: weights only) and consumed_samples
    bytes_read: int             # checkpoint tensor bytes this rank read from storage


def _state_dict(state: TrainingState, is_loading: bool, with_optimizer: bool, with_rng: bool) -> dict:
    model_sd = state.model.sharded_state_dict()
    sd = {"model": model_sd}
    if with_optimizer:
        if is_loading:
            _prepare_distributed_optimizer_load(state.optimizer)
        sd["optimizer"] = _optimizer_state(state.optimizer, model_sd, is_loading)
    if with_rng:
        sd["rng_state"] = _rng_object(None if is_loading else rng_state())
    return sd


_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                       "chained_optim_avoid_prefix": True}


_MERGED = "memory_parallel_merged"  # marks a state merged from several optimizers


def _sub_optimizers(optimizer) -> list:
    """The optimizers of a ChainedOptimizer holding several (the value table in its own when
    memory parallelism spans data-parallel ranks: Megatron's expert-parallel optimizer), else []."""
    subs = getattr(optimizer, "chained_optimizers", [])
    return subs if len(subs) > 1 else []


def _optimizer_state(optimizer, model_sd: dict, is_loading: bool) -> dict:
    """The optimizer's sharded state dict in one structure whatever the number of optimizers.

    One optimizer: megatron-core's own. Several (memory_parallel_size > TP puts the value table
    in Megatron's expert-parallel optimizer): their state dicts merged into the structure of a
    single optimizer, so a checkpoint saved at any memory-parallel size loads at any other: the
    tensors are keyed by the model's parameter names already (fully reshardable format, no
    per-optimizer prefix); the per-parameter entries are numbered on across the optimizers and
    the param groups concatenated. ``_split_optimizer_state`` undoes it after a load."""
    subs = _sub_optimizers(optimizer)
    parts = [o.sharded_state_dict(model_sd, is_loading=is_loading,
                                  metadata=dict(_OPTIMIZER_METADATA)) for o in subs or [optimizer]]
    if is_loading:
        optimizer._memory_load_parts = parts  # their param groups are what a merged load keeps
    if not subs:
        return parts[0]
    key, state_key, groups_of = _state_layout(parts[0])
    merged = {k: v for k, v in parts[0].items() if k != key}
    merged[_MERGED] = True
    states, groups = {}, []
    for part in parts:
        for idx, entry in _per_param(part[key]).items():
            states[len(states)] = entry
        groups += groups_of(part)
    if state_key is None:  # distributed: {"param_state": {i: ...}, "optimizer": {"param_groups"}}
        merged[key] = states
        merged["optimizer"] = {**parts[0]["optimizer"], "param_groups": groups}
    else:  # non-distributed: {"state": {i: ..., "common_step": s}, "param_groups": [...]}
        common = {k: v for k, v in parts[0][key].items() if not isinstance(k, int)}
        merged[key] = {**states, **common}
        merged["param_groups"] = groups
    return merged


def _state_layout(part: dict):
    """(key of the per-parameter entries, None for the distributed optimizer's or the inner key,
    the part's param groups)."""
    if "param_state" in part:
        return "param_state", None, lambda p: list(p["optimizer"]["param_groups"])
    if "optimizer" in part:  # bf16 wrapper: config.resolve rejects it with memory parallelism
        raise CheckpointError("the non-distributed bf16 optimizer's state cannot be saved with "
                              "memory_parallel_size > tp: use the distributed optimizer")
    return "state", "state", lambda p: list(p["param_groups"])


def _per_param(entries: dict) -> dict:
    """The per-parameter entries (int keys) of a state, without common ones (common_step)."""
    return {k: v for k, v in entries.items() if isinstance(k, int)}


def _split_optimizer_state(optimizer, loaded: dict):
    """A loaded merged state (``_optimizer_state``) -> the list ChainedOptimizer.load_state_dict
    takes. Each optimizer keeps its own param groups (its parameters, lr multipliers) with the
    saved step; lr and weight decay are set again by the scheduler's load."""
    subs = _sub_optimizers(optimizer)
    parts = optimizer.__dict__.pop("_memory_load_parts")
    if not subs and not loaded.get(_MERGED):
        return loaded  # saved and loaded by one optimizer: megatron-core's own path
    key, state_key, groups_of = _state_layout(parts[0])
    entries = _per_param(loaded[key])
    saved_groups = (loaded["optimizer"]["param_groups"] if state_key is None
                    else loaded["param_groups"])
    steps = {g.get("step") for g in saved_groups if g.get("step") is not None}
    out, start = [], 0
    for part in parts:
        n = len(_per_param(part[key]))
        mine = {i: entries[start + i] for i in range(n)}
        start += n
        groups = [dict(g) for g in groups_of(part)]
        for g in groups:
            if steps:
                g["step"] = next(iter(steps))
            if hasattr(g.get("params"), "unwrap"):
                g["params"] = g["params"].unwrap()
        sub = {k: v for k, v in loaded.items()
               if k not in (key, "optimizer", "param_groups", _MERGED)}
        if state_key is None:
            sub[key] = mine
            sub["optimizer"] = {**loaded["optimizer"], "param_groups": groups}
        else:
            common = {k: v for k, v in loaded[key].items() if not isinstance(k, int)}
            sub[key] = {**mine, **common}
            sub["param_groups"] = groups
        out.append(sub)
    return out if subs else out[0]


def _prepare_distributed_optimizer_load(optimizer) -> None:
    """Two gaps of megatron-core 0.19.2's distributed optimizer with torch's Adam (no Apex/TE):
    a fresh optimizer has no Adam state, and building the sharded state dict to load into asserts
    on it, so the state is created first (megatron-core's own dummy-step helper; the load
    overwrites it in place); and its fully-reshardable load skips the per-param "step" tensor on
    the source side but still looks it up (KeyError), although the step is restored from the
    param groups: give the lookup an explicit "nothing to copy" (None) for it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
        if "_set_main_param_and_optimizer_states" not in vars(opt):
            original = opt._set_main_param_and_optimizer_states

            def set_states(model_param, tensors, _original=original):
                return _original(model_param, {"step": None, **tensors})

            opt._set_main_param_and_optimizer_states = set_states


def save(state: TrainingState, root: str | os.PathLike, integrity: bool = True,
         async_queue=None) -> Path:
    """Write ``root/iter_<iteration>`` (collective), then point the tracker at it and prune old
    checkpoints beyond ``train.keep_last``. Iteration 0 saves the weights only.

    With ``async_queue`` (megatron-core's AsyncCallsQueue) the state is staged now and written in
    the background; the rename and tracker update run when every rank has finished writing
    (``async_queue.maybe_finalize_async_calls``), so the tracker never names an incomplete save."""
    iteration = state.progress["iteration"]
    root, final = Path(root), iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that crashed: never tracked
        partial.mkdir(parents=True)
    dist.barrier()
    sd = _state_dict(state, is_loading=False, with_optimizer=iteration > 0, with_rng=True)
    cfg = state.cfg
    sd.update({"format_version": FORMAT_VERSION, "iteration": iteration,
               "consumed_samples": state.progress["consumed_samples"],
               "scheduler": state.scheduler.state_dict() if iteration > 0 else None,
               "architecture": architecture(cfg, state.vocab_size), "layout": _layout(),
               "distributed_optimizer": state.distributed_optimizer,
               "run_config": dataclasses.asdict(cfg)})

    def publish() -> None:
        if dist.get_rank() == 0:
            (partial / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            if final.exists():  # the same iteration saved before (a rerun): replace it
                shutil.rmtree(final)
            os.replace(partial, final)
            write_tracker(root, iteration)
            _prune(root, cfg.train.keep_last, keep=iteration)
        dist.barrier()

    def manifest() -> None:  # every rank hashes its share (megatron-core's is rank 0 alone)
        if integrity:
            write_manifest(partial)

    strategy = save_strategy(cfg.train.fully_parallel_save, cfg.train.checkpoint_write_threads)
    if async_queue is None:
        dist_checkpointing.save(sd, str(partial), strategy)
        manifest()
        publish()
    else:
        request = dist_checkpointing.save(sd, str(partial), strategy, async_sharded_save=True,
                                          async_strategy="mcore")
        request.add_finalize_fn(manifest)
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


def save_strategy(fully_parallel: bool, threads: int = 1):
    """megatron-core's torch_dist save strategy writing each rank's share with ``threads``
    threads (one file each); with ``fully_parallel`` and DP > 1 wrapped so
    that each tensor the DP ranks hold in common is written by one of them, balanced by size,
    instead of all by DP rank 0. Why: with DP rank 0 writing everything, a 130 GiB 8B checkpoint
    saved at DP=2 at about a third of the disk's read bandwidth. Same format
    either way (only which rank wrote which file differs): any layout loads either."""
    strategy = get_default_save_sharded_strategy()
    strategy.thread_count = threads
    group = _parallel_io_group(fully_parallel)
    return FullyParallelSaveStrategyWrapper(strategy, group) if group is not None else strategy


def _parallel_io_group(fully_parallel: bool):
    """The DP group (with context parallelism) that shares checkpoint reads/writes, or None when
    off or when DP = 1 (nothing to share)."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    return group if fully_parallel and group.size() > 1 else None


class _CountingLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist loading, counting the tensor bytes this rank reads from storage
    (under the fully parallel wrapper: only the share the wrapper assigned to it)."""

    def __init__(self):
        super().__init__()
        self.bytes_read = 0

    def load(self, sharded_state_dict, checkpoint_dir, *args, **kwargs):
        self.bytes_read += sum(math.prod(t.local_shape) * t.dtype.itemsize
                               for t in nested_values(sharded_state_dict)
                               if isinstance(t, ShardedTensor))
        return super().load(sharded_state_dict, checkpoint_dir, *args, **kwargs)


def load_strategy(base: TorchDistLoadShardedStrategy, fully_parallel: bool):
    """``base`` alone, or with ``fully_parallel`` and DP > 1 wrapped so that each tensor the DP
    ranks need in common (the weights, the fully reshardable optimizer state) is read from storage
    by one of them and broadcast to the others, instead of read by every DP rank (as Megatron-LM's
    --ckpt-fully-parallel-load). Why: otherwise every DP rank reads the whole checkpoint (130 GiB
    for the 8B model); a shared file system's bandwidth is split, a broadcast over NVLink is not."""
    group = _parallel_io_group(fully_parallel)
    return FullyParallelLoadStrategyWrapper(base, group) if group is not None else base


def check_save_dir(save: str, resume_root: Optional[Path]) -> None:
    """--save must be empty or new, or the directory this run resumes from (never lose a run)."""
    path = Path(save)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"checkpoint directory {path} is a file; refusing to overwrite")
    if resume_root is not None and path.resolve() == resume_root.resolve():
        return
    if any(path.iterdir()):
        latest = read_tracker(path)
        hint = (f" (it holds checkpoints up to step {latest}: resume with --load {path}, or choose "
                f"another --save)" if latest is not None else "")
        raise FileExistsError(f"checkpoint directory {path} is not empty; refusing to overwrite{hint}")


def write_tracker(root: Path, iteration: int) -> None:
    tmp = root / f".{TRACKER}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER)


def _prune(root: Path, keep_last: Optional[int], keep: int) -> None:
    """Delete what earlier crashed saves left (``*.partial``, never tracked) and complete
    checkpoints older than the newest ``keep_last`` (never ``keep``)."""
    for stale in root.glob("iter_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if not keep_last:
        return
    done = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    for it in done[:-keep_last]:
        if it != keep:
            shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def verify_integrity(target: Path) -> None:
    """Check the checkpoint's files against its SHA-256 manifest, when it has one (collective
    under torch.distributed); a damaged or missing file is one CheckpointError naming it."""
    if (target / MANIFEST).is_file():
        try:
            verify_manifest(target)
        except IntegrityError as err:
            raise CheckpointError(f"checkpoint {err}") from err


def load(state: TrainingState, target: Path, common: dict) -> Loaded:
    """Restore, in place, the model and, for a training checkpoint, the optimizer, LR schedule and
    (same layout only) RNG states of ``state``; returns the progress to continue from (iteration
    0: weights only) and the bytes read."""
    full = common.get("iteration", 0) > 0 and common.get("scheduler") is not None
    same_layout = common.get("layout") == _layout()
    sd = _state_dict(state, is_loading=True, with_optimizer=full, with_rng=full and same_layout)
    verify_integrity(target)
    reader = _CountingLoadStrategy()
    strategy = load_strategy(reader, state.cfg.train.fully_parallel_load)
    try:  # RETURN_UNEXPECTED: what this model asks for and the checkpoint lacks comes back listed
        loaded, _, lacking = dist_checkpointing.load(sd, str(target), strategy,
                                                    strict=StrictHandling.RETURN_UNEXPECTED)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint must not end in a traceback
        raise CheckpointError(f"cannot load checkpoint {target}: {_first_line(err)}") from err
    # Linear layers' ``_extra_state`` (FP8 metadata, None here) is not a weight: a converted
    # checkpoint does not carry it. Anything else missing is an error, never a silent init.
    lacking = sorted(k for k in lacking if "_extra_state" not in k)
    if lacking:
        raise CheckpointError(f"checkpoint {target} lacks {len(lacking)} tensors this run needs "
                              f"(e.g. {', '.join(lacking[:3])})")
    result = state.model.load_state_dict(loaded["model"], strict=False)
    unset = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if unset or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {target} does not fit this model: missing {unset[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")
    if not full:
        return Loaded({"iteration": 0, "consumed_samples": 0}, reader.bytes_read)
    # the saved param groups replace the owner's: it chooses its Adam implementation again
    state.optimizer.load_state_dict(_split_optimizer_state(state.optimizer, loaded["optimizer"]))
    state.scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    return Loaded({"iteration": common["iteration"], "consumed_samples": common["consumed_samples"]},
                  reader.bytes_read)
