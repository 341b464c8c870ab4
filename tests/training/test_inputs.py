# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Bad input to ``python -m megatron_memory.train``: one line naming the file / line / field,
exit code 2, before any model is built; Megatron-LM flag names; --help and --print-config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_memory.cli import config_from_args
from megatron_memory.config import ConfigError, replace
from megatron_memory.training.data import default_corpus, train_bpe_tokenizer
from megatron_memory.training.preflight import check_inputs
from megatron_memory.tools.preprocess_data import main as preprocess
from megatron_memory.train import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--num-layers", "4", "--hidden-size", "64", "--seq-length", "32", "--memory-layers", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two tokenizers (vocab 300 and 600) and the same documents tokenised with each."""
    d = tmp_path_factory.mktemp("corpus")
    docs = default_corpus(num_people=40, num_docs=200)
    (d / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    for v in (300, 600):
        train_bpe_tokenizer(docs, d / f"tok{v}.json", vocab_size=v)
        assert preprocess(["--input", str(d / "in.jsonl"), "--tokenizer", str(d / f"tok{v}.json"),
                           "--output-prefix", str(d / f"data{v}")]) == 0
    return d


@pytest.fixture(autouse=True)
def nothing_written(tmp_path_factory, monkeypatch):
    """Each test runs in an empty directory that must stay empty (no runs/, no cache, no data)."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    yield
    assert list(cwd.iterdir()) == []


def run(capsys, *argv) -> str:
    """main() must fail with exit code 2 (returned, or argparse's SystemExit) and exactly one
    line on stderr; returns that line."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def data_args(d: Path, data: str = "data300", tok: str = "tok300.json") -> list[str]:
    return ["--data-path", str(d / data), "--tokenizer", str(d / tok), *TINY]


def test_vocabulary_mismatch_recorded_in_the_sidecar(corpus, capsys):
    err = run(capsys, *data_args(corpus, "data600", "tok300.json"))
    assert f"{corpus / 'data600'}: tokenized with a vocabulary of 600" in err
    assert f"data.tokenizer {corpus / 'tok300.json'} has 300" in err


def test_token_id_beyond_the_model_vocabulary(corpus, tmp_path, capsys):
    for ext in (".bin", ".idx"):  # Megatron-made data: no sidecar, the ids are read
        (tmp_path / f"d{ext}").write_bytes((corpus / f"data600{ext}").read_bytes())
    top = int(np.memmap(tmp_path / "d.bin", dtype=np.uint16, mode="r").max())
    assert top >= 384
    err = run(capsys, *data_args(tmp_path, "d", str(corpus / "tok300.json")))
    assert f"{tmp_path / 'd'}: token id {top} in the data is outside the model's vocabulary of 384" in err
    err = run(capsys, *data_args(corpus), "--vocab-size", "256")
    assert "model.vocab_size=256 is smaller than the tokenizer's 300" in err


def test_empty_truncated_and_missing_datasets(corpus, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=np.uint16).finalize(str(tmp_path / "empty.idx"))
    err = run(capsys, *data_args(tmp_path, "empty", str(corpus / "tok300.json")))
    assert f"{tmp_path / 'empty'}.bin/.idx: empty dataset (no documents)" in err
    (tmp_path / "cut.idx").write_bytes((corpus / "data300.idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes((corpus / "data300.bin").read_bytes()[:-10])
    err = run(capsys, *data_args(tmp_path, "cut", str(corpus / "tok300.json")))
    assert f"{tmp_path / 'cut.bin'}: " in err and "the pair does not match" in err
    (tmp_path / "bad.idx").write_bytes(b"not an index at all, really not one")
    (tmp_path / "bad.bin").write_bytes(b"")
    err = run(capsys, *data_args(tmp_path, "bad", str(corpus / "tok300.json")))
    assert f"{tmp_path / 'bad.idx'}: not a Megatron indexed-dataset index" in err
    err = run(capsys, *data_args(tmp_path, "nothing", str(corpus / "tok300.json")))
    assert f"data.data_path: {tmp_path / 'nothing.bin'} not found" in err


def test_tokenizer_split_blend_and_outputs(corpus, tmp_path, capsys):
    assert "data.tokenizer: no tokenizer at" in run(capsys, *data_args(corpus, tok="missing.json"))
    (tmp_path / "broken.json").write_text("{")
    assert "cannot be read" in run(capsys, *data_args(corpus, tok=str(tmp_path / "broken.json")))
    assert "data.split='9,x'" in run(capsys, *data_args(corpus), "--split", "9,x")
    assert "data.split='1,1,1,1'" in run(capsys, *data_args(corpus), "--split", "1,1,1,1")
    err = run(capsys, "--data-path", "0.5", str(corpus / "data300"), "0.5", "--tokenizer", str(corpus / "tok300.json"))
    assert "'weight prefix' pairs, got 3 items" in err
    err = run(capsys, "--data-path", "-1", str(corpus / "data300"), "--tokenizer", str(corpus / "tok300.json"))
    assert "weight > 0" in err
    (tmp_path / "tb").write_text("")
    assert "train.tensorboard_dir: " in run(capsys, *data_args(corpus), "--tensorboard-dir", str(tmp_path / "tb"))
    err = run(capsys, "--wandb-project", "p")
    assert "train.wandb_project is set but the wandb package is not installed" in err
    assert "data.tokenizer is given without data.data_path" in run(capsys, "--tokenizer", str(corpus / "tok300.json"))


def test_numbers(capsys):
    assert "train.eval_iters and train.eval_interval must be >= 0" in run(capsys, "--eval-interval", "-1")
    assert "train.global_batch_size must be >= 1" in run(capsys, "--global-batch-size", "0")
    assert "train.steps and train.micro_batch_size must be >= 1" in run(capsys, "--train-iters", "0")
    assert "train.checkpoint_write_threads must be >= 1, got 0" in run(capsys, "--checkpoint-write-threads", "0")
    assert "invalid int value: 'x'" in run(capsys, "--seq-length", "x")


def test_good_data_passes_in_seconds(corpus):
    cfg, _ = config_from_args(data_args(corpus, "data300") + ["--data-path", "2", str(corpus / "data300"),
                                                               "1", str(corpus / "data300")])
    t0 = time.time()
    check_inputs(cfg, world_size=1)
    assert time.time() - t0 < 5
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        check_inputs(replace(cfg, **{"parallel.tp": 2}), world_size=3)


def test_unknown_preset_and_misspelt_flag(capsys):
    err = run(capsys, "--preset", "huge")
    assert err.startswith("error: unknown preset 'huge'; choose one of tiny, tiny-dense")
    err = run(capsys, "--train-iter", "5")
    assert err == "error: unrecognized arguments: --train-iter 5; did you mean --train-iters? (see --help)"


def test_megatron_flag_names():
    cfg, _ = config_from_args([
        "--train-iters", "7", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4",
        "--eval-interval", "5", "--eval-iters", "3", "--tokenizer-model", "t.json", "--data-path", "d",
        "--seq-length", "64", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seed", "9", "--log-interval", "2", "--sequence-parallel", "--no-bf16",
        "--use-distributed-optimizer", "--split", "90,10,0", "--tensorboard-dir", "tb",
        "--lr-warmup-iters", "2", "--data-cache-path", "c", "--init-method-std", "0.01"])
    t, p, m, d = cfg.train, cfg.parallel, cfg.model, cfg.data
    assert (t.steps, p.tp, p.pp, t.micro_batch_size, t.global_batch_size) == (7, 2, 2, 2, 8)
    assert (t.lr, t.min_lr, t.eval_interval, t.eval_iters, t.seed, t.log_interval) == (1e-3, 1e-4, 5, 3, 9, 2)
    assert (d.tokenizer, d.data_path, d.split, d.cache_dir) == ("t.json", ["d"], "90,10,0", "c")
    assert (m.seq_length, m.num_layers, m.hidden_size, m.num_attention_heads, m.init_std) == (64, 4, 64, 4, 0.01)
    assert p.sequence_parallel and t.bf16 is False and t.distributed_optimizer and t.warmup_steps == 2
    assert t.tensorboard_dir == "tb"


def test_help_shows_the_presets_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "373m-memory", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "model width d (default: 1024)" in out and "optimizer steps (default: 100000)" in out
    assert "--steps INT, --train-iters INT" in out and "--tensor-model-parallel-size (= --tp)" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "model width d (default: 128)" in capsys.readouterr().out


def test_print_config_is_resolved_with_parameter_counts(capsys, monkeypatch):
    from megatron_memory.tools.memory_calculator import estimate

    monkeypatch.setenv("WORLD_SIZE", "8")
    argv = ["--preset", "373m-memory", "--tp", "2", "--pp", "2", "--global-batch-size", "16",
            "--micro-batch-size", "2"]
    assert main([*argv, "--print-config"]) == 0
    out = capsys.readouterr().out
    for line in ("memory.layers = [4, 12, 20]", "model.ffn_hidden_size = 2816", "train.bf16 = False",
                 "memory.v_dim = 1024", "train.global_batch_size = 16", "train.warmup_steps = 2000",
                 "train.distributed_optimizer = True", "model.vocab_size = 1024"):
        assert line in out.splitlines(), line
    assert "global 16 = micro-batch 2 x DP 2 x 4 micro-batches per step; 32,768 tokens per step" in out
    cfg, _ = config_from_args(argv)
    single = estimate(replace(cfg, **{"parallel.tp": 1, "parallel.pp": 1, "train.global_batch_size": None}), 1, 1024,
                      cuda=False)[0]
    assert single.table_params == 2**20 * 1024
    assert (f"params     total {single.dense_params + single.table_params:,}: value table "
            f"{2**20 * 1024:,} (1,048,576 x 1024), the rest {single.dense_params:,}") in out
    for s in estimate(cfg, 8, 1024, cuda=False):
        assert f"{s.dense_params + s.table_params:,} per GPU (value table shard {s.table_params:,})" in out


def test_cli_data_error_without_traceback(corpus, tmp_path):
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "megatron_memory.train", *data_args(corpus, "data600", "tok300.json")],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=120)
    assert list(tmp_path.iterdir()) == []  # no runs/ directory, nothing else
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "tokenized with a vocabulary of 600" in r.stderr
    assert time.time() - t0 < 60  # no model, no process group: imports and a header read
