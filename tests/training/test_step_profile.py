# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The profiled step's summary: busy time is the union of kernel intervals, kinds by name."""
import pytest
import torch

from megatron_memory import kernels
from megatron_memory.training import step_profile as sp


def test_busy_is_the_union_of_intervals():
    # [0,10) and [5,12) overlap (12 us), [20,25) apart (5 us), [21,22) inside it (0 more)
    assert sp.busy_us([(20, 25), (0, 10), (5, 12), (21, 22)]) == 17
    assert sp.busy_us([]) == 0


def test_summary_kinds_and_idle():
    mem = frozenset({"_segment_kernel"})
    ks = [("_segment_kernel", 0, 2000), ("ncclDevKernel_AllGather_RING", 1000, 4000),
          ("nvjet_tst_128x256_64x4", 5000, 8000), ("void at::native::elementwise_kernel", 8000, 8500),
          ("pytorch_flash::flash_fwd_kernel", 9000, 9500), ("multi_tensor_apply_kernel", 9500, 9600)]
    s = sp.summarize(ks, wall_s=0.02, memory_names=mem)
    assert s["wall_ms"] == pytest.approx(20.0)
    assert s["busy_ms"] == pytest.approx(4.0 + 3.0 + 0.5 + 0.6)     # 0-4, 5-8, 8-8.5, 9-9.6 ms
    assert s["idle_ms"] == pytest.approx(20.0 - 8.1)
    assert s["kinds"] == {"NCCL": (3.0, 1), "GEMM": (3.0, 1), sp.MEMORY: (2.0, 1),
                          "attention": (0.5, 1), sp.OTHER: (0.5, 1), "optimizer": (0.1, 1)}
    assert list(s["kinds"])[:2] == ["NCCL", "GEMM"]                   # by time, most first
    text = sp.format_summary(s)
    assert "GPU busy 8.1 ms of a 20.0 ms step (40%" in text and "_segment" not in text


@pytest.mark.skipif(not kernels.HAVE_TRITON, reason="needs Triton")
def test_memory_kernel_names_are_this_packages_triton_kernels():
    names = sp.triton_kernel_names()
    assert {"_segment_kernel", "_select_kernel", "_rescore_topk_kernel", "_candidates_kernel",
            "_forward_kernel"} <= names
    assert sp.kind_of("_select_kernel", names) == sp.MEMORY
    assert sp.kind_of("_some_other_kernel", names) == sp.OTHER


def test_device_kernels_reads_profiler_events():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(4).add_(1)
    assert sp.device_kernels(prof) == []   # CPU ops only: no GPU kernel events


def test_device_kernels_leave_out_gpu_user_annotations():
    """A record_function range on the GPU timeline spans its kernels: it is not one more."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def ev(name, start, end, device=DeviceType.CUDA, annotation=False):
        return NS(name=name, time_range=NS(start=start, end=end), device_type=device,
                  is_user_annotation=annotation)

    events = [ev("Optimizer.step#AdamW.step", 0, 30, annotation=True),
              ev("multi_tensor_apply_kernel", 0, 10), ev("multi_tensor_apply_kernel", 12, 30),
              ev("aten::add_", 0, 5, device=DeviceType.CPU)]
    kernels = sp.device_kernels(NS(events=lambda: events))
    assert kernels == [("multi_tensor_apply_kernel", 0, 10), ("multi_tensor_apply_kernel", 12, 30)]
    s = sp.summarize(kernels, 40e-6, frozenset())
    (ms, count), = s["kinds"].values()
    assert list(s["kinds"]) == ["optimizer"] and count == 2
    assert abs(ms - 0.028) < 1e-12 and abs(s["busy_ms"] - 0.028) < 1e-12
