# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""One error family, caught once at each command's entry: a bad input is one line on stderr and
exit code 2 from every command; a bug keeps its traceback; start-up prints at most one line of
what is missing before the command's own output."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_memory.errors import (CheckpointError, ConfigError, InputError, IntegrityError,
                                    MegatronMemoryError, command)

ROOT = Path(__file__).resolve().parents[1]


def test_the_family():
    for cls in (ConfigError, InputError, CheckpointError, IntegrityError):
        assert issubclass(cls, MegatronMemoryError)
    assert issubclass(IntegrityError, CheckpointError)
    # the names every module has raised and caught so far are the family's
    from megatron_memory.checkpointing import checkpoint, integrity
    from megatron_memory import config
    assert (config.ConfigError, checkpoint.CheckpointError, integrity.IntegrityError) == (
        ConfigError, CheckpointError, IntegrityError)


def test_command_turns_the_family_into_one_line_and_lets_bugs_through(capsys):
    @command
    def bad_input() -> int:
        raise InputError("data.bin: not an indexed dataset\n(make one with preprocess_data)")

    @command
    def bug() -> int:
        raise ZeroDivisionError("a bug")

    assert bad_input() == 2
    assert capsys.readouterr().err == "error: data.bin: not an indexed dataset (make one with preprocess_data)\n"
    with pytest.raises(ZeroDivisionError):
        bug()


def _commands(tmp_path):
    from megatron_memory import train
    from megatron_memory.export import generate
    from megatron_memory.launch import run
    from megatron_memory.tools import (convert_checkpoint, fact_recall, memory_calculator, plot_run,
                                       preprocess_data)

    missing = str(tmp_path / "missing")
    return [
        (train.main, ["--steps", "0"]),
        (train.main, ["--data-path", missing, "--tokenizer", missing]),
        (memory_calculator.main, ["--world-size", "3", "--", "--tp", "2"]),
        (convert_checkpoint.main, ["to-hf", missing, str(tmp_path / "out")]),
        (generate.main, ["--checkpoint", missing, "--prompt", "x"]),
        (preprocess_data.main, ["--input", missing, "--tokenizer", missing, "--output-prefix", missing]),
        (plot_run.main, [missing, "--out", str(tmp_path / "png")]),
        (fact_recall.main, ["evaluate", "--checkpoint", missing, "--questions", missing]),
        (run.main, ["deepspeed", "--hostfile", missing, "--dry-run", "--", "--steps", "1"]),
    ]


def test_every_command_says_a_bad_input_in_one_line(tmp_path, capsys):
    for main, argv in _commands(tmp_path):
        assert main(argv) == 2, (main.__module__, argv)
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (main.__module__, captured.err)
        assert not list(tmp_path.iterdir()), "nothing is written before the error"


def test_start_up_prints_at_most_one_line_before_the_command(tmp_path):
    """A real process (warnings and logging as a user gets them): a config error is the only
    line; a one-step run prints at most one 'note:' line on stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-m", "megatron_memory.train", "--steps", "0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["error: train.steps and train.micro_batch_size must be >= 1"]
    ok = subprocess.run([sys.executable, "-m", "megatron_memory.train", "--steps", "1", "--eval-iters",
                         "0", "--tensorboard-dir", ""], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    noise = ok.stderr.splitlines()
    assert len(noise) <= 1 and all(line.startswith("note: ") for line in noise), ok.stderr
