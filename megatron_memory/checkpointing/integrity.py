# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""SHA-256 manifest of a checkpoint directory, written and checked by every rank at once.

megatron-core's ``integrity.json`` (``{"algorithm": "sha256", "files": {name: hex}}``) is hashed
by rank 0 alone, one file after another: for a full 8B Memory+ checkpoint (~160 GB with fp32
Adam state) that is minutes of one core per save and again per load, while the other ranks
wait. Here the sorted file list is dealt out over the ranks and, within a rank, over threads
(``hashlib`` releases the GIL while it hashes a large buffer), so the pass runs at the disk's
or page cache's speed. The file is the same format, so megatron-core's verifier reads it too.
Works without torch.distributed as a single process (the conversion tool).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from megatron_memory.errors import IntegrityError

MANIFEST = "integrity.json"
_CHUNK = 16 << 20  # large reads: one GIL release per 16 MiB hashed


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _threads(world: int) -> int:
    """Hashing threads per rank: the node's cores shared by its ranks, at most 8 each."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", min(world, os.cpu_count() or 1)))
    return max(1, min(8, (os.cpu_count() or 1) // max(local, 1)))


def _hash_share(directory: Path, names: list[str]) -> dict[str, str]:
    """This rank's share (every world-th name) of ``names`` hashed: {name: hex or error}."""
    rank, world = _world()
    mine = names[rank::world]

    def one(name: str) -> tuple[str, str]:
        try:
            return name, _sha256(directory / name)
        except OSError as err:
            return name, f"unreadable ({err.strerror or err})"

    with ThreadPoolExecutor(_threads(world)) as pool:
        return dict(pool.map(one, mine))


def _all(part: dict[str, str]) -> dict[str, str]:
    """Every rank's part merged (collective when distributed)."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def write_manifest(directory: str | os.PathLike) -> None:
    """Hash every file of ``directory`` (collective) and write ``integrity.json`` (rank 0)."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    hashes = _all(_hash_share(directory, names))
    if _world()[0] == 0:
        tmp = directory / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"algorithm": "sha256", "files": dict(sorted(hashes.items()))},
                                  indent=2))
        os.replace(tmp, directory / MANIFEST)
    if dist.is_initialized():
        dist.barrier()


def verify_manifest(directory: str | os.PathLike) -> None:
    """Check every file the manifest names (collective); raises IntegrityError naming the
    files that are missing or differ, the same on every rank."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        expected, algorithm = manifest["files"], manifest.get("algorithm", "sha256")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{directory / MANIFEST}: unreadable ({err})") from err
    if algorithm != "sha256":
        raise IntegrityError(f"{directory / MANIFEST}: algorithm {algorithm!r}, expected 'sha256'")
    got = _all(_hash_share(directory, sorted(expected)))
    bad = [f"{n}: {got[n] if got[n].startswith('unreadable') else 'hash mismatch'}"
           for n in sorted(expected) if got[n] != expected[n]]
    if bad:
        raise IntegrityError(f"{directory}: {len(bad)} file(s) differ from the SHA-256 manifest: "
                             + "; ".join(bad[:4]) + (" ..." if len(bad) > 4 else ""))
