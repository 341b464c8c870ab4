# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""transformers remote code, copied into every exported folder (``hf_format.REMOTE_CODE``)."""
