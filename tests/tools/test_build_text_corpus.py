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

    from megatron_memory.training.data import Tokenizer

    arch = _sdist(tmp_path / "pkg-1.0.tar.gz", {
        "docs/b.txt": PROSE * 20, "docs/a.rst": "Second document. " * 200,
        "docs/img.png": "not prose", "src/code.py": "print('not prose')", "README.md": "top level"})
    src = btc.Source("pkg", "1.0", btc.sha256(arch), ("docs/",))
    manifest = btc.build([(arch, src)], tmp_path / "out", vocab_size=400)
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


def _deb(path, files: dict[str, bytes]):
    """A minimal .deb: an ar archive of debian-binary, control.tar.gz and data.tar.xz."""
    def tar_bytes(entries: dict[str, bytes], mode: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tar:
            for name, data in sorted(entries.items()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    members = [("debian-binary", b"2.0\n"),
               ("control.tar.gz", tar_bytes({"./control": b"Package: x\n"}, "w:gz")),
               ("data.tar.xz", tar_bytes({f"./{k}": v for k, v in files.items()}, "w:xz"))]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


POD = """=head1 NAME

perlfoo - B<Bold> claims about C<code>

=over 4

=item Why

Because L<perlbar> says so.

=back

=cut
"""

HTML = """<html><head><title>Not text</title><style>p {}</style></head><body>
<h1>Chapter&nbsp;1</h1><p>First paragraph.</p><script>var x;</script>
<table><tr><td>name</td><td>purpose</td></tr></table></body></html>"""


def test_debian_package_prose_by_markup(tmp_path):
    import gzip

    deb = _deb(tmp_path / "docs_1.0_all.deb", {
        "usr/share/doc/x/Documentation/a.rst.gz": gzip.compress(PROSE.encode()),
        "usr/share/doc/x/Documentation/translations/it.rst.gz": gzip.compress(b"Testo italiano."),
        "usr/share/doc/x/Documentation/b.yaml.gz": gzip.compress(b"key: not prose"),
        "usr/share/doc/x/Documentation/perlfoo.pod": POD.encode(),
        "usr/share/doc/x/Documentation/page.html": HTML.encode(),
        "usr/bin/tool": b"\x7fELF"})
    base = dict(name="docs", version="1.0", sha256=btc.sha256(deb), pool="pool/main/d/docs/docs_1.0_all.deb",
                prefix="usr/share/doc/x/Documentation/")
    rst = btc.DebSource(**base, suffixes=(".rst",), skip=("translations/",))
    assert [(n, t) for n, t in rst.prose(deb)] == [
        ("usr/share/doc/x/Documentation/a.rst.gz", btc.clean(PROSE))]
    ((_, pod),) = btc.DebSource(**base, suffixes=(".pod",), markup="pod").prose(deb)
    assert pod == "NAME\n\nperlfoo - Bold claims about code\n\nWhy\n\nBecause perlbar says so."
    ((_, page),) = btc.DebSource(**base, suffixes=(".html",), markup="html").prose(deb)
    assert page.splitlines() == ["Chapter 1", "", "First paragraph.", "", "name purpose"]
    manifest = btc.build([(deb, rst)], tmp_path / "out", vocab_size=300)
    assert manifest["documents"] == 1 and manifest["sources"][deb.name]["sha256"] == base["sha256"]


def test_debian_download_is_hash_checked_and_damage_is_named(tmp_path):
    src = btc.DEBIAN_SOURCES[0]
    (tmp_path / src.filename).write_bytes(b"!<arch>\nnot the pinned package")
    with pytest.raises(RuntimeError, match="not the pinned"):
        src.fetch(tmp_path)
    (tmp_path / "bad.deb").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(RuntimeError, match="not a Debian package"):
        btc.deb_data(tmp_path / "bad.deb")
    (tmp_path / "empty.deb").write_bytes(b"!<arch>\n")
    with pytest.raises(RuntimeError, match="no data.tar member"):
        btc.deb_data(tmp_path / "empty.deb")
    (tmp_path / "torn.deb").write_bytes(b"!<arch>\n" + b"debian-binary".ljust(48) + b"garbage!!!`\n")
    with pytest.raises(RuntimeError, match="damaged ar header at byte 8"):
        btc.deb_data(tmp_path / "torn.deb")
