# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The parallel SHA-256 manifest: same file as megatron-core's rank-0 one, shares dealt over
ranks, every damaged file named on every rank (the Trainer's use is in test_checkpoint_cli)."""
from __future__ import annotations

import json
import os

import pytest
from megatron.core.dist_checkpointing.validation import save_integrity_manifest

from megatron_memory.checkpointing.integrity import MANIFEST, IntegrityError, verify_manifest, write_manifest
from tests.parallel.dist_utils import run_ranks


def _files(d, n=7):
    d.mkdir()
    for i in range(n):  # odd count: the ranks' shares differ in size; one file spans chunks
        (d / f"__{i}_0.distcp").write_bytes(bytes([i]) * (i * 1000 + (17 << 20 if i == 3 else 1)))
    return d


def _write_then_verify(directory: str, out: str) -> None:
    import torch.distributed as dist

    write_manifest(directory)
    verify_manifest(directory)  # intact: passes on every rank
    dist.barrier()
    if dist.get_rank() == 0:
        data = bytearray(open(f"{directory}/__3_0.distcp", "rb").read())
        data[5] ^= 1
        open(f"{directory}/__3_0.distcp", "wb").write(bytes(data))
        os.remove(f"{directory}/__6_0.distcp")
    dist.barrier()
    try:
        verify_manifest(directory)
        msg = "passed"
    except IntegrityError as err:
        msg = str(err)
    json.dump(msg, open(f"{out}.{dist.get_rank()}", "w"))


def test_parallel_manifest_is_megatrons_and_names_damage_on_every_rank(tmp_path):
    ours, theirs = _files(tmp_path / "ours"), _files(tmp_path / "theirs")
    save_integrity_manifest(str(theirs))
    write_manifest(ours)  # single process, as the conversion tool runs it
    assert json.loads((ours / MANIFEST).read_text()) == json.loads((theirs / MANIFEST).read_text())
    run_ranks(3, _write_then_verify, str(ours), str(tmp_path / "msg"), tp=0)
    msgs = [json.load(open(tmp_path / f"msg.{r}")) for r in range(3)]
    assert len(set(msgs)) == 1, msgs
    assert "2 file(s) differ" in msgs[0] and "__3_0.distcp: hash mismatch" in msgs[0]
    assert "__6_0.distcp: unreadable" in msgs[0]


def test_bad_manifest_is_one_error(tmp_path):
    d = _files(tmp_path / "d", 1)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(IntegrityError, match="integrity.json: unreadable"):
        verify_manifest(d)
