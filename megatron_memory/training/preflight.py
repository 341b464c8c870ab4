# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Input checks that run in seconds, before any process group or model exists.

``check_inputs(cfg, world_size, cuda)`` reads only file headers, the tokenizer and (for data without a
preprocessing sidecar) the token ids themselves: every indexed dataset of the blend, the split,
the tokenizer, the vocabulary the data was tokenised with against the model's, and the output
directories. Each problem is one ``ConfigError`` naming the file and the field; ``train.main``
and the launcher turn it into one line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_memory.config import ConfigError, Environment, RunConfig, padded_vocab, resolve

_IDX_MAGIC = b"MMIDIDX\x00\x00"
# Megatron's IndexedDataset dtype codes (megatron/core/datasets/indexed_dataset.py, DType).
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
_SCAN_CHUNK = 1 << 26  # tokens per read while looking for the largest id (256 MiB of int32)


@dataclass
class IndexInfo:
    """What a Megatron ``.idx`` header and its ``.bin`` size say about one indexed dataset."""

    prefix: str
    dtype: type
    sequences: int
    tokens: int
    recorded: Optional[dict]  # the PREFIX.json sidecar written by tools/preprocess_data.py


def read_index(prefix: str) -> IndexInfo:
    """Header, sequence lengths and sidecar of ``prefix``.bin/.idx; ConfigError if unusable."""
    bin_, idx = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for p in (bin_, idx):
        if not p.is_file():
            raise ConfigError(f"data.data_path: {p} not found (make PREFIX.bin/.idx with "
                              f"python -m megatron_memory.tools.preprocess_data)")
    with open(idx, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != _IDX_MAGIC:
            raise ConfigError(f"{idx}: not a Megatron indexed-dataset index (bad header)")
        version, code, sequences, _ = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in _IDX_DTYPES:
            raise ConfigError(f"{idx}: unsupported index (version {version}, dtype code {code})")
        lengths = np.fromfile(f, dtype=np.int32, count=sequences)
    if len(lengths) != sequences:
        raise ConfigError(f"{idx}: truncated ({len(lengths)} of {sequences} sequence lengths)")
    dtype = _IDX_DTYPES[code]
    tokens = int(lengths.sum(dtype=np.int64))
    if sequences == 0 or tokens == 0:
        raise ConfigError(f"{prefix}.bin/.idx: empty dataset (no documents); check the jsonl it was "
                          f"made from")
    if bin_.stat().st_size != tokens * np.dtype(dtype).itemsize:
        raise ConfigError(f"{bin_}: {bin_.stat().st_size} bytes, but {idx} describes {tokens} tokens of "
                          f"{np.dtype(dtype).name}; the pair does not match (re-run preprocessing)")
    side = Path(f"{prefix}.json")
    recorded = None
    if side.is_file():
        try:
            recorded = json.loads(side.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{side}: not valid JSON ({err.msg}, line {err.lineno})") from None
    return IndexInfo(str(prefix), dtype, sequences, tokens, recorded)


def largest_token_id(info: IndexInfo) -> int:
    """From the sidecar when it describes this very .bin, else by reading the tokens."""
    rec = info.recorded
    if rec and rec.get("bin_bytes") == info.tokens * np.dtype(info.dtype).itemsize and "max_token_id" in rec:
        return int(rec["max_token_id"])
    data = np.memmap(f"{info.prefix}.bin", dtype=info.dtype, mode="r")
    return max(int(data[i:i + _SCAN_CHUNK].max()) for i in range(0, len(data), _SCAN_CHUNK))


def parse_blend(paths: list[str]) -> list[tuple[float, str]]:
    """``[prefix ...]`` or ``[weight prefix weight prefix ...]`` -> [(weight, prefix)]."""
    def number(s: str) -> Optional[float]:
        try:
            return float(s)
        except ValueError:
            return None

    if number(paths[0]) is None:
        bad = [p for p in paths if number(p) is not None]
        if bad:
            raise ConfigError(f"data.data_path: {bad[0]!r} looks like a weight, but the list starts "
                              f"with a prefix; give 'weight prefix' pairs or only prefixes")
        return [(1.0, p) for p in paths]
    if len(paths) % 2:
        raise ConfigError(f"data.data_path: weighted blend needs 'weight prefix' pairs, got {len(paths)} items")
    pairs = []
    for w, p in zip(paths[::2], paths[1::2]):
        if number(w) is None or number(w) <= 0 or number(p) is not None:
            raise ConfigError(f"data.data_path: expected 'weight prefix' with weight > 0, got {w!r} {p!r}")
        pairs.append((number(w), p))
    return pairs


def parse_split(split: str) -> list[float]:
    """Megatron's 'train,valid,test' (',' or '/'), up to three non-negative numbers, sum > 0."""
    parts = split.replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data.split={split!r}: expected numbers like '98,2,0'") from None
    if len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"data.split={split!r}: expected up to three non-negative numbers "
                          f"(train,valid,test) with a positive sum")
    return values + [0.0] * (3 - len(values))


def load_tokenizer(path: str):
    # Lazy: data imports Megatron's dataset code; the other checks (and --help) need none of it.
    from megatron_memory.training.data import Tokenizer

    try:
        return Tokenizer(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.tokenizer: {err}") from None


def model_vocab(cfg: RunConfig, tokenizer_vocab: int) -> int:
    """The model's vocabulary: model.vocab_size, else the tokenizer's padded as the Trainer pads."""
    vocab = cfg.model.vocab_size or padded_vocab(tokenizer_vocab, cfg.parallel.tp)
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    return vocab


def check_vocabulary(info: IndexInfo, tokenizer, tok_path: str, vocab: int) -> None:
    """The data's recorded tokenizer against ours, and its largest id against the model's vocab."""
    rec = info.recorded or {}
    if "vocab_size" in rec and rec["vocab_size"] != tokenizer.vocab_size:
        raise ConfigError(f"{info.prefix}: tokenized with a vocabulary of {rec['vocab_size']} "
                          f"({rec.get('tokenizer', '?')}), but data.tokenizer {tok_path} has "
                          f"{tokenizer.vocab_size}; use the same tokenizer for both")
    top = largest_token_id(info)
    if top >= vocab:
        raise ConfigError(f"{info.prefix}: token id {top} in the data is outside the model's vocabulary "
                          f"of {vocab} (data.tokenizer {tok_path} has {tokenizer.vocab_size}); the data "
                          f"was tokenized with a larger vocabulary")


def check_outputs(cfg: RunConfig) -> None:
    """Directories the run writes to must be creatable; wandb must be importable if asked for."""
    t = cfg.train
    for field, value in (("train.tensorboard_dir", t.tensorboard_dir), ("data.cache_dir", cfg.data.cache_dir)):
        if not value:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{field}: {path} exists and is not a directory")
        parent = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"{field}: {parent} is not writable")
    if getattr(t, "wandb_project", None):
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.wandb_project is set but the wandb package is not installed "
                              "(pip install wandb, or drop --wandb-project)")


def check_inputs(cfg: RunConfig, world_size: int = 1, cuda: bool = False) -> None:
    """Every input of a run, before the model is built; raises one ConfigError."""
    cfg = resolve(cfg, Environment(world_size, cuda))  # the flags, as the Trainer will read them
    parse_split(cfg.data.split)
    check_outputs(cfg)
    if cfg.data.tokenizer and not cfg.data.data_path:
        raise ConfigError("data.tokenizer is given without data.data_path; the embedded corpus has "
                          "its own tokenizer (pass --data-path too)")
    if not cfg.data.data_path:
        return  # the embedded corpus: built by the project, checked by its tests
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = model_vocab(cfg, tokenizer.vocab_size)
    for _, prefix in parse_blend(list(cfg.data.data_path)):
        info = read_index(prefix)
        check_vocabulary(info, tokenizer, cfg.data.tokenizer, vocab)
        if info.tokens <= cfg.model.seq_length:
            raise ConfigError(f"{prefix}: {info.tokens} tokens, fewer than one sample of "
                              f"model.seq_length+1 = {cfg.model.seq_length + 1}")
