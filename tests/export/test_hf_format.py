# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The exported format: name/layout mapping round trip, sharded writer and reader, config."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_memory.export import hf_format
from megatron_memory.export.standalone import MemoryGPT, ModelArgs
from tests.export.helpers import VOCAB, tiny_megatron_model, tiny_run_config


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mapping_round_trip_bit_exact(megatron_world, groups, dtype):
    # groups=2 also carries the query BatchNorm (affine and running statistics).
    cfg, model = tiny_megatron_model(groups=groups, query_norm="batchnorm" if groups == 2 else "none")
    config = hf_format.hf_config(cfg, VOCAB, num_query_groups=groups)
    meg = {k: v.to(dtype) for k, v in hf_format.megatron_model_tensors(model)}
    assert "decoder.layers.1.mlp.keys" in meg and "memory_values.weight" in meg
    assert ("decoder.layers.1.mlp.query_bn.running_var" in meg) == (groups == 2)
    hf = dict(hf_format.megatron_to_hf(meg.items(), config))
    # Every HF name is a parameter of the standalone model, with its shape, and vice versa.
    with torch.device("meta"):
        sa = MemoryGPT(ModelArgs.from_config(config))
        shapes = {n: tuple(p.shape) for n, p in [*sa.named_parameters(), *sa.named_buffers()]}
    assert {n: tuple(t.shape) for n, t in hf.items()} == shapes
    assert all(t.dtype == dtype for t in hf.values())
    # Reversed order: the inverse must gather q/k/v and gate/up whatever order they come in.
    back = dict(hf_format.hf_to_megatron(reversed(list(hf.items())), config))
    assert back.keys() == meg.keys()
    for name, t in meg.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t), name


def test_qkv_split_follows_megatron_group_interleave():
    heads, groups, hd, d = 4, 2, 3, 5
    # Rows labelled by (group, slot in group, row in head): q heads 0,1 | k | v of group 0, ...
    rows = torch.arange(groups * (heads // groups + 2) * hd, dtype=torch.float32)
    w = rows[:, None].expand(-1, d).clone()
    q, k, v = hf_format._qkv_split(w, heads, groups)
    per_group = (heads // groups + 2) * hd
    assert q[:, 0].tolist() == [g * per_group + j for g in range(groups) for j in range(2 * hd)]
    assert k[:, 0].tolist() == [g * per_group + 2 * hd + j for g in range(groups) for j in range(hd)]
    assert v[:, 0].tolist() == [g * per_group + 3 * hd + j for g in range(groups) for j in range(hd)]


def test_mapping_errors():
    config = hf_format.hf_config(tiny_run_config(), VOCAB)
    assert list(hf_format.megatron_to_hf([("decoder.layers.0.mlp.linear_fc1._extra_state/shard_0_1", None),
                                          ("common_state/shard_0_1", None)], config)) == []
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.mystery"):
        list(hf_format.megatron_to_hf([("decoder.layers.0.mlp.mystery", torch.zeros(1))], config))
    with pytest.raises(KeyError, match="model.bogus"):
        list(hf_format.hf_to_megatron([("model.bogus", torch.zeros(1))], config))
    with pytest.raises(ValueError, match="linear_qkv"):
        list(hf_format.hf_to_megatron([("model.layers.0.self_attn.q_proj.weight", torch.zeros(4, 2))], config))
    assert not hf_format.is_megatron_weight("optimizer.state.exp_avg.output_layer.weight")


def test_config_round_trip_and_checks():
    cfg = tiny_run_config()
    config = hf_format.hf_config(cfg, VOCAB, eos_token_id=0)
    assert config["memory_layers"] == [1, 3] and config["intermediate_size"] == 64
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_megatron_memory.MemoryGPTForCausalLM"
    back = hf_format.run_config_from_hf(config)
    assert back.model == cfg.model.__class__(**{**vars(cfg.model), "vocab_size": VOCAB})
    assert back.memory == cfg.memory
    with pytest.raises(ValueError, match="lacks memory_k"):
        ModelArgs.from_config({k: v for k, v in config.items() if k != "memory_k"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelArgs.from_config({**config, "num_key_value_heads": 3})


def _tensors(n=6, rows=64):
    gen = torch.Generator().manual_seed(1)
    return [(f"t{i}", torch.randn(rows, 16, generator=gen)) for i in range(n)]  # 4 KiB each


def test_single_file_below_limit(tmp_path):
    out = hf_format.write_hf_folder(tmp_path / "out", _tensors(), {"model_type": "x"})
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert {"config.json", "modeling_megatron_memory.py", "configuration_megatron_memory.py",
            "megatron_memory_standalone.py"} <= {p.name for p in out.iterdir()}
    assert [n for n, _ in hf_format.iter_hf_tensors(out)] == [f"t{i}" for i in range(6)]


def test_shards_and_index_above_limit(tmp_path):
    tensors = _tensors() + [("big", torch.randn(3000, 16))]  # one tensor above the limit
    seen = []
    out = hf_format.write_hf_folder(tmp_path / "out", tensors, {"model_type": "x"},
                                    max_shard_bytes=10_000, progress=lambda n, b: seen.append((n, b)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]  # 2+2+2 small, big
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for _, t in tensors)
    assert index["weight_map"]["big"] == "model-00004-of-00004.safetensors"
    back = dict(hf_format.iter_hf_tensors(out))
    assert back.keys() == dict(tensors).keys()
    assert all(torch.equal(back[n], t) for n, t in tensors)
    assert [n for n, _ in seen] == [n for n, _ in tensors]


def test_refuses_non_empty_dir_and_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        hf_format.write_hf_folder(tmp_path / "full", _tensors(), {})
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]

    def failing():
        yield from _tensors(3)
        raise RuntimeError("source checkpoint unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):
        hf_format.write_hf_folder(tmp_path / "out", failing(), {}, max_shard_bytes=5000)
    assert list(tmp_path.iterdir()) == [tmp_path / "full"]  # no output, no temporary folder
    with pytest.raises(ValueError, match="given twice"):
        hf_format.write_hf_folder(tmp_path / "out", _tensors(2) + _tensors(1), {})
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        hf_format.write_hf_folder(tmp_path / "out", _tensors(), {}, tokenizer_path=tmp_path / "nope")
    assert list(tmp_path.iterdir()) == [tmp_path / "full"]


def test_reader_names_missing_and_corrupt_shards(tmp_path):
    out = hf_format.write_hf_folder(tmp_path / "out", _tensors(), {}, max_shard_bytes=10_000)
    shard = out / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors"):
        list(hf_format.iter_hf_tensors(out))
    shard.write_bytes(b"\xff" * 40)
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors"):
        list(hf_format.iter_hf_tensors(out))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        list(hf_format.iter_hf_tensors(out))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        list(hf_format.iter_hf_tensors(tmp_path))
