# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""StepGC: inside, the automatic collector is off and what existed is frozen; garbage in
reference cycles goes at the N-th step's collection, not before; leaving restores the collector;
interval 0 changes nothing."""
from __future__ import annotations

import gc
import weakref

import pytest

from megatron_memory.step_gc import StepGC


class Node:
    pass


def cycle() -> weakref.ref:
    """A reference cycle with no outside reference: only a collection frees it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_collects_every_nth_step_and_restores_the_collector():
    assert gc.isenabled()
    with StepGC(2) as gc_step:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        ref = cycle()
        gc_step(1)
        assert ref() is not None          # step 1: no collection, the automatic one is off
        gc_step(2)
        assert ref() is None              # step 2: collected
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_zero_keeps_pythons_collector():
    with StepGC(0) as gc_step:
        assert gc.isenabled() and gc.get_freeze_count() == 0
        gc_step(1)
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with StepGC(1):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_negative_interval_raises():
    with pytest.raises(ValueError, match=">= 0"):
        StepGC(-1)
