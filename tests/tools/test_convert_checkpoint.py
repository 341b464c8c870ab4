# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The conversion tool: a TP=2 x PP=2 Megatron checkpoint -> exported folder -> Megatron, bit-exact,
loadable for training at another layout; streaming keeps peak memory far below the model size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_memory.checkpointing import checkpoint
from megatron_memory.tools.convert_checkpoint import main, megatron_tensors
from tests.parallel import workers
from tests.parallel.dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    ckpt = tmp / "ckpt"
    cfg = workers.tiny_config(tp=2, pp=2, steps=1, save=str(ckpt))
    run_ranks(4, workers.train, cfg, str(tmp / "train.json"), tp=0)
    assert main(["to-hf", str(ckpt), str(tmp / "hf"), "--max-shard-size", "200KB"]) == 0
    assert main(["to-megatron", str(tmp / "hf"), str(tmp / "back")]) == 0
    return tmp


def test_round_trip_is_bit_exact(converted):
    src = dict(megatron_tensors(checkpoint.resolve(converted / "ckpt")))
    back = dict(megatron_tensors(checkpoint.resolve(converted / "back")))
    assert set(src) == set(back) and "memory_values.weight" in src
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_export_is_sharded_with_an_index(converted):
    hf = converted / "hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((hf / f).is_file() for f in files)
    assert "model.memory_values.weight" in index["weight_map"]
    config = json.loads((hf / "config.json").read_text())
    assert config["memory_layers"] == [1, 3] and (hf / "tokenizer.json").is_file()


def test_converted_checkpoint_trains_at_another_layout(converted):
    """Weights-only step-0 checkpoint: loads at TP=1 with the same logits as the original."""
    run_ranks(1, workers.logits, workers.tiny_config(load=str(converted / "back")),
              str(converted / "back.pt"), tp=0)
    run_ranks(1, workers.logits, workers.tiny_config(load=str(converted / "ckpt"), **{"train.finetune": True}),
              str(converted / "orig.pt"), tp=0)
    assert torch.equal(torch.load(converted / "back.pt"), torch.load(converted / "orig.pt"))


def test_bad_inputs_give_one_line(tmp_path, converted, capsys):
    assert main(["to-hf", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["to-megatron", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "not an exported model folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["to-megatron", str(converted / "hf"), str(tmp_path / "full")]) == 2
    assert "not empty; refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


def _growth_mib(args: list[str]) -> float:
    """Peak resident memory (MiB) the conversion adds over the imported tool, in a fresh
    interpreter: the kernel's high-water mark (VmHWM) is reset after the imports."""
    code = ("from megatron_memory.tools.convert_checkpoint import main\n"
            "def kib(key):\n"
            "    line = next(l for l in open('/proc/self/status') if l.startswith(key))\n"
            "    return int(line.split()[1])\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            "start = kib('VmRSS:')\n"
            f"assert main({args!r}) == 0\n"
            "print('GROWTH', kib('VmHWM:') - start)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split("GROWTH")[-1]) / 1024


def test_conversion_streams(tmp_path):
    """A 440 MB model (16 layers, d=768, fp32) converts both ways with peak memory well below its
    size over the interpreter's baseline: tensors are read, mapped and written one at a time."""
    cfg = workers.tiny_config(steps=1, **{"model.num_layers": 16, "model.hidden_size": 768,
                                          "model.num_attention_heads": 8, "memory.layers": [3]})
    run_ranks(1, workers.save_init, cfg, str(tmp_path / "ckpt"), tp=0)
    model_mib = sum(t.numel() * t.element_size() for _, t in
                    megatron_tensors(checkpoint.resolve(tmp_path / "ckpt"))) / 2**20
    assert model_mib > 400
    to_hf = _growth_mib(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--max-shard-size", "20MB"])
    to_mg = _growth_mib(["to-megatron", str(tmp_path / "hf"), str(tmp_path / "back")])
    print(f"model {model_mib:.0f} MiB; peak memory growth: to-hf {to_hf:.0f} MiB, "
          f"to-megatron {to_mg:.0f} MiB")
    assert to_hf < 0.4 * model_mib
    assert to_mg < 0.4 * model_mib


def test_old_checkpoints_export_with_the_model_they_had(converted):
    """A checkpoint from before query norms stores no ``query_norm``: it exports with none, not
    with today's default (which would promise running statistics it does not hold)."""
    from megatron_memory.config import QueryNorm

    _, common = checkpoint.peek(converted / "ckpt")
    old = {**common, "run_config": {**common["run_config"], "memory": {
        k: v for k, v in common["run_config"]["memory"].items() if k != "query_norm"}}}
    assert checkpoint.saved_run_config(old).memory.query_norm == QueryNorm.NONE
    assert checkpoint.saved_run_config(common).memory.query_norm == \
        common["run_config"]["memory"]["query_norm"]


def test_dense_model_exports_every_layer(tmp_path):
    """A model without memory layers: every layer's weights reach the export and come back."""
    ckpt = tmp_path / "ckpt"
    run_ranks(1, workers.train, workers.tiny_config(steps=1, save=str(ckpt), **{"memory.layers": []}),
              str(tmp_path / "train.json"), tp=0)
    assert main(["to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    from safetensors import safe_open  # function-local: only this test reads the export itself

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)} <= names
    assert main(["to-megatron", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    src = dict(megatron_tensors(checkpoint.resolve(ckpt)))
    back = dict(megatron_tensors(checkpoint.resolve(tmp_path / "back")))
    assert set(src) == set(back) and "decoder.layers.3.mlp.linear_fc2.weight" in src
    for name, t in src.items():
        assert torch.equal(back[name], t), name


def test_damaged_checkpoint_is_named_before_export(tmp_path, converted, capsys):
    """to-hf checks the checkpoint's SHA-256 manifest first: a changed byte is one line naming
    the file, and nothing is written; --no-verify skips the check."""
    import shutil

    src = checkpoint.resolve(converted / "ckpt")
    damaged = tmp_path / "iter_0000001"
    shutil.copytree(src, damaged)
    shard = sorted(damaged.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["to-hf", str(damaged), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{shard.name}: hash mismatch" in err[0] and str(damaged) in err[0]
    assert not (tmp_path / "hf").exists()
    assert main(["to-hf", str(damaged), str(tmp_path / "hf"), "--no-verify"]) == 0
