# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""tools/preprocess_data.py: jsonl -> .bin/.idx that Megatron's IndexedDataset reads back."""
from __future__ import annotations

import gzip
import json
import lzma

import numpy as np
import pytest

from megatron_memory.training.data import Tokenizer, default_corpus, train_bpe_tokenizer
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


DOCS = ["Elgar works as a baker in Ithgar.", "The favourite colour of Olnu is red."]
PLAIN = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
BOM = b"\xef\xbb\xbf"   # as Windows Notepad and PowerShell write UTF-8


@pytest.mark.parametrize("name, data", [
    ("bom.jsonl", BOM + PLAIN),
    ("in.jsonl.gz", gzip.compress(PLAIN)),
    ("bom.jsonl.gz", gzip.compress(BOM + PLAIN)),
    ("in.jsonl.xz", lzma.compress(PLAIN)),
], ids=["bom", "gzip", "gzip-bom", "xz"])
def test_bom_and_compressed_jsonl_read_as_the_plain_file(tmp_path, tokenizer_file, name, data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_memory.tools.fact_recall import _read_jsonl

    (tmp_path / name).write_bytes(data)
    assert main(["--input", str(tmp_path / name), "--tokenizer", str(tokenizer_file),
                 "--output-prefix", str(tmp_path / "out")]) == 0
    ds, tok = IndexedDataset(str(tmp_path / "out")), Tokenizer(tokenizer_file)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(d) + [tok.eod] for d in DOCS]
    assert _read_jsonl(tmp_path / name) == [{"text": d} for d in DOCS]   # fact_recall's inputs


@pytest.mark.parametrize("data, message", [
    (b"\x28\xb5\x2f\xfd" + PLAIN, "in.jsonl.gz: compressed with zstd, which this reader cannot "
                                  "open; decompress it first (zstd -d)"),
    (gzip.compress(PLAIN * 50)[:-40], "in.jsonl.gz: gzip data damaged or cut short after line"),
], ids=["zstd", "cut-gzip"])
def test_unreadable_compressed_jsonl_is_one_line_error(tmp_path, tokenizer_file, capsys, data, message):
    (tmp_path / "in.jsonl.gz").write_bytes(data)
    assert main(["--input", str(tmp_path / "in.jsonl.gz"), "--tokenizer", str(tokenizer_file),
                 "--output-prefix", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.bin").exists()


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


def _run(tmp_path, tokenizer_file, text: str, *extra) -> int:
    (tmp_path / "in.jsonl").write_text(text)
    return main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tokenizer_file),
                 "--output-prefix", str(tmp_path / "out" / "data"), *extra])


BAD_JSONL = [
    ("", "in.jsonl: empty file, no documents to write"),
    ("\n  \n", "in.jsonl: no documents: the input has no non-empty text"),
    ('{"text": "ok"}\n["a", "list"]\n', "in.jsonl:2: expected a JSON object with a 'text' string, got list"),
    ('{"text": 5}\n', "in.jsonl:1: expected a JSON object with a 'text' string, got 'text' is int"),
    ('{"text": "ok"}\n{"text": "unterminated\n', "in.jsonl:2: not valid JSON"),
]


@pytest.mark.parametrize("text,message", BAD_JSONL, ids=["empty", "blank", "list", "int", "json"])
def test_bad_jsonl_one_line_and_nothing_written(tmp_path, tokenizer_file, capsys, text, message):
    assert _run(tmp_path, tokenizer_file, text) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no temporaries either


def test_empty_texts_without_eod_and_bad_utf8(tmp_path, tokenizer_file, capsys):
    assert _run(tmp_path, tokenizer_file, '{"text": ""}\n', "--no-eod") == 2
    assert "no documents" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tokenizer_file),
                 "--output-prefix", str(tmp_path / "o")]) == 2
    assert "in.jsonl:2: not valid UTF-8" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]
    assert not list((tmp_path / "out").iterdir())


def test_corrupt_tokenizer_and_unwritable_output(tmp_path, tokenizer_file, capsys):
    (tmp_path / "tok.json").write_text("{not json")
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n')
    assert main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--output-prefix", str(tmp_path / "o")]) == 2
    assert f"tokenizer {tmp_path / 'tok.json'} cannot be read" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tokenizer_file),
                 "--output-prefix", str(tmp_path / "file" / "o")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_sidecar_records_vocabulary_and_largest_id(tmp_path, tokenizer_file):
    docs = ["Elgar works as a baker in Ithgar.", "The favourite colour of Olnu is red."]
    assert _run(tmp_path, tokenizer_file, "".join(json.dumps({"text": d}) + "\n" for d in docs)) == 0
    rec = json.loads((tmp_path / "out" / "data.json").read_text())
    tok = Tokenizer(tokenizer_file)
    ids = [i for d in docs for i in tok.tokenize(d) + [tok.eod]]
    assert rec["vocab_size"] == 300 and rec["max_token_id"] == max(ids) and rec["tokens"] == len(ids)
    assert rec["documents"] == 2 and rec["dtype"] == "uint16"
    assert rec["bin_bytes"] == (tmp_path / "out" / "data.bin").stat().st_size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.bin", "data.idx", "data.json"]
