# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Peak memory and time of the conversion tool at the 8B preset's size, on this (CPU) machine.

    python benchmarks/bench_convert.py --preset 8b-memory --work /tmp/convert8b [--append]

Writes a synthetic exported folder of the preset's exact shapes (bf16, seeded values; building an
8B Megatron model on a 24 GiB CPU is not possible), converts it to a Megatron checkpoint and back,
checks the result equals the seeded values bit for bit, and reports each direction's peak memory
growth over the imported tool (the kernel's VmHWM, reset after imports) and wall time. Needs about
twice the model's size in free disk (each copy is deleted once it is no longer needed).
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from provenance import revision  # noqa: E402 (benchmarks/ is on sys.path)

from megatron_memory.configs.presets import get_preset  # noqa: E402
from megatron_memory.export.hf_format import hf_config, write_hf_folder  # noqa: E402
from megatron_memory.export.standalone import ModelArgs  # noqa: E402

GROWTH = """
from megatron_memory.tools.convert_checkpoint import main
def kib(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])
open('/proc/self/clear_refs', 'w').write('5')
start = kib('VmRSS:')
assert main({args!r}) == 0
print('GROWTH', kib('VmHWM:') - start)
"""


def shapes(config: dict) -> dict[str, tuple]:
    """HF name -> shape for every weight of the config (the standalone model's parameters)."""
    from megatron_memory.export.standalone import MemoryGPT

    with torch.device("meta"):
        model = MemoryGPT(ModelArgs.from_config(config))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def value(name: str, shape: tuple) -> torch.Tensor:
    """Seeded by the name; a 2^20-element random block tiled, since drawing 11G normals on 2
    cores would dominate the run (a wrong offset or swapped tensor still shows)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    block = torch.empty(min(1 << 20, torch.Size(shape).numel()), dtype=torch.bfloat16)
    block.normal_(0, 0.02, generator=gen)
    out = torch.empty(torch.Size(shape).numel(), dtype=torch.bfloat16)
    for i in range(0, out.numel(), block.numel()):
        out[i:i + block.numel()] = block[:out.numel() - i]
    return out.view(shape)


def run_tool(args: list[str]) -> tuple[float, float]:
    """(peak memory growth GiB, wall seconds) of one conversion in a fresh interpreter."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", GROWTH.format(args=args)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return int(out.stdout.split("GROWTH")[-1]) / 2**20, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="8b-memory")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--work", default="/tmp/convert-bench")
    ap.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    config = hf_config(get_preset(a.preset), a.vocab_size, torch_dtype="bfloat16")
    names = shapes(config)
    gib = sum(torch.Size(s).numel() for s in names.values()) * 2 / 2**30
    largest = max(torch.Size(s).numel() for s in names.values()) * 2 / 2**30
    print(f"{a.preset}: {len(names)} tensors, {gib:.1f} GiB bf16, largest {largest:.1f} GiB", flush=True)
    t0 = time.time()
    write_hf_folder(work / "src", ((n, value(n, s)) for n, s in names.items()), config,
                    max_shard_bytes=5 * 10**9)
    synth = time.time() - t0
    to_mg, t_mg = run_tool(["to-megatron", str(work / "src"), str(work / "megatron")])
    shutil.rmtree(work / "src")
    to_hf, t_hf = run_tool(["to-hf", str(work / "megatron"), str(work / "back"), "--tokenizer",
                            str(ROOT / "data" / "default" / "tokenizer.json")])
    shutil.rmtree(work / "megatron")
    from megatron_memory.export.standalone import iter_hf_tensors

    seen = 0
    for name, t in iter_hf_tensors(work / "back"):
        assert torch.equal(t, value(name, names[name])), name
        seen += 1
    assert seen == len(names)
    shutil.rmtree(work)
    text = (f"\n## Conversion tool at {a.preset} size (CPU, this machine)\n\n"
            f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {revision()}; 2-core CPU, 24 GiB; "
            f"`python benchmarks/bench_convert.py --preset {a.preset}`. Synthetic bf16 weights of the "
            f"preset's exact shapes ({len(names)} tensors, {gib:.1f} GiB, largest {largest:.1f} GiB: "
            f"the value table), written in {synth:.0f} s; the round trip is bit-exact.\n\n"
            f"| direction | peak memory growth | wall |\n|---|---|---|\n"
            f"| exported folder -> Megatron | {to_mg:.1f} GiB | {t_mg:.0f} s |\n"
            f"| Megatron -> exported folder (5 GB shards) | {to_hf:.1f} GiB | {t_hf:.0f} s |\n")
    print(text)
    if a.append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
