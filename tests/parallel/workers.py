# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Rank bodies for the parallel tests: train a tiny Memory+ GPT through the Trainer, or load a
checkpoint and produce logits. Run them with ``dist_utils.run_ranks(..., tp=0)``."""
from __future__ import annotations

import json
from typing import Optional

import torch


def tiny_config(tp: int = 1, pp: int = 1, sp: bool = False, steps: int = 4, dp_batch: int = 4,
                save: Optional[str] = None, load: Optional[str] = None, **changes):
    from megatron_memory.configs.presets import get_preset
    from megatron_memory.config import replace

    base = {"model.num_layers": 4, "model.hidden_size": 64, "memory.layers": [1, 3],
            "parallel.tp": tp, "parallel.pp": pp, "parallel.sequence_parallel": sp,
            "train.steps": steps, "train.micro_batch_size": dp_batch, "train.tensorboard_dir": "",
            "train.eval_iters": 0, "train.save": save, "train.load": load}
    base.update(changes)
    return replace(get_preset("tiny"), **base)


def train(cfg, out_file: str) -> None:
    """Train; rank 0 writes losses and grad norms, every rank holding the table writes it."""
    import torch.distributed as dist

    from megatron_memory.training.trainer import Trainer

    from megatron_memory.training.optim import torch_adams

    trainer = Trainer(cfg, log=lambda line: None)
    hist = trainer.fit()
    read = [None] * dist.get_world_size()  # checkpoint tensor bytes each rank read at its load
    dist.all_gather_object(read, trainer.checkpoint_bytes_read)
    if dist.get_rank() == 0:
        # the Adam implementation each param group ended with, and whether each parameter has a
        # step tensor of its own (after a resume too)
        adams = torch_adams(trainer.optimizer)
        steps = [s["step"] for o in adams for s in o.state.values()]
        json.dump({"losses": hist.losses, "grad_norms": hist.grad_norms,
                   "value_grad_norms": hist.value_grad_norms,
                   "fused": [g["fused"] for o in adams for g in o.param_groups],
                   "own_steps": len({id(t) for t in steps}) == len(steps),
                   # where the LR schedule ended and the rate it set for a next step: a resume
                   # that lost the schedule's position shows here (the optimizer's own state
                   # restores the rate of the first resumed step)
                   "schedule_steps": trainer.scheduler.num_steps,
                   "next_lr": [g["lr"] for o in adams for g in o.param_groups],
                   "read_bytes": read}, open(out_file, "w"))
    values = trainer.raw_model.memory_values
    if values is not None:
        torch.save({"columns": values.columns, "weight": values.weight.detach().float().clone()},
                   f"{out_file}.values{dist.get_rank()}")
    trainer.close()


def train_then_kill_another(cfg, out_file: str, killed_cfg, killed_file: str) -> None:
    """``train`` cfg, then in the same processes ``train_then_kill`` killed_cfg, from scratch
    (a second run without a second launch)."""
    train(cfg, out_file)
    train_then_kill(killed_cfg, killed_file)


def several(jobs) -> None:
    """Run each ``(fn, *args)`` of ``jobs`` in turn on this rank: one launch (process start,
    imports, process group) serves several bodies of the same world size. Each body builds its
    own Trainer and closes it (Megatron's model-parallel state goes with it), so it runs as it
    would alone. Use with ``run_ranks(world, workers.several, jobs, tp=0)``."""
    for fn, *args in jobs:
        fn(*args)


def train_triton_lookup(cfg, out_file: str) -> None:
    """``train`` with the Triton EmbeddingBag on CPU under Triton's interpreter (the caller sets
    TRITON_INTERPRET=1 for the ranks): the table gradient goes into Megatron DDP's main_grad by
    the kernels, per lookup or deferred (train.defer_table_grad). Rank 0 adds the number of
    deferred folds that found work to the JSON."""
    from tests.kernels.test_embedding_bag import install_interpreter_shim

    install_interpreter_shim()
    from megatron_memory import kernels
    from megatron_memory.kernels import triton_embedding_bag as eb

    saved = kernels.embedding_bag, eb.DeferredTableGrad.fold
    kernels.embedding_bag = eb.triton_embedding_bag
    folds = []
    real_fold = eb.DeferredTableGrad.fold
    eb.DeferredTableGrad.fold = lambda self, p: real_fold(self, p) and (folds.append(1) or True)
    try:
        train(cfg, out_file)
    finally:  # restored: other bodies of the same launch (``several``) run as they would alone
        kernels.embedding_bag, eb.DeferredTableGrad.fold = saved
    import torch.distributed as dist

    if dist.get_rank() == 0:
        result = json.load(open(out_file))
        json.dump({**result, "folds": len(folds)}, open(out_file, "w"))


def save_init(cfg, directory: str) -> None:
    """Save the freshly initialised model: a common start for layouts whose init differs
    (Megatron draws dense weights stage by stage, so a PP=2 init differs from PP=1)."""
    from megatron_memory.training.trainer import Trainer

    trainer = Trainer(cfg, log=lambda line: None)
    trainer.save(directory)
    trainer.close()


def logits(cfg, out_file: str) -> None:
    """Logits of the first training micro-batch (full vocabulary) -> out_file (last stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_memory.training.trainer import Trainer

    from megatron.core.pipeline_parallel import get_forward_backward_func

    if cfg.train.load:  # the weights only: the first micro-batch of the data, whatever the step
        cfg.train.finetune = True
    trainer = Trainer(cfg, log=lambda line: None)
    trainer.model.eval()  # the checkpoint's logits: query BatchNorm on its running statistics
    batch = next(trainer.train_iter)
    captured = []

    def step(data_iterator, model):  # forward only, through the pipeline schedule
        out = model(batch["tokens"], batch["position_ids"], None)

        def keep(output):
            captured.append(gather_from_tensor_model_parallel_region(output))
            return output.sum() * 0, {}

        return out, keep

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]),
                                    model=[trainer.model], num_microbatches=1,
                                    seq_length=cfg.model.seq_length,
                                    micro_batch_size=cfg.train.micro_batch_size, forward_only=True)
    if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage():
        torch.save(captured[0], out_file)
    dist.barrier()
    trainer.close()


def train_then_kill(cfg, out_file: str) -> None:
    """Train until ``train.exit_interval`` (which saves), then die by SIGKILL like a preempted
    job: no clean shutdown of the process group, nothing flushed beyond what the save wrote.
    As a scheduler ends a job's whole process tree, the rank's own children go first: the
    multiprocessing manager of Megatron's checkpoint writer (filesystem_async) would otherwise
    outlive it, ~0.7 GB each, for good."""
    import multiprocessing
    import os
    import signal

    import torch.distributed as dist

    train(cfg, out_file)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    dist.barrier()  # every rank's children are gone before the first death ends the other ranks
    os.kill(os.getpid(), signal.SIGKILL)


def train_triton_all(cfg, out_file: str, search: str = "bf16") -> None:
    """``train`` with every memory-layer op on its GPU (Triton) path, on CPU under Triton's
    interpreter (the caller sets TRITON_INTERPRET=1 for the ranks): the fused query and key
    norms, the search (``search``, the config's memory.search: "bf16", with its softmax and
    gradient-scatter kernels, or "torch", the fp32 reference), the lookup. The dispatch is
    restored afterwards, so other bodies of the same launch (``several``) run as they would
    alone."""
    from megatron_memory.config import replace

    from tests.kernels.test_embedding_bag import install_interpreter_shim

    install_interpreter_shim()
    from megatron_memory import kernels

    saved = kernels.use_triton
    kernels.use_triton = lambda t: kernels.HAVE_TRITON and not kernels._FORCE_REFERENCE
    try:
        train(replace(cfg, **{"memory.search": search}), out_file)
    finally:
        kernels.use_triton = saved

