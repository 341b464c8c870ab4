# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: save / resume / reshard on dist_checkpointing (checkpoint) and the parallel
SHA-256 manifest that guards them (integrity)."""
