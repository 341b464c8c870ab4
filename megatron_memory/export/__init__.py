# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Export: the Hugging-Face-style folder (hf_format), the plain-PyTorch model that loads it
(standalone), text generation from it (generate) and the remote code shipped inside it
(hf_remote)."""
