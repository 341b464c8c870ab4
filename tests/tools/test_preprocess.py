# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""tools/preprocess_data.py: jsonl -> .bin/.idx that Megatron's IndexedDataset reads back."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_memory.data import Tokenizer, default_corpus, train_bpe_tokenizer
from megatron_memory.tools.preprocess_data import main


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe_tokenizer(default_corpus(num_people=50, num_docs=300), path, vocab_size=300)
    return path


def test_roundtrip_through_megatron_indexed_dataset(tmp_path, tokenizer_file):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["Elgar works as a baker in Ithgar.", "The favourite colour of Olnu is red.", "x"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tokenizer_file),
                 "--output-prefix", str(tmp_path / "out")]) == 0
    ds = IndexedDataset(str(tmp_path / "out"))
    tok = Tokenizer(tokenizer_file)
    assert len(ds) == len(docs)
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], np.array(tok.tokenize(d) + [tok.eod]))
    assert tok.detokenize(tok.tokenize(docs[0])) == docs[0]


def test_bad_inputs_are_clear_errors(tmp_path, tokenizer_file, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    out = str(tmp_path / "bad")
    assert main(["--input", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tokenizer_file),
                 "--output-prefix", out]) == 2
    assert "bad.jsonl:2: expected a JSON object with a 'text' string" in capsys.readouterr().err
    assert not (tmp_path / "bad.bin").exists()
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tokenizer_file),
                 "--output-prefix", out]) == 2
    assert main(["--input", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tmp_path),
                 "--output-prefix", out]) == 2
    assert "no tokenizer at" in capsys.readouterr().err


def test_refuses_to_overwrite(tmp_path, tokenizer_file, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    args = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tokenizer_file),
            "--output-prefix", str(tmp_path / "o")]
    assert main(args) == 0
    before = (tmp_path / "o.bin").read_bytes()
    assert main(args) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "o.bin").read_bytes() == before
    assert main(args + ["--force"]) == 0
