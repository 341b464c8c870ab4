# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Python garbage collection at fixed steps instead of whenever an allocation count trips.

Why: with tensor parallelism every layer ends in a collective, and a collective waits for its
slowest rank. Python's automatic collector pauses each process whenever its own allocation
count trips, at different moments on different ranks; a full collection walks every tracked
object (the model, Megatron's state: ~10^6 objects). Where a step is host-bound (micro-batch 1)
those pauses are paid by every rank (Megatron-LM's ``--manual-gc`` answers the same problem).
With ``train.gc_interval`` = N > 0, what exists when training starts is frozen (moved out of
the collector's reach: it lives for the whole run), the automatic collector is off, and every
rank collects at the end of every N-th step (after its host sync) what the steps left. Leaving
the context restores the collector as it was.
"""
from __future__ import annotations

import gc


class StepGC:
    """``with StepGC(interval) as gc_step: ... gc_step(step)`` after each training step."""

    def __init__(self, interval: int):
        if interval < 0:
            raise ValueError(f"gc interval must be >= 0, got {interval}")
        self.interval = interval
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> "StepGC":
        if self.interval:
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.freeze()
            gc.disable()
        return self

    def __call__(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect()

    def __exit__(self, *exc) -> None:
        if self.interval:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()
