# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""``train.deterministic``: bit-reproducible GPU training, as Megatron-LM's --deterministic-mode.

The semantics follow megatron-core 0.19.2's ``megatron/training/determinism.py``: cuBLAS, NCCL
and Transformer Engine read their settings from the environment when they first start, so the
settings are checked and filled in before any process group or kernel exists; then
``torch.use_deterministic_algorithms(True)`` makes torch pick its deterministic kernels (SDPA's
flash and memory-efficient backward, scatter_add_, index_add_, embedding backward) or raise
where it has none. Our own kernels need nothing more: the lookup's table gradient takes the
segment backward whenever that flag is on (kernels/triton_embedding_bag.py ``_strategy``).

This module imports nothing of the package and no torch at import time: ``config`` validates
the environment with it before torch loads (and turns its ValueError into a ConfigError).
"""
from __future__ import annotations

import os
from typing import Mapping, MutableMapping

# What each variable gets when the user left it unset.
ENV_DEFAULTS = {
    # Ring reduces in a fixed order; NCCL's own choice (Tree, NVLS in-switch reduction) may vary
    # with message size, topology and run.
    "NCCL_ALGO": "Ring",
    # TE's fused attention otherwise may take its faster atomic-accumulating backward.
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
    # cuBLAS splits work over its workspace per stream; a fixed workspace fixes the split.
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
# NCCL_ALGO is a comma-separated list; each entry must be one of these. Tree is left out, as
# Megatron does: its reduction order depends on the topology NCCL finds.
NCCL_ALGOS = ("Ring", "CollnetDirect", "CollnetChain", "^NVLS")
# The other variables: the values NVIDIA documents as deterministic.
ENV_ACCEPTED = {
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": ("0",),
    "CUBLAS_WORKSPACE_CONFIG": (":4096:8", ":16:8"),
}


def check_env(env: Mapping[str, str] = os.environ) -> None:
    """One ValueError for the first variable set to a value that is not deterministic."""
    algo = env.get("NCCL_ALGO")
    if algo is not None:
        entries = [a.strip() for a in algo.split(",") if a.strip()]
        if not entries or any(a not in NCCL_ALGOS for a in entries):
            raise ValueError(f"train.deterministic: NCCL_ALGO={algo!r} may reduce in a varying "
                             f"order; unset it (Ring is used) or choose from {', '.join(NCCL_ALGOS)}")
    for name, accepted in ENV_ACCEPTED.items():
        value = env.get(name)
        if value is not None and value not in accepted:
            raise ValueError(f"train.deterministic: {name}={value!r} is not deterministic; "
                             f"unset it or set {' or '.join(accepted)}")


def enable(env: MutableMapping[str, str] = os.environ) -> None:
    """Check and fill in the environment, then switch torch to deterministic algorithms. Call
    before the process group and the first CUDA kernel: the libraries read it when they start."""
    check_env(env)
    for name, value in ENV_DEFAULTS.items():
        env.setdefault(name, value)
    import torch  # lazy: see the module docstring

    torch.use_deterministic_algorithms(True)
