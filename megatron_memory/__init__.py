# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Memory+ layers for Megatron-Core. Installs as one top-level name: the repository folders
kernels/, configs/, tools/ and launch/ are its sub-packages ``megatron_memory.kernels`` etc."""
from pathlib import Path as _Path
from typing import Optional as _Optional


def _source_root() -> _Optional[_Path]:
    """The repository root when this package runs from a source checkout (or an editable
    install of one); None when it is installed from a wheel."""
    root = _Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file():
        return root
    return None


SOURCE_ROOT = _source_root()
# A source checkout run without installing (e.g. a copy on a GPU machine): the sub-package
# folders sit beside this one, so look for them there too. An installed wheel has them inside.
if SOURCE_ROOT is not None:
    __path__.append(str(SOURCE_ROOT))  # noqa: F821  (the package's own __path__)
