# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Command line built from the RunConfig dataclasses: one flag per documented field.

Flags are the field names with dashes (``--hidden-size``); memory fields carry a ``memory-``
prefix (``--memory-layers 4 12 20``). A preset gives the starting values and flags override it;
``--help`` shows the chosen preset's values. Megatron-LM's names are accepted as aliases
(``--train-iters`` for ``--steps``, ``--tensor-model-parallel-size`` for ``--tp``, ...). Bad
flags give one line on stderr and exit code 2, never the whole usage.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import os
import re
import sys
import types
import typing
from typing import Any, Optional

from megatron_memory.configs.presets import PRESETS, get_preset
from megatron_memory.config import ConfigError, RunConfig

_SECTIONS = ("model", "memory", "parallel", "train", "data")
# Megatron-LM's flag names for our fields, where they differ (same-named flags such as
# --micro-batch-size, --lr, --seq-length, --data-path, --split need no alias).
MEGATRON_ALIASES = {
    "train.steps": ["--train-iters"],
    "parallel.tp": ["--tensor-model-parallel-size"],
    "parallel.pp": ["--pipeline-model-parallel-size"],
    "data.tokenizer": ["--tokenizer-model"],
    "data.cache_dir": ["--data-cache-path"],
    "train.distributed_optimizer": ["--use-distributed-optimizer"],
    "train.warmup_steps": ["--lr-warmup-iters"],
    "model.norm_eps": ["--norm-epsilon"],
    "model.rope_base": ["--rotary-base"],
    "model.init_std": ["--init-method-std"],
    "train.deterministic": ["--deterministic-mode"],
}
# Fields holding file-system paths: the launcher makes them absolute before changing directory.
PATH_FIELDS = ("data.data_path", "data.tokenizer", "data.cache_dir", "train.tensorboard_dir",
               "train.save", "train.load")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (with a close match for a misspelt
    flag) instead of printing the whole usage first. No prefix abbreviations (as Megatron-LM):
    '--train-iter' must not silently mean '--train-iters'."""

    def __init__(self, *args, **kw):
        super().__init__(*args, allow_abbrev=False, **kw)

    def error(self, message: str) -> typing.NoReturn:
        hint = ""
        unknown = re.findall(r"(--[\w-]+)", message) if "unrecognized" in message else []
        flags = [o for a in self._actions for o in a.option_strings]
        for flag in unknown:
            close = difflib.get_close_matches(flag.split("=")[0], flags, n=1)
            if close:
                hint = f"; did you mean {close[0]}?"
                break
        self.exit(2, f"error: {message}{hint} (see --help)\n")


def _flag(section: str, name: str) -> str:
    base = name.replace("_", "-")
    return f"--memory-{base}" if section == "memory" else f"--{base}"


def _unwrap(tp) -> tuple[Any, bool]:
    """(inner type, optional?) of a field annotation."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _add_field(group, section: str, f: dataclasses.Field, hints: dict, base: RunConfig) -> None:
    tp, optional = _unwrap(hints[f.name])
    default = getattr(getattr(base, section), f.name)  # the preset's value, shown by --help
    dest = f"{section}.{f.name}"
    help_ = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
    kw: dict[str, Any] = dict(dest=dest, help=help_, default=argparse.SUPPRESS)
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        kw.update(type=tp, choices=list(tp), metavar="{" + ",".join(str(c.value) for c in tp) + "}")
    elif typing.get_origin(tp) is list:
        kw.update(nargs="*", type=typing.get_args(tp)[0], metavar=typing.get_args(tp)[0].__name__.upper())
    else:
        kw.update(type=tp, metavar=tp.__name__.upper())
    group.add_argument(_flag(section, f.name), *MEGATRON_ALIASES.get(dest, []), **kw)


def build_parser(prog: Optional[str] = None, preset: str = "tiny") -> argparse.ArgumentParser:
    """The training command line; defaults shown by --help are those of ``preset``."""
    base = get_preset(preset)
    parser = OneLineParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Train a Memory+ GPT on Megatron-Core. Without arguments: the 'tiny' preset "
                    f"on the embedded corpus (CPU is enough). Defaults shown are preset "
                    f"{preset!r}'s (--preset NAME --help shows another's); --print-config shows "
                    f"everything resolved.",
        epilog="Megatron-LM names are accepted as aliases: " + ", ".join(
            f"{a} (= {_flag(*dest.split('.'))})" for dest, al in MEGATRON_ALIASES.items() for a in al)
        + "; --micro-batch-size, --global-batch-size, --lr, --min-lr, --seq-length, --num-layers, "
          "--hidden-size, --num-attention-heads, --seed, --log-interval, --eval-interval, "
          "--eval-iters, --sequence-parallel, --bf16, --data-path, --split, --tensorboard-dir, "
          "--wandb-project, --save, --load are spelt as in Megatron-LM.")
    parser.add_argument("--preset", default="tiny", metavar="NAME",
                        help=f"starting configuration, one of {', '.join(PRESETS)}; the flags below "
                             f"override it (default: tiny)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (memory layers, FFN size, dtype, batch "
                             "arithmetic) and parameter counts, and exit")
    for section in _SECTIONS:
        cls = type(getattr(RunConfig(), section))
        group = parser.add_argument_group(f"{section}: {cls.__doc__.splitlines()[0]}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, section, f, hints, base)
    return parser


def _preset_name(argv: list[str]) -> str:
    pre = OneLineParser(add_help=False)
    pre.add_argument("--preset", default="tiny")
    name = pre.parse_known_args(argv)[0].preset
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name


def config_from_args(argv: Optional[list[str]] = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse ``argv`` into a RunConfig (preset + overrides), validated without a world size."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = _preset_name(argv)
    args = build_parser("python -m megatron_memory.train", preset).parse_args(argv)
    cfg = get_preset(preset)
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    cfg.validate()
    return cfg, args


def absolute_paths(argv: list[str], cwd: str) -> list[str]:
    """``argv`` with the values of path flags (PATH_FIELDS, aliases included) made absolute
    against ``cwd``; blend weights and '' (disabled) are left alone."""
    parser = build_parser()
    flags = {o for a in parser._actions if a.dest in PATH_FIELDS for o in a.option_strings}
    out, in_path = [], False
    for arg in argv:
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            in_path = name in flags and not eq
            out.append(f"{name}={_abs(value, cwd)}" if name in flags and eq else arg)
        else:
            out.append(_abs(arg, cwd) if in_path else arg)
    return out


def _abs(value: str, cwd: str) -> str:
    try:
        float(value)
        return value  # a blend weight
    except ValueError:
        return os.path.join(cwd, os.path.expanduser(value)) if value else value


def format_config(cfg: RunConfig) -> str:
    lines = []
    for section in _SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, enum.Enum):  # as the flag takes it: batchnorm, not <QueryNorm...>
                value = value.value
            lines.append(f"{section}.{f.name} = {value!r}")
    return "\n".join(lines)
