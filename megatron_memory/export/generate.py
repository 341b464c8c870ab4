# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Text generation from an exported folder with the standalone model (no Megatron, no process
group): ``python -m megatron_memory.export.generate --checkpoint DIR --prompt "..."`` (see --help).

Each prompt is printed followed by its continuation; several --prompt flags run as one batch.
Bad input gives one line on stderr and exit status 2 before the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from megatron_memory.errors import InputError, command

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_memory.export.generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Continue prompts with a Memory+ GPT exported to a Hugging-Face-style folder "
                    "(config.json, safetensors, tokenizer.json), using a KV cache.")
    p.add_argument("--checkpoint", required=True, help="exported model folder")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample within this probability mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight and activation dtype; default: as stored in the folder")
    return p


def _check(args) -> tuple[Path, dict]:
    """Everything that can be wrong before loading: returns (folder, config), raises InputError."""
    # Lazy (here and in main): --help and argument errors answer before torch loads.
    import torch

    from megatron_memory.export.standalone import ModelArgs, check_sampling, weight_files

    folder = Path(args.checkpoint)
    if not folder.is_dir():
        raise InputError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} is not an exported model folder (no config.json; convert a "
                         "Megatron checkpoint with tools/convert_checkpoint.py)")
    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"{folder} has no tokenizer.json")
    try:
        config = json.loads((folder / "config.json").read_text())
        ModelArgs.from_config(config)
        weight_files(folder)
    except (json.JSONDecodeError, ValueError, FileNotFoundError) as err:  # standalone's: plain torch
        raise InputError(f"{folder}: {err}") from err
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as err:  # standalone's own (plain torch, no megatron_memory errors)
        raise InputError(str(err)) from err
    from tokenizers import Tokenizer  # lazy: see the comment above


    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    if vocab > config["vocab_size"]:
        raise InputError(f"{folder}: tokenizer.json has {vocab} tokens, the model only "
                         f"{config['vocab_size']} (tokenizer and weights do not belong together)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device available")
    if any(not p for p in args.prompt):
        raise InputError("--prompt must not be empty")
    return folder, config


@command
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    folder, config = _check(args)
    # Lazy: see _check.
    import torch
    from tokenizers import Tokenizer

    from megatron_memory.export.standalone import MemoryGPT, generate

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = MemoryGPT.from_pretrained(folder, device=args.device, dtype=dtype)
    except (ValueError, FileNotFoundError) as err:  # a shard missing or corrupt
        raise InputError(str(err)) from err
    eos = config.get("eos_token_id")
    pad = config.get("pad_token_id", eos if eos is not None else 0)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    prompts = [tok.encode(p).ids for p in args.prompt]
    if any(not p for p in prompts):
        raise InputError("a prompt encodes to no tokens")
    outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, pad_token_id=pad,
                    generator=gen, vocab_limit=tok.get_vocab_size())
    for text, new in zip(args.prompt, outs):
        print(text + tok.decode(new), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
