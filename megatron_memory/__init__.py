# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Memory+ layers for Megatron-Core, as one installed top-level name.

Sub-packages, lowest first (an import points only down this list; tests/test_imports.py checks):
``config`` (the plugin's dataclasses) and ``configs`` (named presets) < ``kernels`` (Triton ops and
their torch references) < ``model`` (layer math, parallel plan, spec, GPTModel) < ``export``
(exported folder, standalone model) < ``checkpointing`` < ``training`` < the commands (``cli``,
``describe``, ``train``) < ``tools`` and ``launch``. The repository folders kernels/, configs/,
tools/ and launch/ install as ``megatron_memory.kernels`` etc. (pyproject's package-dir); a
checkout is used through ``pip install -e .`` (setup.sh), which maps them the same way.
"""
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
