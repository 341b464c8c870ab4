# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The lines of a JSONL input file as text, whatever wrote it: plain or compressed, with or
without a byte-order mark. Standard library only: the data tools load no torch for this."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
from typing import Iterator

# How each compressed format a corpus commonly comes in begins, and how to open it (None: not in
# the standard library, so the file is refused with a message that says what it is).
_COMPRESSED = (
    (b"\x1f\x8b", "gzip", gzip.open),
    (b"BZh", "bzip2", bz2.open),
    (b"\xfd7zXZ\x00", "xz", lzma.open),
    (b"\x28\xb5\x2f\xfd", "zstd", None),
)
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, as some Windows tools write at the start


def _format(path: str | os.PathLike):
    """(name, opener) of the compression ``path`` is in, told by its first bytes (not its name:
    a .jsonl may be compressed and a .gz may not); ("plain", open) for none."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, name, opener in _COMPRESSED:
        if head.startswith(magic):
            if opener is None:
                raise ValueError(f"{path}: compressed with {name}, which this reader cannot open; "
                                 f"decompress it first ({name} -d)")
            return name, opener
    return "plain", open


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, decompressed if it is gzip, bzip2 or xz, and
    without a leading byte-order mark. Raises ValueError naming ``path:line`` for bytes that are
    not UTF-8, and ``path`` for compressed data that is cut short or damaged."""
    name, opener = _format(path)
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}:{n}: not valid UTF-8") from None
                yield n, line
    except (EOFError, OSError, lzma.LZMAError) as err:
        if name == "plain":
            raise
        raise ValueError(f"{path}: {name} data damaged or cut short after line {n} ({err})") from None
