# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Torch ops one Memory+ layer dispatches per forward+backward on its GPU (Triton) path, by
source area, beside a SwiGLU FFN's: a CPU proxy for the kernel launches that make micro-batch-1
training host-bound (benchmarks/RESULTS.md run 20: ~225 more kernels per memory layer and
micro-batch than the FFN it replaces).

    python3 benchmarks/count_layer_ops.py [--query-norm batchnorm|center|none] [--json]

Runs on CPU: the Triton kernels in the interpreter (TRITON_INTERPRET=1 is set here, before
Triton is imported) and the dispatcher told to take the Triton path for CPU tensors. View ops
(view, permute, ...) are not counted: they launch nothing. On CPU ``F.rms_norm`` decomposes
into ~7 ops forward and ~15 backward where CUDA runs one fused kernel each; the "QK-norm" area
therefore reads higher here than on a GPU. Ops are attributed to the innermost frame in this
repository; ops autograd runs from C++ (the backward of torch ops) form their own area.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # before Triton is imported (via the package)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from megatron_memory import kernels  # noqa: E402
from megatron_memory.config import MemoryConfig, QueryNorm  # noqa: E402
from megatron_memory.model.layer import MemoryPlus, MemoryValues  # noqa: E402
from tests.conftest import tiny_transformer_config  # noqa: E402
from tests.kernels.test_embedding_bag import install_interpreter_shim  # noqa: E402

VIEWS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze",
         "squeeze", "select", "slice", "as_strided", "detach", "alias", "split", "chunk",
         "unbind", "split_with_sizes", "_reshape_alias", "lift_fresh"}
# Source areas by file (and, in layer.py, by function).
AREAS = (("segment_plan.py", "lookup backward: segment plan"),
         ("triton_embedding_bag.py", "lookup (launch code)"),
         ("bf16_search.py", "search (launch code)"),
         ("triton_product_key.py", "search (launch code)"),
         ("query_norm_train.py", "query BatchNorm + QK-norm (fused, launch code)"),
         ("key_norm.py", "keys' QK-norm (fused, launch code)"),
         ("query_norm.py", "query BatchNorm / centring"),
         ("layer.py:_normalised", "QK-norm"),
         ("layer.py:select", "query, softmax"),
         ("layer.py:mix", "W1, silu, W2"),
         ("layer.py", "layer, other"),
         ("metrics.py", "key-usage instruments"))


class OpLog(TorchDispatchMode):
    """Records (op, area) of every non-view op dispatched outside Triton's interpreter."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        stack = traceback.extract_stack()
        if name not in VIEWS and not any("triton/runtime/interpreter" in f.filename for f in stack):
            self.ops.append((name, area_of(stack)))
        return func(*args, **(kwargs or {}))


def area_of(stack) -> str:
    ours = [f for f in stack if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename
            and not f.filename.endswith(("count_layer_ops.py",))]
    if not ours:
        return "autograd (backward of torch ops)"
    frame = ours[-1]
    where = f"{Path(frame.filename).name}:{frame.name}"
    return next((label for key, label in AREAS if where.startswith(key)), where)


def count(run) -> tuple[int, int, collections.Counter]:
    """run() -> (output, backward closure); -> (forward ops, backward ops, ops per area)."""
    out, backward = run()                      # warm-up: caches, lazy init
    backward()
    log = OpLog()
    with log:
        out, backward = run()
    n_fwd = len(log.ops)
    with log:
        backward()
    return n_fwd, len(log.ops) - n_fwd, collections.Counter(area for _, area in log.ops)


def memory_layer(query_norm: str, d: int = 64, tokens: int = 16):
    cfg = tiny_transformer_config(hidden_size=d, params_dtype=torch.bfloat16)
    mc = MemoryConfig(n_keys=16, heads=2, k=4, k_dim=32, query_norm=QueryNorm(query_norm))
    mc.validate(cfg.num_layers, d)
    values = MemoryValues(cfg, mc)
    layer = MemoryPlus(cfg, mc, values, layer_id=1).train()
    values.weight.main_grad = torch.zeros(values.weight.shape, dtype=torch.float32)  # as Megatron DDP
    x = torch.randn(tokens // 2, 2, d, dtype=torch.bfloat16, requires_grad=True)

    def run():
        out, _ = layer(x)
        return out, lambda: out.backward(torch.ones_like(out))
    return run


def swiglu_ffn(d: int = 64, tokens: int = 16):
    ffn = 4 * d
    fc1 = torch.nn.Linear(d, 2 * ffn, bias=False, dtype=torch.bfloat16)
    fc2 = torch.nn.Linear(ffn, d, bias=False, dtype=torch.bfloat16)
    x = torch.randn(tokens, d, dtype=torch.bfloat16, requires_grad=True)

    def run():
        a, b = fc1(x).chunk(2, dim=-1)
        out = fc2(F.silu(a) * b)
        return out, lambda: out.backward(torch.ones_like(out))
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--query-norm", default="batchnorm", choices=[q.value for q in QueryNorm])
    ap.add_argument("--json", action="store_true", help="print the counts as one JSON line instead")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" or not kernels.HAVE_TRITON:
        ap.error("needs Triton and TRITON_INTERPRET=1 (the kernels run in its interpreter)")
    install_interpreter_shim()
    # The GPU path on CPU tensors: the dispatcher's device test is the only thing bypassed.
    use_triton = kernels.use_triton
    kernels.use_triton = lambda t: kernels.HAVE_TRITON and not kernels._FORCE_REFERENCE
    try:
        mem = count(memory_layer(args.query_norm))
    finally:
        kernels.use_triton = use_triton
    ffn = count(swiglu_ffn())
    result = {"memory": mem[0] + mem[1], "ffn": ffn[0] + ffn[1], "areas": dict(mem[2])}
    if args.json:
        print(json.dumps(result))
        return result
    rows = [f"| {area} | {n} |" for area, n in mem[2].most_common()]
    print(f"Memory+ layer (query norm {args.query_norm}), Triton path: {mem[0]} ops forward, "
          f"{mem[1]} backward, {mem[0] + mem[1]} in all; SwiGLU FFN: {ffn[0]} forward, {ffn[1]} "
          f"backward, {ffn[0] + ffn[1]} in all\n\n| area | ops |\n|---|---|\n" + "\n".join(rows))
    return result


if __name__ == "__main__":
    main()
