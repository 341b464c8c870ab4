# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Training: the Trainer on Megatron-Core's schedules (trainer), data, optimizer, metrics,
experiment tracking, stopping, profiling, the memory estimate, input checks (preflight) and the
CPU shims that let real Megatron-Core run without CUDA (cpu)."""
