# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Run a test body on several gloo ranks (CPU), each with Megatron's model-parallel state."""
from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store_file: str, fn, tp: int, pp: int, args: tuple,
           threads: int = 1) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_memory.training.cpu import cpu_shims

    torch.set_num_threads(threads)  # default 1: several ranks share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        with cpu_shims():  # the body runs Megatron-Core directly, not only through the Trainer
            if tp:  # tp=0: the body initialises Megatron itself (e.g. through the Trainer)
                ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            fn(*args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, tp: int = 1, pp: int = 1, threads: int = 1) -> None:
    """Run ``fn(*args)`` on ``world`` gloo ranks with TP x PP model parallelism initialised
    (tp=0: left to ``fn``), each with ``threads`` intra-op threads; any rank's exception fails
    the call."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(_entry, args=(world, store, fn, tp, pp, args, threads), nprocs=world,
                           join=True, start_method="spawn")
