# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Convert between a Megatron checkpoint (any TP/PP) and the exported Hugging-Face-style folder.

    python -m megatron_memory.tools.convert_checkpoint to-hf CKPT OUT [--tokenizer PATH]
    python -m megatron_memory.tools.convert_checkpoint to-megatron HF_DIR OUT

to-hf: CKPT is a training --save directory (its latest step) or one iter_* directory, saved at any
TP/PP (dist checkpoints hold global tensors). OUT gets config.json, model.safetensors (sharded with
model.safetensors.index.json above --max-shard-size), the tokenizer and the remote code that
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` and
``python -m megatron_memory.export.generate --checkpoint OUT`` load.

to-megatron: OUT becomes a --save-style directory holding a weights-only checkpoint (step 0) that
``python -m megatron_memory.train --load OUT`` loads at any TP/PP and trains from.

Both directions stream one tensor at a time (plus the parts of one fused tensor and, for to-hf, one
safetensors shard being written), so an 8B model converts on a machine with less memory than the
model; the round trip Megatron -> safetensors -> Megatron is bit-exact. Weights are read with
safetensors or torch.distributed.checkpoint only, never a bare pickle.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from safetensors import safe_open
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType
from tqdm import tqdm

from megatron_memory.checkpointing import checkpoint
from megatron_memory.training import data
from megatron_memory.export.hf_format import (
    SAFETENSORS_DTYPES,
    hf_config,
    hf_to_megatron,
    is_megatron_weight,
    load_hf_config,
    megatron_sources,
    megatron_to_hf,
    run_config_from_hf,
    write_hf_folder,
)
from megatron_memory.checkpointing.integrity import write_manifest
from megatron_memory.export.standalone import weight_files
from megatron_memory.errors import InputError, MegatronMemoryError, command

COMMON_KEY = "common_state/shard_0_1"  # where megatron-core's torch_dist format keeps common state


def _size_bytes(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    if not num or t[len(num):] not in units:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB, 500MB or 1GiB")
    return max(1, int(float(num) * units[t[len(num):]]))


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                disable=not sys.stderr.isatty() and os.environ.get("MEGATRON_MEMORY_PROGRESS") != "1")


# ---------------------------------------------------------------------------------------------
# Megatron -> HF
# ---------------------------------------------------------------------------------------------

def megatron_tensors(target: Path, on_tensor: Optional[Callable[[int], None]] = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every model weight in the dist checkpoint ``target``, each read on
    its own (torch.distributed.checkpoint reads just that tensor's bytes from the shard files)."""
    reader = dcp.FileSystemReader(str(target))
    meta = reader.read_metadata().state_dict_metadata
    for key in [k for k in meta if is_megatron_weight(k)]:
        info = meta[key]
        t = torch.empty(info.size, dtype=info.properties.dtype)
        dcp.load({key: t}, storage_reader=dcp.FileSystemReader(str(target)), no_dist=True)
        if on_tensor:
            on_tensor(t.numel() * t.element_size())
        yield key, t


def _weights_bytes(target: Path) -> tuple[int, torch.dtype]:
    meta = dcp.FileSystemReader(str(target)).read_metadata().state_dict_metadata
    weights = [v for k, v in meta.items() if is_megatron_weight(k)]
    if not weights:
        raise checkpoint.CheckpointError(f"{target} holds no model weights")
    total = sum(torch.Size(v.size).numel() * v.properties.dtype.itemsize for v in weights)
    return total, weights[0].properties.dtype


def to_hf(ckpt: str, out: str, tokenizer: Optional[str] = None, max_shard_bytes: int = 5 * 10**9,
          verify: bool = True) -> Path:
    """Export the model weights of a Megatron checkpoint into an HF-style folder."""
    target, common = checkpoint.peek(ckpt)
    if verify:
        checkpoint.verify_integrity(target)
    cfg = checkpoint.saved_run_config(common)
    vocab = common["architecture"]["model.vocab_size"]
    tok_path = tokenizer or cfg.data.tokenizer or data.ensure_default_data()[1]
    tok = data.Tokenizer(tok_path)
    total, dtype = _weights_bytes(target)
    config = hf_config(cfg, vocab, torch_dtype=str(dtype).removeprefix("torch."),
                       eos_token_id=tok.eod, pad_token_id=tok.pad if tok.pad >= 0 else None)
    with _progress(total, "to-hf") as bar:
        return write_hf_folder(out, megatron_to_hf(megatron_tensors(target, bar.update), config),
                               config, tokenizer_path=tok_path, max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------------------------
# HF -> Megatron
# ---------------------------------------------------------------------------------------------

class _HFWeights:
    """Random access to an exported folder's tensors by name (safetensors, one at a time).

    Each read opens its file anew: safetensors maps the file into memory, and a handle kept open
    for the whole conversion would keep every page read so far resident."""

    _DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

    def __init__(self, folder: Path):
        self.where: dict[str, Path] = {}
        self.metas: dict[str, torch.Tensor] = {}
        for file in weight_files(folder):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    self.where[name] = file
                    self.metas[name] = torch.empty(sl.get_shape(), dtype=self._DTYPES[sl.get_dtype()],
                                                   device="meta")

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.where[name]), framework="pt") as handle:
            return handle.get_tensor(name)


class _LazySavePlanner(DefaultSavePlanner):
    """Plans with meta tensors and fetches each tensor's data only when the writer asks for it,
    so at most one Megatron tensor (and its parts) is in memory while the checkpoint is written."""

    def __init__(self, fetch: Callable[[str], torch.Tensor]):
        super().__init__()
        self.fetch = fetch

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.fetch(write_item.index.fqn)


def to_megatron(hf_dir: str, out: str) -> Path:
    """Write the exported folder's weights as a weights-only Megatron checkpoint (step 0)."""
    folder = Path(hf_dir)
    config = load_hf_config(folder)
    cfg = run_config_from_hf(config)
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"output directory {root} is not empty; refusing to overwrite")
    weights = _HFWeights(folder)
    sources = megatron_sources(weights.where)
    metas = {key: next(hf_to_megatron([(n, weights.metas[n]) for n in parts], config))[1]
             for key, parts in sources.items()}
    common = {"format_version": checkpoint.FORMAT_VERSION, "iteration": 0, "consumed_samples": 0,
              "scheduler": None, "layout": {"tp": 1, "pp": 1, "dp": 1},
              "architecture": checkpoint.architecture(cfg, config["vocab_size"]),
              "run_config": dataclasses.asdict(cfg), "converted_from": str(folder.resolve())}
    buf = io.BytesIO()
    torch.save([common], buf)  # megatron-core keeps common state as a one-element list
    bar = _progress(sum(m.numel() * m.element_size() for m in metas.values()), "to-megatron")

    def fetch(key: str) -> torch.Tensor:
        t = next(hf_to_megatron([(n, weights.get(n)) for n in sources[key]], config))[1]
        bar.update(t.numel() * t.element_size())
        return t

    final = checkpoint.iteration_dir(root, 0)
    partial = final.with_name(final.name + ".partial")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        partial.mkdir()
        dcp.save({**metas, COMMON_KEY: buf}, no_dist=True, planner=_LazySavePlanner(fetch),
                 # a file per tensor: torch's writer keeps every tensor of a file alive until
                 # the file is closed, so one shared file would hold the whole model in memory
                 storage_writer=dcp.FileSystemWriter(str(partial), single_file_per_rank=False,
                                                     thread_count=1))
        save_config(CheckpointingConfig("torch_dist", 1), str(partial))
        write_manifest(partial)
        (partial / "run_config.json").write_text(
            json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        os.replace(partial, final)
        checkpoint.write_tracker(root, 0)
    except BaseException:  # nothing half-written stays behind
        shutil.rmtree(root if created else partial, ignore_errors=True)
        raise
    finally:
        bar.close()
    return root


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

@command
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_memory.tools.convert_checkpoint",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="direction", required=True)
    h = sub.add_parser("to-hf", help="Megatron checkpoint -> exported folder (safetensors)")
    h.add_argument("checkpoint", help="a --save directory (latest step) or one iter_* directory")
    h.add_argument("out", help="output folder (new or empty)")
    h.add_argument("--tokenizer", help="tokenizer.json to ship (default: the one the run trained with)")
    h.add_argument("--max-shard-size", type=_size_bytes, default=5 * 10**9,
                   help="split model.safetensors above this size (default 5GB)")
    h.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of the checkpoint files")
    m = sub.add_parser("to-megatron", help="exported folder -> weights-only Megatron checkpoint")
    m.add_argument("folder", help="an exported folder (config.json + model*.safetensors)")
    m.add_argument("out", help="output --save-style directory (new or empty)")
    a = ap.parse_args(argv)
    try:
        if a.direction == "to-hf":
            path = to_hf(a.checkpoint, a.out, a.tokenizer, a.max_shard_size, verify=not a.no_verify)
        else:
            path = to_megatron(a.folder, a.out)
    except MegatronMemoryError:
        raise
    except (KeyError, ValueError) as err:  # a tensor name or shape the folder lacks: its fault
        raise InputError(str(err).strip("'")) from err
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
