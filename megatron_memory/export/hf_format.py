# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The exported Hugging-Face-style folder: config.json, safetensors weights, tokenizer, remote code.

Shared by the conversion tool (``tools/convert_checkpoint.py``), the standalone model and the
transformers remote code. Three parts, all streaming so that an 8B model never sits in memory:

- ``hf_config``: the config.json dict from a RunConfig and the (padded) vocabulary the model uses.
- ``megatron_to_hf`` / ``hf_to_megatron``: name and layout mapping, tensor by tensor, between the
  names of a Megatron dist checkpoint (global, TP=1 layout) and Llama-style names. Pure
  rearrangement: the round trip is bit-exact and keeps dtypes.
- ``write_hf_folder`` / ``iter_hf_tensors``: safetensors shards written one at a time into a
  temporary sibling folder renamed when complete, and read back one tensor at a time (never pickle).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from tokenizers import Tokenizer

from megatron_memory.config import ConfigError, MemoryConfig, ModelConfig, RunConfig
# The reader lives in standalone.py, which must work alone in an exported folder.
from megatron_memory.export.standalone import (INDEX_FILE, SINGLE_FILE, ModelArgs,  # noqa: F401
                                        iter_hf_tensors, weight_files)
CONFIG_FILE = "config.json"
MODEL_TYPE = "megatron_memory_gpt"
ARCHITECTURE = "MemoryGPTForCausalLM"
# Remote code copied into every folder: {name in the folder: source file in this package}.
_HERE = Path(__file__).resolve().parent
REMOTE_CODE = {
    "configuration_megatron_memory.py": _HERE / "hf_remote" / "configuration_megatron_memory.py",
    "modeling_megatron_memory.py": _HERE / "hf_remote" / "modeling_megatron_memory.py",
    "megatron_memory_standalone.py": _HERE / "standalone.py",
}
AUTO_MAP = {"AutoConfig": "configuration_megatron_memory.MemoryGPTConfig",
            "AutoModelForCausalLM": "modeling_megatron_memory.MemoryGPTForCausalLM"}


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def hf_config(cfg: RunConfig, vocab_size: int, *, torch_dtype: str = "float32",
              num_query_groups: Optional[int] = None, bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None) -> dict:
    """config.json of a model built from ``cfg.model`` and ``cfg.memory``.

    ``vocab_size`` is the padded vocabulary the model was built with (rows of the embedding), not
    the tokenizer's; ``num_query_groups`` defaults to ``cfg.model``'s (one per head when unset).
    """
    m, mem = cfg.model, cfg.memory
    out = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "auto_map": dict(AUTO_MAP),
        "vocab_size": int(vocab_size), "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size(), "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": num_query_groups or m.query_groups(),
        "head_dim": m.hidden_size // m.num_attention_heads,
        "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_eps,
        "rope_theta": float(m.rope_base), "tie_word_embeddings": False, "torch_dtype": torch_dtype,
        "memory_layers": mem.resolved_layers(m.num_layers), "memory_n_keys": mem.n_keys,
        "memory_heads": mem.heads, "memory_k": mem.k, "memory_k_dim": mem.k_dim,
        "memory_v_dim": mem.value_dim(m.hidden_size), "memory_qk_norm": mem.qk_norm,
        "memory_qk_norm_eps": mem.qk_norm_eps, "memory_plus": mem.plus,
        "memory_query_norm": str(mem.query_norm), "memory_query_norm_eps": mem.query_norm_eps,
    }
    for key, val in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                     ("pad_token_id", pad_token_id)):
        if val is not None:
            out[key] = int(val)
    ModelArgs.from_config(out)  # the consumers' own check: fails here, not at load time
    return out


def run_config_from_hf(config: dict) -> RunConfig:
    """The model and memory sections of a RunConfig back from config.json (for the converter's
    safetensors -> Megatron direction); other sections keep their defaults."""
    a = ModelArgs.from_config(config)
    if a.head_dim * a.num_attention_heads != a.hidden_size:
        raise ConfigError(f"head_dim={a.head_dim} x heads != hidden_size={a.hidden_size}")
    model = ModelConfig(num_layers=a.num_hidden_layers, hidden_size=a.hidden_size,
                        num_attention_heads=a.num_attention_heads,
                        # None is the default "one group per head": keeps RunConfig comparisons equal
                        num_query_groups=(None if a.num_key_value_heads == a.num_attention_heads
                                          else a.num_key_value_heads),
                        ffn_hidden_size=a.intermediate_size, seq_length=a.max_position_embeddings,
                        vocab_size=a.vocab_size, norm_eps=a.rms_norm_eps, rope_base=int(a.rope_theta))
    memory = MemoryConfig(layers=list(a.memory_layers), n_keys=a.memory_n_keys, heads=a.memory_heads,
                          k=a.memory_k, k_dim=a.memory_k_dim,
                          # None is the default "hidden size": keeps RunConfig comparisons equal
                          v_dim=None if a.memory_v_dim == a.hidden_size else a.memory_v_dim,
                          qk_norm=a.memory_qk_norm, qk_norm_eps=a.memory_qk_norm_eps,
                          plus=a.memory_plus, query_norm=a.memory_query_norm,
                          query_norm_eps=a.memory_query_norm_eps)
    return RunConfig(model=model, memory=memory)


def load_hf_config(folder: str | os.PathLike) -> dict:
    """config.json of an exported folder; one clear error when the folder is not one."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an exported model folder (no {CONFIG_FILE})")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{file}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
    return config


# ---------------------------------------------------------------------------------------------
# Name / layout mapping
# ---------------------------------------------------------------------------------------------

# One-to-one renames: (Megatron checkpoint name, HF name); {i} is the 0-based layer.
_RENAMES = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight", "model.layers.{i}.input_layernorm.weight"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("decoder.layers.{i}.mlp.query_norm_weight", "model.layers.{i}.memory.query_norm.weight"),
    ("memory_values.weight", "model.memory_values.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
] + [(f"decoder.layers.{{i}}.mlp.{p}", f"model.layers.{{i}}.memory.{p}")
     for p in ("query.weight", "query.bias", "keys", "w1.weight", "w1.bias", "w2.weight", "w2.bias",
               # query BatchNorm / centring: affine and running statistics (fp32; num_updates
               # int64, so a model converted back resumes the bias-corrected EMA where it was)
               "query_bn.weight", "query_bn.bias", "query_bn.running_mean", "query_bn.running_var",
               "query_bn.num_updates")]
# One Megatron tensor <-> several HF tensors, concatenated along dim 0 (qkv is interleaved).
_QKV = "decoder.layers.{i}.self_attention.linear_qkv.weight"
_QKV_PARTS = tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv")
_FC1 = "decoder.layers.{i}.mlp.linear_fc1.weight"
_FC1_PARTS = ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_MEG_RENAME = [(_pattern(m), h) for m, h in _RENAMES]
_HF_RENAME = [(_pattern(h), m) for m, h in _RENAMES]
_QKV_RE, _FC1_RE = _pattern(_QKV), _pattern(_FC1)
_HF_PART = {}  # compiled HF part pattern -> (megatron template, part index, number of parts)
for _tmpl, _parts in ((_QKV, _QKV_PARTS), (_FC1, _FC1_PARTS)):
    for _n, _p in enumerate(_parts):
        _HF_PART[_pattern(_p)] = (_tmpl, _n, len(_parts))


def _fill(template: str, match: re.Match) -> str:
    return template.replace("{i}", match.groupdict().get("i") or "")


def is_megatron_weight(name: str) -> bool:
    """True for the model weights of a Megatron checkpoint the mapping knows; False for the rest
    (``..._extra_state``, ``common_state``, optimizer and RNG state)."""
    return any(p.match(name) for p, _ in _MEG_RENAME) or bool(_QKV_RE.match(name) or _FC1_RE.match(name))


def _qkv_split(w: torch.Tensor, heads: int, groups: int) -> list[torch.Tensor]:
    """Megatron's linear_qkv [groups*(q_per_group+2)*hd, d] is interleaved per query group (its
    q heads, then k, then v: attention.py get_query_key_value_tensors) -> q, k, v row blocks."""
    if heads % groups:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    per = heads // groups
    rows, d = w.shape
    if rows % (groups * (per + 2)):
        raise ValueError(f"linear_qkv rows {rows} do not split into {groups} groups of {per}+2 heads")
    hd = rows // (groups * (per + 2))
    g = w.view(groups, per + 2, hd, d)
    return [g[:, :per].reshape(heads * hd, d), g[:, per].reshape(groups * hd, d),
            g[:, per + 1].reshape(groups * hd, d)]


def _qkv_join(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    per, d = heads // groups, q.shape[1]
    hd = k.shape[0] // groups
    parts = [q.view(groups, per, hd, d), k.view(groups, 1, hd, d), v.view(groups, 1, hd, d)]
    return torch.cat(parts, dim=1).reshape(groups * (per + 2) * hd, d)


def megatron_to_hf(tensors: Iterable[tuple[str, torch.Tensor]], config: dict
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron checkpoint name, full tensor) -> (HF name, tensor), one at a time.

    Names that are not weights (``is_megatron_weight``) are skipped; an unknown weight-looking
    name raises, so nothing is silently dropped from an export.
    """
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    for name, t in tensors:
        if _QKV_RE.match(name):
            m = _QKV_RE.match(name)
            yield from zip((_fill(p, m) for p in _QKV_PARTS), _qkv_split(t, heads, groups))
        elif _FC1_RE.match(name):
            m = _FC1_RE.match(name)
            if t.shape[0] % 2:
                raise ValueError(f"{name}: {t.shape[0]} rows cannot be [gate; up]")
            yield from zip((_fill(p, m) for p in _FC1_PARTS), t.chunk(2, dim=0))
        else:
            hit = next(((p.match(name), h) for p, h in _MEG_RENAME if p.match(name)), None)
            if hit is not None:
                yield _fill(hit[1], hit[0]), t
            elif not _is_non_weight(name):
                raise KeyError(f"unknown Megatron tensor {name!r}: no Hugging Face name for it")


def _is_non_weight(name: str) -> bool:
    return "_extra_state" in name or name.startswith(("common_state", "optimizer", "rng_state"))


def hf_to_megatron(tensors: Iterable[tuple[str, torch.Tensor]], config: dict
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) -> (Megatron checkpoint name, full tensor), one at a time.

    q/k/v and gate/up are held until all parts of their Megatron tensor have arrived (in any
    order), so at most a few tensors of one layer wait here.
    """
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors:
        hit = next(((p.match(name), h) for p, h in _HF_RENAME if p.match(name)), None)
        if hit is not None:
            yield _fill(hit[1], hit[0]), t
            continue
        part = next(((p.match(name), spec) for p, spec in _HF_PART.items() if p.match(name)), None)
        if part is None:
            raise KeyError(f"unknown tensor {name!r} in the exported weights")
        (m, (tmpl, idx, count)) = part
        target = _fill(tmpl, m)
        parts = pending.setdefault(target, {})
        if idx in parts:
            raise ValueError(f"tensor {name!r} appears twice")
        parts[idx] = t
        if len(parts) == count:
            del pending[target]
            ordered = [parts[j] for j in range(count)]
            yield target, (_qkv_join(*ordered, heads, groups) if tmpl == _QKV else torch.cat(ordered))
    if pending:
        raise ValueError(f"incomplete weights: parts missing for {sorted(pending)}")


def megatron_sources(hf_names: Iterable[str]) -> dict[str, list[str]]:
    """Megatron checkpoint name -> the HF names it is built from, in ``hf_to_megatron``'s order
    (q, k, v; gate, up), so a converter can fetch each Megatron tensor's parts on demand."""
    out: dict[str, list] = {}
    for name in hf_names:
        hit = next(((p.match(name), h) for p, h in _HF_RENAME if p.match(name)), None)
        if hit is not None:
            out[_fill(hit[1], hit[0])] = [name]
            continue
        part = next(((p.match(name), spec) for p, spec in _HF_PART.items() if p.match(name)), None)
        if part is None:
            raise KeyError(f"unknown tensor {name!r} in the exported weights")
        (m, (tmpl, idx, count)) = part
        out.setdefault(_fill(tmpl, m), [None] * count)[idx] = name
    incomplete = sorted(k for k, v in out.items() if None in v)
    if incomplete:
        raise ValueError(f"incomplete weights: parts missing for {incomplete}")
    return out


def megatron_model_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of a model built on one rank with TP=PP=1, from its
    ``sharded_state_dict()`` (the names dist checkpoints store), skipping non-weights."""
    for item in model.sharded_state_dict().values():
        key, data = getattr(item, "key", None), getattr(item, "data", None)
        if key is None or not isinstance(data, torch.Tensor) or not is_megatron_weight(key):
            continue
        shape = getattr(item, "global_shape", None)
        if shape and tuple(shape) != tuple(data.shape):
            raise ValueError(f"{key}: local {tuple(data.shape)} is a shard of {tuple(shape)}; "
                             "build the model at TP=PP=1 to export it")
        yield key, data.detach()


# ---------------------------------------------------------------------------------------------
# Folder writer and reader
# ---------------------------------------------------------------------------------------------

def _owned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with its own storage: safetensors refuses tensors that share
    memory (q, k, v are views of one qkv tensor)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """Write a safetensors file straight from the tensors' memory.

    ``safetensors.torch.save_file`` first copies every tensor into one bytes object, which would
    double the peak memory of an 8 GiB value-table shard; the format is simple (little-endian u64
    header size, JSON header padded to 8 bytes, then the raw tensors in order), so it is written
    here without that copy, and read back by safetensors itself."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class _ShardWriter:
    """Buffers tensors up to ``max_bytes`` and writes each full buffer as one shard file."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []  # (temporary path, names)
        self.total = 0
        self.seen: set[str] = set()

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.seen:
            raise ValueError(f"tensor {name!r} given twice")
        self.seen.add(name)
        t = _owned_cpu(t)
        nbytes = t.numel() * t.element_size()
        if self.buf and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buf[name], self.size = t, self.size + nbytes
        self.total += nbytes
        if self.size >= self.max_bytes:  # a tensor at or above the limit gets its own shard
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        path = self.folder / f"shard-{len(self.files):05d}.part"
        _save_safetensors(self.buf, path, metadata={"format": "pt"})
        self.files.append((path, list(self.buf)))
        self.buf, self.size = {}, 0

    def finish(self) -> None:
        """Final names: one file ``model.safetensors``, or numbered shards plus an index."""
        self.flush()
        if not self.files:
            raise ValueError("no tensors to write")
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.folder / SINGLE_FILE)
            return
        n, weight_map = len(self.files), {}
        for k, (path, names) in enumerate(self.files, 1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _tokenizer_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {p} (expected tokenizer.json or a directory holding one)")
    return file


def _write_tokenizer(folder: Path, tokenizer_file: Path, config: dict) -> None:
    """tokenizer.json as is, and a tokenizer_config.json naming its special tokens for
    transformers' AutoTokenizer (the fast tokenizer class reads tokenizer.json directly)."""

    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": config.get("max_position_embeddings", 2048)}
    for key in ("bos", "eos", "pad"):
        tid = config.get(f"{key}_token_id")
        if tid is not None and tok.id_to_token(tid) is not None:
            tok_config[f"{key}_token"] = tok.id_to_token(tid)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def _write_metadata(folder: Path, config: dict) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    if gen:  # generate() stops at EOS and pads with these
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name, src in REMOTE_CODE.items():
        shutil.copyfile(src, folder / name)


def write_hf_folder(out_dir: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                    config: dict, tokenizer_path: Optional[str | os.PathLike] = None,
                    max_shard_bytes: int = 5 * 2**30,
                    progress: Optional[Callable[[str, int], None]] = None) -> Path:
    """Write an exported folder from (HF name, tensor) pairs, holding at most one shard in memory.

    Refuses a non-empty ``out_dir``; writes into a temporary sibling and renames it when complete,
    so a failure leaves nothing behind. ``progress(name, nbytes)`` is called after each tensor.
    Returns the folder path.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {out} is not empty; refusing to overwrite")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    tok_file = _tokenizer_file(tokenizer_path) if tokenizer_path is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for name, t in tensors:
            writer.add(name, t)
            if progress is not None:
                progress(name, t.numel() * t.element_size())
        writer.finish()
        _write_metadata(tmp, config)
        if tok_file is not None:
            _write_tokenizer(tmp, tok_file, config)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
