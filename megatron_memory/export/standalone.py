# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""A plain-PyTorch Memory+ GPT that loads an exported folder: logits and KV-cache generation.

No Megatron, no process group. The math is that of Megatron's local GPT as this project builds
it (RMSNorm, RoPE as Megatron applies it: non-interleaved rotate-half on cat(freqs, freqs),
causal softmax attention with grouped query heads, SwiGLU, untied output layer) and of
``megatron_memory/model/layer.py`` for the memory layers (QK-norm, product-key search, fp32 softmax,
lookup, W2(y * silu(W1 x))).

This file is also copied, alone, into every exported folder (as megatron_memory_standalone.py,
next to the transformers remote code). It therefore imports only torch and safetensors; when
``megatron_memory`` is installed its kernels serve the two memory ops (Triton on CUDA), otherwise
the short plain-torch references below (the semantics of kernels/reference.py) do.

Shapes: b = batch, s = new tokens, t = cached + new tokens, d = hidden, H = attention heads,
G = key/value groups, hd = head dim, V = vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
import weakref
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def embedding_bag_reference(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values [N, v], indices/weights [T, bag] -> [T, v] in values.dtype, fp32 accumulation."""
    rows = values[indices.long()].to(_acc(values))
    return torch.einsum("tb,tbd->td", weights.to(_acc(values)), rows).to(values.dtype)


def product_key_search_reference(query: torch.Tensor, keys: torch.Tensor, k: int, keys_bf16=None):
    """query [T, H, 2, half], keys [H, 2, n, half] -> scores, indices [T, H, k] (i * n + j):
    exact, since the best k sums s1[i] + s2[j] have i, j within each half's top-k. keys_bf16
    (the package's bf16 search takes a cached cast of the keys) is not needed here."""
    n = keys.shape[2]
    s = torch.einsum("thcd,hcnd->thcn", query.to(_acc(query)), keys.to(_acc(query)))
    top_s, top_i = s.topk(k, dim=-1)
    scores, flat = (top_s[:, :, 0, :, None] + top_s[:, :, 1, None, :]).flatten(-2).topk(k, dim=-1)
    i1 = top_i[:, :, 0].gather(-1, torch.div(flat, k, rounding_mode="floor"))
    return scores, i1 * n + top_i[:, :, 1].gather(-1, flat % k)


def _cached(owner: nn.Module, name: str, sources: tuple, make):
    """make() once per version of the ``sources`` tensors, unless autograd must reach them.

    At inference the QK-normed keys, the query norm's scale and the dtype casts of small weights
    are the same every decode step; recomputing them costs a batch-1 step more bytes (2*H*n*half
    fp32 keys written and read) and kernel launches than its lookup. The result is the same
    tensor make() returns, so numerics do not change. A source's identity (weak reference), data
    pointer and version counter (bumped by every in-place write, e.g. load_state_dict) name the
    entry; when a source needs its gradient (training) nothing is cached."""
    if ((torch.is_grad_enabled() and any(t.requires_grad for t in sources))
            or any(t.is_inference() for t in sources)):  # these carry no version counter
        return make()
    cache = owner.__dict__.setdefault("_inference_cache", {})
    hit = cache.get(name)
    if hit is not None and all(ref() is t and ptr == t.data_ptr() and ver == t._version
                               for (ref, ptr, ver), t in zip(hit[0], sources)):
        return hit[1]
    value = make()
    cache[name] = (tuple((weakref.ref(t), t.data_ptr(), t._version) for t in sources), value)
    return value


try:  # the package's dispatch: Triton on CUDA, its reference elsewhere
    from megatron_memory.kernels import embedding_bag, fused_query_prologue, product_key_search
except ImportError:  # this file alone in an exported folder
    embedding_bag, product_key_search = embedding_bag_reference, product_key_search_reference
    fused_query_prologue = None


@dataclasses.dataclass
class ModelArgs:
    """The architecture fields of config.json (written by megatron_memory.export.hf_format.hf_config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    memory_layers: list
    memory_n_keys: int
    memory_heads: int
    memory_k: int
    memory_k_dim: int
    memory_v_dim: int
    memory_qk_norm: bool
    memory_qk_norm_eps: float
    memory_plus: bool
    memory_query_norm: str = "none"      # "batchnorm" | "center" (absent in older exports)
    memory_query_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Pick the fields from a config.json dict; one ValueError naming what is wrong."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        args = cls(**{n: config[n] for n in fields if n in config})
        args.check()
        return args

    def check(self) -> None:
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "memory_n_keys",
                "memory_heads", "memory_k", "memory_k_dim", "memory_v_dim")
        bad = [n for n in ints if not isinstance(getattr(self, n), int) or getattr(self, n) < 1]
        if bad:
            raise ValueError(f"config.json: {', '.join(bad)} must be positive integers")
        if self.tie_word_embeddings:
            raise ValueError("config.json: tie_word_embeddings must be false (the output layer is untied)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads={self.num_attention_heads} is not a "
                             f"multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim={self.head_dim} must be even for RoPE")
        if self.memory_k_dim % 2 or self.memory_k > self.memory_n_keys:
            raise ValueError("config.json: memory_k_dim must be even and memory_k <= memory_n_keys")
        out = [i for i in self.memory_layers if not (isinstance(i, int) and 0 <= i < self.num_hidden_layers)]
        if out:
            raise ValueError(f"config.json: memory_layers {out} outside 0..{self.num_hidden_layers - 1}")
        if self.memory_query_norm not in ("none", "batchnorm", "center"):
            raise ValueError(f"config.json: memory_query_norm={self.memory_query_norm!r} is not one "
                             "of none, batchnorm, center")
        if not self.memory_plus and self.memory_v_dim != self.hidden_size:
            raise ValueError("config.json: plain memory (memory_plus false) needs memory_v_dim == hidden_size")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [b, s] -> cos, sin [b, 1, s, hd] as Megatron builds them (fp32 angles of
    cat(freqs, freqs), cast to the activation dtype)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=positions.device) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.heads, self.groups, self.hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, self.heads * self.hd, bias=False)
        self.k_proj = nn.Linear(a.hidden_size, self.groups * self.hd, bias=False)
        self.v_proj = nn.Linear(a.hidden_size, self.groups * self.hd, bias=False)
        self.o_proj = nn.Linear(self.heads * self.hd, a.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer_idx: int):
        """x [b, s, d], mask [b, 1, s, t] bool (True: attend) -> [b, s, d]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.groups, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.groups, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        if self.groups != self.heads:  # query head h reads group h // (H/G), as Megatron
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.hd))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gain(nn.Module):
    """A learnable gain vector (the QK-norm's query gain), named ``weight`` like a norm's."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Values(nn.Module):
    """The value table [N, v] shared by every memory layer."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))


class QueryStats(nn.Module):
    """The query's normalisation across tokens with the running statistics of training (inference
    never uses batch statistics): batchnorm (q - mean) / sqrt(var + eps) * weight + bias, center
    q - mean. Statistics in float32 whatever the model's dtype."""

    def __init__(self, dim: int, mode: str, eps: float):
        super().__init__()
        self.mode, self.eps = mode, eps
        if mode == "batchnorm":
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(dim, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))  # training state

    def constants(self, acc: torch.dtype) -> tuple:
        """(mean,) for center, (mean, scale, bias) for batchnorm, in dtype acc."""
        mean = self.running_mean.to(acc)
        if self.mode == "center":
            return (mean,)
        scale = torch.rsqrt(self.running_var.to(acc) + self.eps) * self.weight.to(acc)
        return mean, scale, self.bias.to(acc)

    def cached_constants(self, acc: torch.dtype) -> tuple:
        """constants(acc), made once per version of the statistics and weights at inference."""
        sources = (self.running_mean,) if self.mode == "center" else (
            self.running_mean, self.running_var, self.weight, self.bias)
        return _cached(self, f"constants/{acc}", sources, lambda: self.constants(acc))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        acc = _acc(q)
        consts = self.cached_constants(acc)
        q = q.to(acc) - consts[0]
        if self.mode == "center":
            return q
        return q * consts[1] + consts[2]


class Memory(nn.Module):
    """Memory+ block (megatron_memory/model/layer.py MemoryPlus) in the FFN slot."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.heads, self.k, self.half = a.memory_heads, a.memory_k, a.memory_k_dim // 2
        self.qk_norm, self.eps, self.plus = a.memory_qk_norm, a.memory_qk_norm_eps, a.memory_plus
        self.query = nn.Linear(a.hidden_size, a.memory_heads * a.memory_k_dim, bias=True)
        self.keys = nn.Parameter(torch.empty(a.memory_heads, 2, a.memory_n_keys, self.half))
        if self.qk_norm:
            self.query_norm = Gain(a.memory_heads * a.memory_k_dim)
        self.query_bn = (QueryStats(a.memory_heads * a.memory_k_dim, a.memory_query_norm,
                                    a.memory_query_norm_eps)
                         if a.memory_query_norm != "none" else None)
        if self.plus:
            self.w1 = nn.Linear(a.hidden_size, a.memory_v_dim, bias=True)
            self.w2 = nn.Linear(a.memory_v_dim, a.hidden_size, bias=True)

    def normed_keys(self, acc: torch.dtype) -> torch.Tensor:
        """QK-normed keys [H, 2, n, half] in dtype acc, scaled by 1/sqrt(half) as the layer's."""
        return F.rms_norm(self.keys.to(acc), (self.half,), eps=self.eps) * self.half ** -0.5

    def normed_query(self, q: torch.Tensor) -> torch.Tensor:
        """Query projection output [T, H*k_dim] -> running-statistics norm, QK-norm and gain,
        [T, H, 2, half] in fp32 (fp64 for fp64 models). On CUDA at inference one fused Triton
        kernel (kernels/query_prologue.py) replaces the torch ops below."""
        acc, gain = _acc(q), self.query_norm.weight
        bn = self.query_bn
        if fused_query_prologue is not None and acc == torch.float32 and q.is_cuda:
            flat_gain = _cached(self, "gain/flat", (gain,), lambda: gain.to(acc))
            consts = bn.cached_constants(acc) if bn is not None else ()
            out = fused_query_prologue(q, flat_gain, self.eps, self.half,
                                       bn.mode if bn is not None else "none", *consts)
            if out is not None:
                return out
        if bn is not None:
            q = bn(q)
        q = q.view(q.shape[0], self.heads, 2, self.half)
        gain = _cached(self, f"gain/{acc}", (gain,), lambda: gain.view(self.heads, 2, self.half).to(acc))
        return F.rms_norm(q.to(acc), (self.half,), eps=self.eps) * gain

    def forward(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x [b, s, d], values [N, v] -> [b, s, d]."""
        flat = x.reshape(-1, x.shape[-1])
        q = self.query(flat)
        keys, keys_bf16 = self.keys, None
        if self.qk_norm:
            q = self.normed_query(q)
            acc = q.dtype
            keys = _cached(self, f"keys/{acc}", (keys,), lambda: self.normed_keys(acc))
            if keys.is_cuda and not keys.requires_grad:  # the bf16 search's cast, made once
                keys_bf16 = _cached(self, "keys/bf16", (self.keys,), lambda: keys.to(torch.bfloat16))
        else:  # without QK-norm the search sees the model's dtype
            if self.query_bn is not None:
                q = self.query_bn(q).to(q.dtype)
            q = q.view(flat.shape[0], self.heads, 2, self.half)
        scores, indices = product_key_search(q, keys, self.k, keys_bf16=keys_bf16)
        weights = torch.softmax(scores.to(_acc(scores)), dim=-1)
        y = embedding_bag(values, indices.flatten(1), weights.flatten(1)).to(flat.dtype)
        out = self.w2(y * F.silu(self.w1(flat))) if self.plus else y
        return out.view(x.shape)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        if layer_id in a.memory_layers:
            self.memory = Memory(a)
        else:
            self.mlp = MLP(a)

    def forward(self, x, cos, sin, mask, cache, values):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer_id)
        n = self.post_attention_layernorm(h)
        return h + (self.memory(n, values) if hasattr(self, "memory") else self.mlp(n))


def attention_mask_4d(attention_mask: Optional[torch.Tensor], past: int, s: int, batch: int,
                      device) -> torch.Tensor:
    """[b, 1, s, past+s] bool: causal over cache positions and, given a [b, past+s] 0/1 mask,
    blind to padding. A padded query still sees itself, so no softmax row is empty."""
    q_pos = past + torch.arange(s, device=device)
    kv = torch.arange(past + s, device=device)
    mask = (kv[None, :] <= q_pos[:, None]).expand(batch, s, past + s)
    if attention_mask is not None:
        if attention_mask.shape != (batch, past + s):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be [batch, cached + new] = "
                             f"{[batch, past + s]}")
        mask = mask & attention_mask[:, None, :].bool()
        mask = mask | (kv[None, :] == q_pos[:, None])
    return mask[:, None]


def default_positions(attention_mask: Optional[torch.Tensor], past: int, s: int, batch: int, device):
    """[b, s]: 0 at each sequence's first real token (left padding skipped), as Megatron sees an
    unpadded prompt."""
    if attention_mask is None:
        return (past + torch.arange(s, device=device)).expand(batch, s)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]


class MemoryGPTModel(nn.Module):
    """Embedding, blocks, final norm and the shared value table (HF names ``model.*``)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        if a.memory_layers:
            self.memory_values = Values(a.memory_n_keys ** 2, a.memory_v_dim)

    def forward(self, input_ids, positions=None, kv_cache=None, attention_mask=None):
        """input_ids [b, s]; kv_cache: an object with update(k, v, layer_idx) -> (k, v) [b, G, t, hd]
        and get_seq_length() (KVCache here, or transformers' DynamicCache) -> hidden [b, s, d]."""
        b, s = input_ids.shape
        past = kv_cache.get_seq_length() if kv_cache is not None else 0
        x = self.embed_tokens(input_ids)
        if positions is None:
            positions = default_positions(attention_mask, past, s, b, x.device)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, x.dtype)
        mask = attention_mask_4d(attention_mask, past, s, b, x.device)
        values = self.memory_values.weight if self.args.memory_layers else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, kv_cache, values)
        return self.norm(x)


class MemoryGPT(nn.Module):
    """The causal LM: ``model`` (MemoryGPTModel) and an untied ``lm_head``."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.model = MemoryGPTModel(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def forward(self, input_ids, positions=None, kv_cache=None, attention_mask=None):
        """-> logits [b, s, V]."""
        return self.lm_head(self.model(input_ids, positions, kv_cache, attention_mask))

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype: Optional[torch.dtype] = None) -> "MemoryGPT":
        """Load an exported folder tensor by tensor (the model is built on the meta device, so
        nothing is allocated twice); ``dtype`` casts floating weights, None keeps the stored ones."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not an exported model folder (no config.json)")
        args = ModelArgs.from_config(json.loads((folder / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(args)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        params.update(buffers)
        for name, t in iter_hf_tensors(folder):
            if name not in params:
                raise ValueError(f"{folder}: unexpected tensor {name!r}")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"{folder}: {name} has shape {tuple(t.shape)}, the config gives "
                                 f"{tuple(params[name].shape)}")
            owner, _, leaf = name.rpartition(".")
            if name in buffers:  # running statistics keep their own precision
                model.get_submodule(owner).register_buffer(leaf, t.to(device=device, dtype=buffers[name].dtype))
                params[name] = None
                continue
            t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
            setattr(model.get_submodule(owner), leaf, nn.Parameter(t, requires_grad=False))
            params[name] = None
        missing = [n for n, p in params.items() if p is not None]
        if missing:
            raise ValueError(f"{folder}: weights missing for {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        return model.eval()


class KVCache:
    """Keys and values per layer, [b, G, t, hd], grown as tokens arrive. Same update /
    get_seq_length interface as transformers' DynamicCache, so either serves the model."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *unused):
        if layer_idx in self.keys:
            k = torch.cat((self.keys[layer_idx], k), dim=2)
            v = torch.cat((self.values[layer_idx], v), dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx in self.keys else 0


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [b, V] -> next token ids [b]: greedy at temperature 0, else sampling from the
    temperature-scaled distribution restricted to the top-k tokens and the top-p mass."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep up to the token crossing p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int],
                   top_p: Optional[float]) -> None:
    """One ValueError for the first invalid generation setting."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model: MemoryGPT, prompts: list[list[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Optional[int] = None, pad_token_id: int = 0,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             vocab_limit: Optional[int] = None) -> list[list[int]]:
    """Continue a batch of token-id prompts (left-padded together); returns the new tokens of
    each, ending with EOS where it was produced. ``use_cache=False`` recomputes the whole
    sequence every step (the reference the cache must match). ``vocab_limit`` excludes the
    padded rows of the vocabulary (ids >= the tokenizer's size) from the choice."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = model.args.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, device=device)
        mask[row, width - len(p):] = 1
    cache = KVCache() if use_cache else None
    step_ids, out = ids, [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model(step_ids if use_cache else ids, kv_cache=cache, attention_mask=mask)[:, -1]
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(nxt[row]))
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        ids = torch.cat((ids, nxt[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        step_ids = nxt[:, None]
        if bool(done.all()):
            break
    return out


def weight_files(folder) -> list[Path]:
    """The safetensors files of an exported folder, in index order; clear errors if missing."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map')") from err
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing weight shard(s): {', '.join(missing)}")
    return files


def iter_hf_tensors(folder, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of an exported folder, one at a time, via safetensors.safe_open (never
    pickle); a missing or corrupt shard raises an error naming its file."""
    for file in weight_files(folder):
        try:
            handle = safe_open(str(file), framework="pt", device=str(device))
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({err})") from err
        with handle as f:
            for name in f.keys():
                try:
                    t = f.get_tensor(name)
                except Exception as err:
                    raise ValueError(f"{file}: cannot read tensor {name!r} ({err})") from err
                yield name, t
