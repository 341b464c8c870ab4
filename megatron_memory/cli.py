# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Command line built from the RunConfig dataclasses: one flag per documented field.

Flags are the field names with dashes (``--hidden-size``); memory fields carry a ``memory-``
prefix (``--memory-layers 4 12 20``). A preset gives the starting values and flags override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any, Optional

from megatron_memory.configs.presets import PRESETS, get_preset
from megatron_memory.config import RunConfig

_SECTIONS = ("model", "memory", "parallel", "train", "data")


def _flag(section: str, name: str) -> str:
    base = name.replace("_", "-")
    return f"--memory-{base}" if section == "memory" else f"--{base}"


def _unwrap(tp) -> tuple[Any, bool]:
    """(inner type, optional?) of a field annotation."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _add_field(group, section: str, f: dataclasses.Field, hints: dict) -> None:
    tp, optional = _unwrap(hints[f.name])
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_ = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
    kw: dict[str, Any] = dict(dest=f"{section}.{f.name}", help=help_, default=argparse.SUPPRESS)
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        kw.update(type=tp, choices=list(tp), metavar="{" + ",".join(str(c.value) for c in tp) + "}")
    elif typing.get_origin(tp) is list:
        kw.update(nargs="*", type=typing.get_args(tp)[0], metavar=typing.get_args(tp)[0].__name__.upper())
    else:
        kw.update(type=tp, metavar=tp.__name__.upper())
    group.add_argument(_flag(section, f.name), **kw)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a Memory+ GPT on Megatron-Core. Without arguments: the 'tiny' preset "
                    "on the embedded corpus (CPU is enough). Defaults shown are the dataclass "
                    "defaults; a preset may set others (see --print-config).")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="starting configuration; the flags below override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved, validated configuration and exit")
    for section in _SECTIONS:
        cls = type(getattr(RunConfig(), section))
        group = parser.add_argument_group(f"{section}: {cls.__doc__.splitlines()[0]}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, section, f, hints)
    return parser


def config_from_args(argv: Optional[list[str]] = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse ``argv`` into a RunConfig (preset + overrides), validated without a world size."""
    args = build_parser("python -m megatron_memory.train").parse_args(argv)
    cfg = get_preset(args.preset)
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    cfg.validate()
    return cfg, args


def format_config(cfg: RunConfig) -> str:
    lines = []
    for section in _SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            lines.append(f"{section}.{f.name} = {getattr(getattr(cfg, section), f.name)!r}")
    return "\n".join(lines)
