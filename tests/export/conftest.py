# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""A tiny Memory+ GPT trained 2 steps at TP=2, its TP=2 logits, and its exported folder."""
from __future__ import annotations

import pytest
import torch

from tests.export import workers as export_workers
from tests.parallel import workers
from tests.parallel.dist_utils import run_ranks


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory):
    """(exported folder, tokens [b, s], Megatron TP=2 logits [b, s, V])."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = str(tmp / "ckpt")
    run_ranks(2, workers.train, workers.tiny_config(tp=2, steps=2, save=ckpt), str(tmp / "train.json"), tp=0)
    run_ranks(2, workers.logits, workers.tiny_config(tp=2, load=ckpt), str(tmp / "tp2.pt"), tp=0)
    run_ranks(1, export_workers.export, workers.tiny_config(tp=1, load=ckpt), str(tmp / "hf"),
              str(tmp / "tokens.pt"), tp=0)
    return tmp / "hf", torch.load(tmp / "tokens.pt"), torch.load(tmp / "tp2.pt")
