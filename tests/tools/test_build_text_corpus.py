# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The text-corpus builder on a small local sdist (no download): only the prose under the doc
folder, markup lines dropped, a trained tokenizer and a readable indexed dataset; hash pinning."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from megatron_memory.tools import build_text_corpus as btc

PROSE = """Models
======

.. _models:

A model is the single, definitive source of information about your data.
It contains the essential fields and behaviors of the data you are storing.

:orphan:


Generally, each model maps to a single database table.
"""


def _sdist(path, files: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"pkg-1.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_clean_drops_markup_lines_and_keeps_prose():
    out = btc.clean(PROSE)
    assert out.startswith("Models\n\nA model is the single")
    assert ".. _models" not in out and "======" not in out and ":orphan:" not in out
    assert "\n\n\n" not in out and "Generally, each model" in out


def test_build_writes_tokenizer_dataset_and_manifest(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_memory.data import Tokenizer

    arch = _sdist(tmp_path / "pkg-1.0.tar.gz", {
        "docs/b.txt": PROSE * 20, "docs/a.rst": "Second document. " * 200,
        "docs/img.png": "not prose", "src/code.py": "print('not prose')", "README.md": "top level"})
    manifest = btc.build([(arch, ("docs/",))], tmp_path / "out", vocab_size=400)
    assert manifest["documents"] == 2 and manifest["tokens"] > 100
    docs = [json.loads(line)["text"] for line in (tmp_path / "out" / "text.jsonl").read_text().splitlines()]
    assert docs[0].startswith("Second document") and docs[1].startswith("Models")   # name order
    tok = Tokenizer(tmp_path / "out" / "tokenizer.json")
    ds = IndexedDataset(str(tmp_path / "out" / "text_document"))
    assert len(ds) == 2 and tok.detokenize(list(ds[1][:-1])) == docs[1]
    assert manifest["sources"]["pkg-1.0.tar.gz"]["sha256"] == btc.sha256(arch)


def test_download_refuses_an_archive_whose_hash_differs(tmp_path):
    _sdist(tmp_path / "Django-5.1.4.tar.gz", {"docs/a.txt": "changed bytes"})
    with pytest.raises(RuntimeError, match="not the pinned"):
        btc.download(btc.SOURCES[0], tmp_path)
    assert btc.main(["--out", str(tmp_path / "o"), "--vocab-size", "10"]) == 2
