# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""jsonl -> Megatron indexed dataset (.bin/.idx), tokenised with a local Hugging Face tokenizer.

    python -m megatron_memory.tools.preprocess_data --input corpus.jsonl --tokenizer path/to/tokenizer.json \\
        --output-prefix data/corpus_text_document [--json-key text] [--no-eod]

Each line is a JSON object; its ``--json-key`` string is one document, followed by the
tokenizer's end-of-document token. Train with ``--data-path data/corpus_text_document
--tokenizer path/to/tokenizer.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_memory.data import Tokenizer, read_jsonl, write_indexed_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_memory.tools.preprocess_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="jsonl file, one document per line")
    ap.add_argument("--tokenizer", required=True,
                    help="local tokenizer.json, or a directory holding one (no downloads)")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--json-key", default="text", help="field of each JSON object to tokenise")
    ap.add_argument("--no-eod", action="store_true", help="do not append end-of-document tokens")
    ap.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.bin/.idx")
    args = ap.parse_args(argv)

    inp, out = Path(args.input), Path(args.output_prefix)
    if not inp.is_file():
        print(f"error: input {inp} not found", file=sys.stderr)
        return 2
    existing = [p for p in (Path(f"{out}.bin"), Path(f"{out}.idx")) if p.exists()]
    if existing and not args.force:
        print(f"error: {existing[0]} exists; pass --force to overwrite", file=sys.stderr)
        return 2
    try:
        tok = Tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        n = write_indexed_dataset(read_jsonl(inp, args.json_key), tok, out, append_eod=not args.no_eod)
    except ValueError as err:
        for p in (Path(f"{out}.bin"), Path(f"{out}.idx")):
            p.unlink(missing_ok=True)  # no half-written dataset left behind
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}.bin/.idx: {n:,} tokens in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
