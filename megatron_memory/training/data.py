# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Training data: Megatron-Core indexed datasets (.bin/.idx) read through GPTDataset.

The embedded default needs no download: a deterministic synthetic corpus of made-up people and
their facts (the kind of association a memory layer stores), a BPE tokenizer trained on it with
Hugging Face ``tokenizers``, and the same jsonl -> .bin/.idx preprocessing users run on their
own data (``tools/preprocess_data.py``).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.datasets.utils import get_blend_from_list
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from megatron_memory import SOURCE_ROOT
from megatron_memory.training.jsonl_input import text_lines

EOD, PAD = "<|endoftext|>", "<pad>"


def default_data_dir() -> Path:
    """Where the embedded dataset is written: $MEGATRON_MEMORY_DATA if set; else data/default in
    a source checkout (as always); else, installed from a wheel, the user's cache directory
    (never inside site-packages)."""
    if os.environ.get("MEGATRON_MEMORY_DATA"):
        return Path(os.environ["MEGATRON_MEMORY_DATA"])
    if SOURCE_ROOT is not None:
        return SOURCE_ROOT / "data" / "default"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "megatron_memory" / "default"


DEFAULT_DATA_DIR = default_data_dir()
_SYLLABLES = ("ka ri to mo zel an vi dor el sa qu im bra nu fen ol tys gar lo mi es hal ur "
              "pen dra vos ith ce mar").split()
_TEMPLATES = (
    "{n} was born in {city} in {year}.",
    "{n} works as a {job} in {city}.",
    "The favourite colour of {n} is {colour}.",
    "{n} keeps a {animal} called {pet}.",
    "Ask anyone in {city}: {n} is the best {job} there.",
    "In {year}, {n} moved to {city}.",
    "{n}'s {animal} is named {pet}.",
)
_JOBS = "baker smith weaver pilot doctor painter farmer sailor teacher miner judge poet".split()
_COLOURS = "red blue green amber violet white black ochre teal silver".split()
_ANIMALS = "cat dog hawk horse goat parrot fox".split()


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def default_corpus(num_people: int = 600, num_docs: int = 12000, seed: int = 7) -> list[str]:
    """Deterministic documents: each a few shuffled facts about one made-up person."""
    rng = random.Random(seed)
    cities = [_word(rng, 2) for _ in range(40)]
    people = []
    for _ in range(num_people):
        people.append(dict(n=f"{_word(rng, 2)} {_word(rng, 3)}", city=rng.choice(cities),
                           year=rng.randint(1700, 1999), job=rng.choice(_JOBS),
                           colour=rng.choice(_COLOURS), animal=rng.choice(_ANIMALS),
                           pet=_word(rng, 2)))
    docs = []
    for _ in range(num_docs):
        p = rng.choice(people)
        facts = rng.sample(_TEMPLATES, rng.randint(2, 4))
        docs.append(" ".join(t.format(**p) for t in facts))
    return docs


class Tokenizer:
    """A Hugging Face ``tokenizers`` tokenizer with the fields Megatron's datasets read."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {path} (expected a tokenizer.json file or a "
                                    f"directory holding one)")
        try:
            self.hf = HFTokenizer.from_file(str(file))
        except Exception as err:  # the library raises a bare Exception for a corrupt file
            raise ValueError(f"tokenizer {file} cannot be read: {str(err).splitlines()[0]}") from None
        # Megatron hashes this into its dataset cache names.
        self.unique_identifiers = {"class": "HFTokenizer", "path": str(file.resolve())}
        self.eod = self._special(EOD, ("</s>", "<|end_of_text|>", "<eos>"))
        pad = self.hf.token_to_id(PAD)
        self.pad = pad if pad is not None else -1  # no pad token: nothing is masked as padding

    def _special(self, name: str, alternatives: Iterable[str]) -> int:
        for tok in (name, *alternatives):
            tid = self.hf.token_to_id(tok)
            if tid is not None:
                return tid
        raise ValueError(f"tokenizer {self.unique_identifiers['path']} has no end-of-document token "
                         f"({name} or one of {alternatives})")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def special_tokens_dict(self) -> dict:
        return {"eod_token": self.eod, "pad_token": self.pad}

    def tokenize(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def detokenize(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


def train_bpe_tokenizer(texts: list[str], out_file: Path, vocab_size: int = 1024) -> None:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_file))


def write_indexed_dataset(texts: Iterable[str], tokenizer: Tokenizer, prefix: str | os.PathLike,
                          append_eod: bool = True) -> int:
    """Tokenise each text as one document into ``prefix``.bin/.idx (+ the ``.json`` sidecar);
    returns the token count.

    Everything is written under temporary names and renamed only when complete, so an error (a bad
    jsonl line, an empty input) leaves no half-written dataset behind. Raises ValueError when no
    document has a token.
    """
    prefix = Path(prefix)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    finals = [Path(f"{prefix}{ext}") for ext in (".bin", ".idx", ".json")]
    temps = [Path(f"{tmp}{ext}") for ext in (".bin", ".idx", ".json")]
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    builder = IndexedDatasetBuilder(str(temps[0]), dtype=dtype)
    total = docs = max_id = 0
    try:
        for text in texts:
            ids = tokenizer.tokenize(text) + ([tokenizer.eod] if append_eod else [])
            if not ids:
                continue
            builder.add_document(ids, [len(ids)])
            total, docs, max_id = total + len(ids), docs + 1, max(max_id, max(ids))
        builder.finalize(str(temps[1]))
        if docs == 0:
            raise ValueError("no documents: the input has no non-empty text")
        temps[2].write_text(json.dumps({
            "tokenizer": tokenizer.unique_identifiers["path"], "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod, "max_token_id": max_id, "documents": docs, "tokens": total,
            "dtype": np.dtype(dtype).name, "bin_bytes": temps[0].stat().st_size}, indent=1) + "\n")
        for t, f in zip(temps, finals):
            os.replace(t, f)
    finally:  # on success nothing is left; on error the temporaries go
        if not builder.data_file.closed:  # an error before finalize left it open
            builder.data_file.close()
        for t in temps:
            t.unlink(missing_ok=True)
    return total


def read_jsonl(path: str | os.PathLike, key: str = "text") -> Iterator[str]:
    """The ``key`` string of each line's JSON object; blank lines are skipped; gzip, bzip2 and xz
    files and a leading byte-order mark are read too (``jsonl_input.text_lines``). Raises
    ValueError naming ``path:line`` for a line that is not a JSON object with a string under
    ``key``."""
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
            got = type(obj).__name__ if not isinstance(obj, dict) else (
                f"no '{key}' field" if key not in obj else f"'{key}' is {type(obj[key]).__name__}")
            raise ValueError(f"{path}:{n}: expected a JSON object with a '{key}' string, got {got}")
        yield obj[key]


def ensure_default_data(data_dir: Path = DEFAULT_DATA_DIR) -> tuple[str, str]:
    """Build the embedded dataset once; returns (indexed-dataset prefix, tokenizer path)."""
    data_dir = Path(data_dir)
    prefix, tok_file = data_dir / "facts_text_document", data_dir / "tokenizer.json"
    if not (Path(f"{prefix}.idx").exists() and tok_file.exists()):
        data_dir.mkdir(parents=True, exist_ok=True)
        docs = default_corpus()
        train_bpe_tokenizer(docs, tok_file)
        write_indexed_dataset(docs, Tokenizer(tok_file), prefix)
    return str(prefix), str(tok_file)


def build_gpt_datasets(prefixes: list[str], tokenizer: Tokenizer, seq_length: int, seed: int,
                       split: str, num_samples: tuple[int, int], cache_dir: Optional[str]):
    """Megatron GPTDataset train/valid splits of the blend; every rank builds its own view."""
    for p in prefixes:
        if _is_number(p):
            continue
        if not (Path(f"{p}.bin").exists() and Path(f"{p}.idx").exists()):
            raise FileNotFoundError(f"indexed dataset {p}.bin/.idx not found "
                                    f"(make one with tools/preprocess_data.py)")
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(prefixes),
        split=split, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True,
        path_to_cache=cache_dir or str(Path(prefixes[-1]).parent / "cache"))
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples[0], num_samples[1], 0], lambda: True, cfg).build()
    return train, valid


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class MicroBatches:
    """Deterministic micro-batches for one data-parallel rank.

    Step s, micro-batch m takes samples [(s*M + m)*DP + r] * mbs ... of the dataset (M micro-
    batches per step, DP ranks, this rank r): the global batch of a step is the same whatever DP.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_size: int, dp_rank: int):
        self.ds, self.mbs, self.dp, self.rank = dataset, micro_batch_size, dp_size, dp_rank
        self.cursor = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = (self.cursor * self.dp + self.rank) * self.mbs
        self.cursor += 1
        samples = [self.ds[(start + i) % len(self.ds)] for i in range(self.mbs)]
        return {k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                for k in ("tokens", "labels", "loss_mask", "position_ids")}
