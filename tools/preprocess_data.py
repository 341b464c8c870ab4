# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""jsonl -> Megatron indexed dataset (.bin/.idx), tokenised with a local Hugging Face tokenizer.

    python -m megatron_memory.tools.preprocess_data --input corpus.jsonl --tokenizer path/to/tokenizer.json \\
        --output-prefix data/corpus_text_document [--json-key text] [--no-eod]

Writes PREFIX.bin, PREFIX.idx and PREFIX.json (the tokenizer's vocabulary size and the largest
token id, read by training's vocabulary check), all under temporary names renamed when complete.

Each line is a JSON object; its ``--json-key`` string is one document, followed by the
tokenizer's end-of-document token. Train with ``--data-path data/corpus_text_document
--tokenizer path/to/tokenizer.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from megatron_memory.training.data import Tokenizer, read_jsonl, write_indexed_dataset
from megatron_memory.errors import InputError, command


def _check(args, inp: Path, out: Path) -> Tokenizer:
    """Input, output and tokenizer checks before any tokenising; returns the tokenizer.
    Raises ValueError with the whole one-line message."""
    if not inp.is_file():
        raise ValueError(f"input {inp} not found")
    if inp.stat().st_size == 0:
        raise ValueError(f"{inp}: empty file, no documents to write")
    existing = [p for p in (Path(f"{out}{ext}") for ext in (".bin", ".idx", ".json")) if p.exists()]
    if existing and not args.force:
        raise ValueError(f"{existing[0]} exists; pass --force to overwrite")
    parent = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"output directory {out.parent} is not writable")
    try:
        return Tokenizer(args.tokenizer)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_memory.tools.preprocess_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="jsonl file, one document per line")
    ap.add_argument("--tokenizer", required=True,
                    help="local tokenizer.json, or a directory holding one (no downloads)")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    ap.add_argument("--json-key", default="text", help="field of each JSON object to tokenise")
    ap.add_argument("--no-eod", action="store_true", help="do not append end-of-document tokens")
    ap.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.bin/.idx/.json")
    args = ap.parse_args(argv)

    inp, out = Path(args.input), Path(args.output_prefix)
    t0 = time.time()
    try:
        tok = _check(args, inp, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        n = write_indexed_dataset(read_jsonl(inp, args.json_key), tok, out, append_eod=not args.no_eod)
    except (ValueError, OSError) as err:  # nothing half-written: the writer renames when complete
        msg = str(err)  # the writer's "no documents" is the only message without a file name
        raise InputError(f"{inp}: {msg}" if msg.startswith("no documents") else msg) from err
    print(f"wrote {out}.bin/.idx/.json: {n:,} tokens in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
