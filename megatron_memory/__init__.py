# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Memory+ layers for Megatron-Core. Installs as one top-level name: the repository folders
kernels/, configs/, tools/ and launch/ are its sub-packages ``megatron_memory.kernels`` etc."""
from pathlib import Path as _Path

# A source checkout run without installing (e.g. a copy on a GPU machine): the sub-package
# folders sit beside this one, so look for them there too. An installed wheel has them inside.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821  (the package's own __path__)
