# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Named model presets. Each derives from a base with ``replace``; nothing is copied.

``tiny`` trains on the embedded corpus on 2 CPU cores in minutes. The paper sizes (Berges et al.
2025, authors' answers) come as ``<size>-memory`` (Memory+ in three layers, 2**20 values) and
``<size>-dense`` (no memory layer). Memory layers sit where Meta's released configs put them,
4/12/20, in every preset of 21+ layers (its 373M has 24 layers, its 7B/8B 32): deeper memory layers
lose their keys faster (in every key-usage run of the study), and the even spacing would give
5/16/26 at 32 layers. The 12-layer 134M keeps the even spacing (2/6/10).
"""
from __future__ import annotations

import copy

from megatron_memory.config import (
    MemoryConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    replace,
)

TINY = RunConfig(
    model=ModelConfig(num_layers=6, hidden_size=128, num_attention_heads=4, seq_length=128),
    memory=MemoryConfig(n_keys=64, heads=4, k=8, k_dim=64),
    train=TrainConfig(steps=300, micro_batch_size=8, lr=3e-3, min_lr=3e-4),
)

# Paper scale: 2**20 values, 4 heads x top-32, k_dim 512; sequence 2048; AdamW lr 3e-4 (1e-4 at 8B).
_PAPER = RunConfig(
    model=ModelConfig(seq_length=2048),
    memory=MemoryConfig(n_keys=1024, heads=4, k=32, k_dim=512),
    train=TrainConfig(lr=3e-4, min_lr=3e-5, warmup_steps=2000, steps=100000, micro_batch_size=1,
                      log_interval=10),
)

META_LAYERS = (4, 12, 20)  # Meta's placement (373M: 24 layers, 7B: 32 layers)

_SIZES = {  # name: (hidden, layers, heads, lr)
    "134m": (768, 12, 12, 3e-4),
    "373m": (1024, 24, 16, 3e-4),
    "720m": (1536, 22, 12, 3e-4),
    "1.3b": (2048, 22, 16, 3e-4),
    "8b": (4096, 32, 32, 1e-4),
}


# Grouped-query attention: the 8B models of the paper's era (Llama-3-8B: 32 heads, 8 key/value
# groups) use 8 groups; the smaller sizes keep multi-head attention.
_QUERY_GROUPS = {"8b": 8}


def _paper(hidden: int, layers: int, heads: int, lr: float, memory: bool,
           groups=None) -> RunConfig:
    cfg = replace(_PAPER, **{"model.hidden_size": hidden, "model.num_layers": layers,
                             "model.num_attention_heads": heads, "model.num_query_groups": groups,
                             "train.lr": lr, "train.min_lr": lr / 10,
                             "memory.layers": list(META_LAYERS) if layers > META_LAYERS[-1] else None})
    return cfg if memory else replace(cfg, **{"memory.layers": []})


PRESETS: dict[str, RunConfig] = {"tiny": TINY, "tiny-dense": replace(TINY, **{"memory.layers": []})}
for _name, _dims in _SIZES.items():
    PRESETS[f"{_name}-memory"] = _paper(*_dims, memory=True, groups=_QUERY_GROUPS.get(_name))
    PRESETS[f"{_name}-dense"] = _paper(*_dims, memory=False, groups=_QUERY_GROUPS.get(_name))


def get_preset(name: str) -> RunConfig:
    """A fresh copy of preset ``name``; unknown names raise one error listing the choices."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
