# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Bad configurations: one clear error each, before anything is built."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_memory.configs.presets import PRESETS, get_preset
from megatron_memory.cli import config_from_args
from megatron_memory.config import ConfigError, MemoryConfig, RunConfig, replace

BAD = [
    ({"memory.layers": [6]}, "out of range"),
    ({"memory.layers": [-1]}, "out of range"),
    ({"memory.layers": [1, 1]}, "duplicates"),
    ({"memory.k": 65}, "exceeds memory.n_keys"),
    ({"memory.k_dim": 63}, "must be even"),
    ({"memory.heads": 0}, "memory.heads must be >= 1"),
    ({"memory.n_keys": 50000}, "below 2\\*\\*31"),
    ({"memory.plus": False, "memory.v_dim": 64}, "must equal hidden_size"),
    ({"memory.v_dim": 127, "parallel.tp": 2, "model.num_attention_heads": 4}, "not divisible by the tensor-parallel size"),
    ({"memory.value_lr_mult": 0.0}, "value_lr_mult"),
    ({"model.hidden_size": 130}, "not divisible by model.num_attention_heads"),
    ({"model.num_layers": 7, "parallel.pp": 2}, "not divisible by parallel.pp"),
    ({"parallel.sequence_parallel": True}, "needs parallel.tp > 1"),
    ({"train.min_lr": 1.0}, "min_lr"),
    ({"train.warmup_steps": 10000}, "warmup_steps"),
    ({"train.profile_step": 10**6}, "never be taken"),
    ({"data.data_path": ["x"]}, "needs data.tokenizer"),
    ({"train.cuda_graph_memory": True, "parallel.pp": 2}, "cuda_graph_memory needs parallel.pp = 1"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_raises_one_clear_error(changes, message):
    cfg = replace(get_preset("tiny"), **changes)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_world_size_and_batch_checks():
    cfg = replace(get_preset("tiny"), **{"parallel.tp": 2})
    with pytest.raises(ConfigError, match="world size 3"):
        cfg.validate(world_size=3)
    cfg = replace(get_preset("tiny"), **{"train.global_batch_size": 12})
    with pytest.raises(ConfigError, match="global_batch_size"):
        cfg.validate(world_size=1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    get_preset(name).validate()


def test_paper_presets_match_the_paper():
    cfg = get_preset("373m-memory")
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_attention_heads) == (1024, 24, 16)
    assert cfg.memory.resolved_layers(24) == [4, 12, 20] and cfg.memory.num_values == 2**20
    assert get_preset("8b-dense").memory.resolved_layers(32) == []
    # Meta's released placement at 32 layers too (the even spacing would give 5/16/26)
    assert get_preset("8b-memory").memory.resolved_layers(32) == [4, 12, 20]
    assert get_preset("1.3b-memory").memory.resolved_layers(22) == [4, 12, 20]
    assert get_preset("134m-memory").memory.resolved_layers(12) == [2, 6, 10]
    assert get_preset("8b-memory").memory.query_norm == "batchnorm"


def test_presets_are_independent_copies():
    a = get_preset("tiny")
    a.train.steps = 1
    assert get_preset("tiny").train.steps != 1


def test_cli_overrides_preset():
    cfg, _ = config_from_args(["--memory-layers", "0", "2", "--steps", "7", "--no-memory-qk-norm"])
    assert cfg.memory.layers == [0, 2] and cfg.train.steps == 7 and cfg.memory.qk_norm is False


def test_cli_reports_bad_input_without_a_traceback():
    r = subprocess.run([sys.executable, "-m", "megatron_memory.train", "--memory-k", "1000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error: memory.k=1000 exceeds memory.n_keys=64" in r.stderr
    assert "Traceback" not in r.stderr


def test_default_config_is_valid():
    RunConfig().validate()
    MemoryConfig().validate(24, 1024)


@pytest.mark.parametrize("name, value, message", [
    ("NCCL_ALGO", "Tree", "NCCL_ALGO='Tree' may reduce in a varying order"),
    ("NCCL_ALGO", "Ring,NVLS", "NCCL_ALGO='Ring,NVLS'"),
    ("CUBLAS_WORKSPACE_CONFIG", ":0:0", "CUBLAS_WORKSPACE_CONFIG=':0:0' is not deterministic"),
    ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "1", "NVTE_ALLOW_NONDETERMINISTIC_ALGO='1'"),
])
def test_deterministic_refuses_a_nondeterministic_environment(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    replace(get_preset("tiny"), **{"train.deterministic": False}).validate()  # only asked for
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_args(["--deterministic-mode"])   # Megatron-LM's name is an alias


def test_deterministic_fills_in_megatrons_settings():
    import torch

    from megatron_memory import determinism

    env = {"NCCL_ALGO": "CollnetDirect,^NVLS"}   # a value the user chose stays
    was = torch.are_deterministic_algorithms_enabled()
    try:
        determinism.enable(env)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)
    assert env == {"NCCL_ALGO": "CollnetDirect,^NVLS", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                   "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}
    cfg, _ = config_from_args(["--deterministic"])
    assert cfg.train.deterministic and not get_preset("tiny").train.deterministic
