# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The package's error family, and the one place each command turns it into one line.

Every error a user can act on (a flag, a file, a checkpoint) is a ``MegatronMemoryError``; its
message names what is wrong and what to do. Each command's ``main`` is wrapped in ``command``:
it prints ``error: <message>`` once (local rank 0 under a launcher) and returns exit code 2,
never a traceback. Anything else is a bug and keeps its traceback.

``command`` also keeps third-party start-up noise off the terminal: Megatron-Core warns four
times that Transformer Engine and Apex are missing and torch logs that no CUDA runtime is found,
before the command says anything. What is missing is reported once, in one line, where it costs
something (``note_once``).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Callable


class MegatronMemoryError(Exception):
    """Base of every error a user can act on; the message is one line that says the fix."""


class ConfigError(MegatronMemoryError, ValueError):
    """A configuration value or flag is invalid; the message names the field and what to change."""


class InputError(MegatronMemoryError, ValueError):
    """A file or folder the user named (data, tokenizer, exported model) cannot be used as is."""


class CheckpointError(MegatronMemoryError, RuntimeError):
    """A checkpoint cannot be read, written or loaded into this run."""


class IntegrityError(CheckpointError):
    """A checkpoint file does not match its SHA-256 manifest (damaged or incomplete)."""


# A file the user named is missing, exists already, or cannot be read or written: their message
# (with the path) is the one line.
_FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError)
_noted: set[str] = set()


def _first_rank() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def note_once(key: str, text: str) -> None:
    """Print ``note: text`` on stderr once per process (local rank 0 only)."""
    if key not in _noted:
        _noted.add(key)
        if _first_rank():
            print(f"note: {text}", file=sys.stderr, flush=True)


def quiet_third_party() -> None:
    """Keep Megatron's and torch's warnings about optional extras (Apex, Transformer Engine,
    CUDA) off the terminal, on every rank; the commands print what matters themselves, and our
    own warnings stay on."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="megatron_memory")
    for name in ("megatron", "torch.distributed", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fail(err: BaseException) -> int:
    """One line on stderr (local rank 0 under a launcher); the exit code 2."""
    if _first_rank():
        text = " ".join(str(err).split("\n")) or type(err).__name__
        print(f"error: {text}", file=sys.stderr, flush=True)
    return 2


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's ``main``: start-up noise off, a ``MegatronMemoryError`` or a file error
    becomes one line and exit code 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        quiet_third_party()
        try:
            return main(*args, **kwargs)
        except (MegatronMemoryError, *_FILE_ERRORS) as err:
            return fail(err)

    return run
