# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The model: Memory+ layer math on one device (layer, query_norm), its parallel plan over the
tensor-parallel group and pipeline stages (parallel), the layer spec and GPTModel (spec, gpt),
core attention (attention) and CUDA graphs of a memory layer (graphs)."""
