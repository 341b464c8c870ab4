# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Plugin-owned configuration: dataclasses with one documented field each.

Megatron's ``TransformerConfig`` is not grown: the memory layer has its own ``MemoryConfig`` and a
run is a ``RunConfig`` of small sections. Every check lives in ``validate()`` methods that run
before any process group or tensor is created, and each failure is one ``ConfigError`` that names
the field and the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import importlib.util
from dataclasses import dataclass, field
from typing import Optional

from megatron_memory import determinism
from megatron_memory.errors import ConfigError  # noqa: F401  (raised here; importers take it from here too)


# A file whose appearance stops a run like SIGTERM (finish the step, save, exit 0). The SLURM
# script sets it: a signal sent to the batch shell before the time limit cannot reach the training
# processes behind srun and torchrun, whose agent kills its workers before a large save completes.
STOP_FILE_ENV = "MEGATRON_MEMORY_STOP_FILE"


class _Section:
    """Base of the config sections. ``resolve`` returns a frozen copy: what the Trainer,
    ``--print-config``, the calculator and preflight read cannot be changed behind their backs
    (``replace`` makes a copy whose replaced sections are unfrozen)."""

    _frozen = False

    def __setattr__(self, name, value):
        if self._frozen:
            raise dataclasses.FrozenInstanceError(
                f"{type(self).__name__}.{name}: a resolved config is frozen; use replace()")
        super().__setattr__(name, value)

    def _freeze(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value._freeze()
        object.__setattr__(self, "_frozen", True)

    @property
    def resolved(self) -> bool:
        """Whether this is ``resolve``'s output (every derived default filled in)."""
        return self._frozen


def opt(default, help: str, **kw):
    """A dataclass field with a help text (used by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """The model's vocabulary for a tokenizer of ``vocab`` tokens: padded to multiple * TP."""
    step = multiple * tp
    return (vocab + step - 1) // step * step


def _multiples(tp: int, tp_dp: int) -> str:
    return ", ".join(str(m) for m in range(tp, tp_dp + 1, tp) if tp_dp % m == 0)


def default_memory_layers(num_layers: int, count: int = 3) -> list[int]:
    """``count`` layer indices (0-based), evenly spaced and centred: 24 layers -> [4, 12, 20]."""
    if count > num_layers:
        raise ConfigError(f"cannot place {count} memory layers in a model of {num_layers} layers")
    return [((2 * i + 1) * num_layers) // (2 * count) for i in range(count)]


class QueryNorm(str, enum.Enum):
    """Normalisation of the memory query across tokens (before the half split and QK-norm).

    Why: in training the residual stream soon carries one direction shared by every token; the
    queries then all point the same way and pick the same few keys (key-usage collapse; see
    "Key usage by query norm" in benchmarks/RESULTS.md). Per-token norms (QK-norm) cannot remove
    what is shared across tokens; statistics over tokens can.
    """

    NONE = "none"            # query as is (reference)
    BATCHNORM = "batchnorm"  # Lample et al. 2019: per-feature batch mean/var, learnable affine
    CENTER = "center"        # subtract a running per-feature mean (no variance, no affine)

    def __str__(self) -> str:
        return self.value


@dataclass
class MemoryConfig(_Section):
    """Memory / Memory+ layer hyper-parameters (Berges et al. 2025; reference defaults)."""

    layers: Optional[list[int]] = opt(
        None, "0-based indices of the layers whose FFN becomes a memory layer; "
        "default: three layers evenly spaced and centred (24 layers -> 4 12 20); [] for a dense model")
    n_keys: int = opt(1024, "sub-keys per half and head; the table has n_keys**2 values")
    heads: int = opt(4, "memory heads; each selects k values")
    k: int = opt(32, "values selected per head (top-k of the product keys)")
    k_dim: int = opt(512, "query/key width per head; split into two halves of k_dim/2")
    v_dim: Optional[int] = opt(None, "value width; default: the model's hidden size")
    qk_norm: bool = opt(True, "RMS-normalise query halves (learnable gain) and sub-keys, and scale "
                        "scores by 1/sqrt(k_dim/2); off gives the reference's raw dot products")
    qk_norm_eps: float = opt(1e-6, "epsilon of the QK-norm")
    query_norm: QueryNorm = opt(
        QueryNorm.BATCHNORM, "normalise the query across tokens before the search: 'batchnorm' (batch "
        "mean/var over this micro-batch's tokens of the TP group, running statistics in eval), "
        "'center' (subtract a running mean, cheapest), 'none' (reference)")
    query_norm_momentum: float = opt(0.1, "weight of each optimizer step's statistics in the "
                                     "running mean/var (bias-corrected EMA; all tokens of the step)")
    query_norm_eps: float = opt(1e-5, "epsilon added to the variance of the query BatchNorm")
    plus: bool = opt(True, "Memory+: out = W2(y * silu(W1 x)); off: plain memory, out = y")
    value_lr_mult: float = opt(10.0, "learning-rate multiplier of the value table's param group")
    value_init_std: Optional[float] = opt(None, "std of the value init; default v_dim**-0.5")
    seed: int = opt(4321, "seed of the value-table init (identical on every stage holding a copy)")
    search: str = opt("bf16", "product-key search on CUDA (CPU runs the fp32 reference): 'bf16' "
                      "(bf16 tensor-core scores, candidates re-scored exactly in fp32; the "
                      "fastest), 'torch' (fp32 matmul + topk reference), 'triton' (fused fp32 "
                      "search)")
    search_select: str = opt("threshold", "bf16 search: how each half's candidates are picked "
                             "from the bf16 scores: 'threshold' (one pass, bisection in "
                             "registers) or 'topk' (torch.topk)")
    search_rescore: str = opt("fused", "bf16 search: how the candidates are re-scored in fp32: "
                              "'fused' (gather, dot and top-k in one kernel) or 'loop' (a serial "
                              "kernel, then torch.topk)")

    @property
    def num_values(self) -> int:
        return self.n_keys * self.n_keys

    @property
    def bag_size(self) -> int:
        """Value rows summed per token (heads * k)."""
        return self.heads * self.k

    def value_dim(self, hidden_size: int) -> int:
        return self.v_dim if self.v_dim is not None else hidden_size

    def resolved_layers(self, num_layers: int) -> list[int]:
        return default_memory_layers(num_layers) if self.layers is None else list(self.layers)

    def validate(self, num_layers: int, hidden_size: int, tp_size: int = 1) -> None:
        """Raise one ConfigError for the first invalid field."""
        for name in ("n_keys", "heads", "k", "k_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"memory.{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.n_keys:
            raise ConfigError(f"memory.k={self.k} exceeds memory.n_keys={self.n_keys}: "
                              "top-k per half needs at least k sub-keys")
        if self.k_dim % 2:
            raise ConfigError(f"memory.k_dim={self.k_dim} must be even (split into two halves)")
        if self.num_values >= 2**31:
            raise ConfigError(f"memory.n_keys={self.n_keys}: n_keys**2 must stay below 2**31")
        layers = self.resolved_layers(num_layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"memory.layers {bad} out of range: the model has layers 0..{num_layers - 1}")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"memory.layers {layers} has duplicates")
        v_dim = self.value_dim(hidden_size)
        if v_dim < 1:
            raise ConfigError(f"memory.v_dim must be >= 1, got {v_dim}")
        if not self.plus and v_dim != hidden_size:
            raise ConfigError(f"plain memory (memory.plus off) adds the values to the residual: "
                              f"memory.v_dim={v_dim} must equal hidden_size={hidden_size}")
        if v_dim % tp_size:
            raise ConfigError(f"memory.v_dim={v_dim} is not divisible by the tensor-parallel size "
                              f"{tp_size}: the value table is split along its width")
        if self.value_lr_mult <= 0:
            raise ConfigError(f"memory.value_lr_mult must be > 0, got {self.value_lr_mult}")
        try:
            QueryNorm(self.query_norm)
        except ValueError:
            raise ConfigError(f"memory.query_norm={self.query_norm!r}: choose one of "
                              f"{', '.join(q.value for q in QueryNorm)}") from None
        for name, choices in (("search", ("bf16", "torch", "triton")),
                              ("search_select", ("threshold", "topk")),
                              ("search_rescore", ("fused", "loop"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"memory.{name}={getattr(self, name)!r}: choose one of "
                                  f"{', '.join(choices)}")
        if not 0 < self.query_norm_momentum <= 1:
            raise ConfigError(f"memory.query_norm_momentum must be in (0, 1], got {self.query_norm_momentum}")
        if self.query_norm_eps <= 0:
            raise ConfigError(f"memory.query_norm_eps must be > 0, got {self.query_norm_eps}")


@dataclass
class ModelConfig(_Section):
    """GPT body (Megatron-Core GPTModel, local spec: RMSNorm, SwiGLU, RoPE, no linear biases)."""

    num_layers: int = opt(6, "transformer layers")
    hidden_size: int = opt(128, "model width d")
    num_attention_heads: int = opt(4, "attention heads")
    num_query_groups: Optional[int] = opt(None, "key/value heads of grouped-query attention "
                                          "(each serves num_attention_heads / groups query heads); "
                                          "default: one per head (multi-head attention)")
    attention: str = opt("sdpa", "core attention: 'sdpa' (torch scaled_dot_product_attention: "
                         "flash / cuDNN kernels on GPU) or 'local' (Megatron's unfused reference)")
    transformer_impl: str = opt("local", "dense layers from Megatron's 'local' spec (runs on CPU "
                                "and any GPU) or its 'transformer_engine' spec (TE's fused "
                                "norm+linear and attention kernels; needs CUDA and an "
                                "importable transformer_engine; memory layers get their own "
                                "TE norm, as the TE spec fuses the pre-MLP norm into FC1)")
    ffn_hidden_size: Optional[int] = opt(None, "SwiGLU inner width of the dense FFNs; default "
                                         "multiple of 256 near 8/3 d (the Llama rule)")
    seq_length: int = opt(128, "tokens per sample")
    vocab_size: Optional[int] = opt(None, "vocabulary; default: the tokenizer's, padded to 128")
    init_std: float = opt(0.02, "std of the dense weights' init")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    rope_base: int = opt(10000, "RoPE base")

    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return max(256, int(8 * self.hidden_size / 3 + 255) // 256 * 256)

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("model.hidden_size / num_attention_heads must be even for RoPE")
        if self.num_query_groups is not None and (
                self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups):
            raise ConfigError(f"model.num_query_groups={self.num_query_groups} must be >= 1 and "
                              f"divide model.num_attention_heads={self.num_attention_heads}")
        if self.attention not in ("sdpa", "local"):
            raise ConfigError(f"model.attention={self.attention!r}: choose 'sdpa' or 'local'")
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise ConfigError(f"model.transformer_impl={self.transformer_impl!r}: choose 'local' "
                              "or 'transformer_engine'")
        if (self.transformer_impl == "transformer_engine"
                and importlib.util.find_spec("transformer_engine") is None):
            raise ConfigError("model.transformer_impl='transformer_engine' needs Transformer "
                              "Engine (pip install transformer-engine[pytorch], CUDA only); it is "
                              "not importable here: use 'local'")


@dataclass
class ParallelConfig(_Section):
    """Layout of the ranks; data-parallel size = world size / (tp * pp)."""

    tp: int = opt(1, "tensor-parallel size (the value table is split along its width)")
    pp: int = opt(1, "pipeline-parallel size")
    sequence_parallel: bool = opt(False, "Megatron sequence parallelism (needs tp > 1)")
    memory_parallel_size: Optional[int] = opt(
        None, "ranks the value table's columns are split over: the TP group and "
        "memory_parallel_size/tp data-parallel ranks (a multiple of tp dividing tp x DP); the "
        "table's per-GPU bytes fall as it grows, so the largest table grows with the cluster "
        "(docs/training.md); default: tp (split over TP only)")

    def memory_parallel(self) -> int:
        """M: the size of the group holding one copy of the value table (TP by default)."""
        return self.memory_parallel_size or self.tp

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"parallel.tp and parallel.pp must be >= 1, got {self.tp}, {self.pp}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
        if model.num_attention_heads % self.tp:
            raise ConfigError(f"model.num_attention_heads={model.num_attention_heads} is not "
                              f"divisible by parallel.tp={self.tp}")
        if model.query_groups() % self.tp:
            raise ConfigError(f"model.num_query_groups={model.query_groups()} is not divisible by "
                              f"parallel.tp={self.tp} (key/value heads are split over TP)")
        if model.num_layers % self.pp:
            raise ConfigError(f"model.num_layers={model.num_layers} is not divisible by "
                              f"parallel.pp={self.pp}")
        if world_size is not None and world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if world_size is not None and world_size % (self.tp * self.pp):
            raise ConfigError(f"world size {world_size} is not divisible by tp*pp = "
                              f"{self.tp * self.pp}")
        mp = self.memory_parallel_size
        if mp is not None and (mp < 1 or mp % self.tp):
            raise ConfigError(f"parallel.memory_parallel_size={mp} must be a multiple of "
                              f"parallel.tp={self.tp} (the memory group is the TP group and "
                              f"memory_parallel_size/tp data-parallel ranks)")
        if mp is not None and world_size is not None:
            dp = world_size // (self.tp * self.pp)
            if (self.tp * dp) % mp:
                raise ConfigError(f"parallel.memory_parallel_size={mp} does not divide tp x DP = "
                                  f"{self.tp} x {dp} = {self.tp * dp}: choose a divisor that is a "
                                  f"multiple of tp ({_multiples(self.tp, self.tp * dp)})")


@dataclass
class TrainConfig(_Section):
    """Optimisation and schedule (AdamW as in the reference: betas 0.9/0.95, wd 0.1)."""

    steps: int = opt(300, "optimizer steps")
    micro_batch_size: int = opt(8, "samples per micro-batch per data-parallel rank")
    global_batch_size: Optional[int] = opt(None, "samples per step; default micro_batch_size x DP")
    lr: float = opt(3e-3, "peak learning rate of the dense parameters")
    min_lr: float = opt(3e-4, "final learning rate after cosine decay")
    warmup_steps: Optional[int] = opt(None, "linear warm-up steps; default 10% of the steps")
    weight_decay: float = opt(0.1, "decoupled weight decay (not on biases and norm gains)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    fused_adam: bool = opt(True, "torch's fused AdamW (one pass over the optimizer state per step) "
                           "instead of its foreach default (about ten passes; the value table "
                           "makes that the largest fixed cost of a step); Apex/TE optimizers are "
                           "fused already")
    clip_grad: float = opt(1.0, "gradient-norm clip, applied separately to the value table and to "
                           "the other parameters (as the reference); 0 turns clipping off")
    distributed_optimizer: Optional[bool] = opt(None, "shard optimizer state over data-parallel "
                                                "ranks (Megatron distributed optimizer); default: on when DP > 1")
    overlap_comm: Optional[bool] = opt(None, "overlap the data-parallel gradient reduction with "
                                       "backward (and, with the distributed optimizer, the "
                                       "parameter all-gather with forward); default: on with CUDA")
    defer_table_grad: Optional[bool] = opt(None, "add the value table's gradient in one sorted "
                                           "pass over every lookup of the step (all micro-batches "
                                           "and memory layers) instead of one fp32 main_grad "
                                           "read-modify-write pass per lookup; keeps each lookup's "
                                           "output gradient until then (up to "
                                           "defer_table_grad_gib); default: on with CUDA (Triton "
                                           "lookups; measured faster than per-lookup passes on "
                                           "H200, see benchmarks/RESULTS.md)")
    defer_table_grad_gib: float = opt(1.0, "with defer_table_grad: GiB of recorded output "
                                      "gradients, indices and weights at which the table's "
                                      "gradient is folded before the step ends, bounding that "
                                      "memory at large global batches (twice this during a fold)")
    cuda_graph_memory: Optional[bool] = opt(None, "capture each memory layer's forward and "
                                            "backward in CUDA graphs after two eager passes and "
                                            "replay them (megatron_memory/model/graphs.py): at "
                                            "micro-batch 1 a step is bound by the host's kernel "
                                            "launches, ~130 per memory-layer pass; default: on "
                                            "with CUDA, bf16 and pipeline size 1 (measured "
                                            "faster than eager at micro-batch 1 on H200 and "
                                            "as fast at micro-batch 4, see "
                                            "benchmarks/RESULTS.md)")
    ddp_bucket_size: Optional[int] = opt(None, "parameters per data-parallel communication bucket "
                                         "(Megatron-LM's --ddp-bucket-size); default megatron-core's "
                                         "max(40M, 1M x DP)")
    recompute_activations: bool = opt(False, "recompute attention and dense-FFN activations in "
                                      "backward (memory layers are not recomputed: a second "
                                      "lookup costs more than the activations it saves)")
    seed: int = opt(1234, "seed of the dense init and data order")
    deterministic: bool = opt(False, "bit-reproducible GPU training, as Megatron-LM's "
                              "--deterministic-mode: torch's deterministic algorithms (slower "
                              "attention backward and scatters), NCCL_ALGO=Ring, "
                              "CUBLAS_WORKSPACE_CONFIG=:4096:8, NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 "
                              "where unset (other values are refused); the memory lookup always "
                              "takes its segment backward then. CPU runs are bit-reproducible for "
                              "a fixed seed, layout and thread count without it "
                              "(docs/reproducibility.md)")
    bf16: Optional[bool] = opt(None, "bf16 mixed precision; default: on with CUDA, off on CPU")
    log_interval: int = opt(10, "steps between progress lines and TensorBoard scalars")
    key_usage: bool = opt(True, "log each memory layer's key-usage health per log window: share of "
                          "values used, effective usage, cumulative share, shared-direction share "
                          "of its input and query, hit-count histogram")
    key_usage_span_tokens: int = opt(10_000_000, "tokens over which the cumulative share of values "
                                     "touched is counted before it restarts")
    peak_tflops: Optional[float] = opt(None, "per-GPU bf16 peak for MFU; default: by GPU name "
                                       "(H100/H200 989), none on CPU")
    profile_step: Optional[int] = opt(None, "record this step with the torch profiler; rank 0 "
                                      "prints its kernels by time (the step is left out of the "
                                      "throughput figures)")
    eval_iters: int = opt(4, "validation micro-batches per evaluation (0: none)")
    eval_interval: int = opt(0, "steps between validations during training (0: only at the end)")
    tensorboard_dir: Optional[str] = opt(None, "TensorBoard event directory; default a new "
                                         "runs/<date-time> per run ('' to disable)")
    wandb_project: Optional[str] = opt(None, "Weights & Biases project to log to (needs the wandb "
                                       "package); default: no W&B logging")
    wandb_exp_name: Optional[str] = opt(None, "W&B run name; default: the TensorBoard run name")
    save: Optional[str] = opt(None, "checkpoint directory: iter_NNNNNNN/ per save and a tracker "
                              "file naming the latest; saved every save_interval steps and at the end")
    save_interval: Optional[int] = opt(None, "steps between checkpoints (default: only at the end)")
    keep_last: Optional[int] = opt(None, "keep only the newest K checkpoints in --save (default: all)")
    load: Optional[str] = opt(None, "checkpoint to start from: a --save directory (its latest "
                              "iteration) or one iter_* directory; resumes model, optimizer, LR "
                              "schedule, data position and RNG; TP/PP/DP may differ (the optimizer "
                              "kind, distributed or not, follows the checkpoint)")
    finetune: bool = opt(False, "with --load: take only the weights, start at step 0 with a fresh "
                         "optimizer and schedule")
    exit_interval: Optional[int] = opt(None, "stop (after saving) once the step is a multiple of this")
    checkpoint_integrity: bool = opt(True, "write SHA-256 hashes of every checkpoint file and check "
                                     "them on load (one extra read pass over the files)")
    fully_parallel_save: bool = opt(True, "spread the writes of what DP ranks hold in common (the "
                                    "weights, the gathered optimizer state) over the DP ranks "
                                    "(megatron-core's FullyParallelSaveStrategyWrapper, as Megatron-"
                                    "LM's --ckpt-fully-parallel-save); off: DP rank 0 writes it all")
    fully_parallel_load: bool = opt(True, "read what DP ranks need in common once, spread over the "
                                    "DP ranks, and broadcast it (megatron-core's FullyParallelLoad"
                                    "StrategyWrapper, as Megatron-LM's --ckpt-fully-parallel-load); "
                                    "off: every DP rank reads all it needs from storage")
    checkpoint_write_threads: int = opt(4, "threads each rank writes its checkpoint files with "
                                        "(megatron-core's torch_dist thread_count; one file per "
                                        "thread). Why 4: one thread writes ~1 GiB/s of tensors "
                                        "(torch.save into a file stream), below memory and NVMe "
                                        "bandwidth; 4 saved a 6.1 GB state in 12.8 s instead of "
                                        "22.3 s on a 2-core CPU machine")
    async_save: bool = opt(False, "write checkpoints in the background (megatron-core async "
                           "strategy): training goes on while the files are written; the tracker "
                           "moves once every rank has finished")

    def warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps

    def validate(self) -> None:
        if self.steps < 1 or self.micro_batch_size < 1:
            raise ConfigError("train.steps and train.micro_batch_size must be >= 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0; got lr={self.lr}, "
                              f"min_lr={self.min_lr}")
        if not 0 <= self.warmup() <= self.steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be in 0..steps")
        if self.log_interval < 1:
            raise ConfigError("train.log_interval must be >= 1")
        if self.checkpoint_write_threads < 1:
            raise ConfigError(f"train.checkpoint_write_threads must be >= 1, got "
                              f"{self.checkpoint_write_threads}")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ConfigError(f"train.ddp_bucket_size must be >= 1, got {self.ddp_bucket_size}")
        if not self.defer_table_grad_gib > 0:
            raise ConfigError(f"train.defer_table_grad_gib must be > 0, got {self.defer_table_grad_gib}")
        if self.eval_iters < 0 or self.eval_interval < 0:
            raise ConfigError(f"train.eval_iters and train.eval_interval must be >= 0, got "
                              f"{self.eval_iters}, {self.eval_interval}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.key_usage_span_tokens < 1:
            raise ConfigError(f"train.key_usage_span_tokens must be >= 1, got {self.key_usage_span_tokens}")
        for name in ("save_interval", "keep_last", "exit_interval", "profile_step"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.profile_step is not None and self.profile_step > self.steps:
            raise ConfigError(f"train.profile_step={self.profile_step} is after the last step "
                              f"(train.steps={self.steps}): that profile would never be taken")
        if self.finetune and not self.load:
            raise ConfigError("train.finetune needs train.load (the checkpoint to take weights from)")
        if self.deterministic:
            try:
                determinism.check_env()
            except ValueError as err:
                raise ConfigError(str(err)) from None


@dataclass
class DataConfig(_Section):
    """Training data: Megatron indexed datasets (.bin/.idx), or the embedded default corpus."""

    data_path: Optional[list[str]] = opt(None, "indexed-dataset prefixes (weight prefix weight "
                                         "prefix ... or prefixes); default: the embedded corpus")
    tokenizer: Optional[str] = opt(None, "local path of a Hugging Face tokenizer.json / directory "
                                   "(required with data_path)")
    split: str = opt("98,2,0", "train,valid,test split of the documents")
    cache_dir: Optional[str] = opt(None, "where dataset index caches go; default next to the data")


@dataclass
class RunConfig(_Section):
    """One training run: the sections below, each validated before any process starts."""

    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Inverse of ``dataclasses.asdict`` (e.g. the run config stored in a checkpoint); fields
        this version does not know are an error, missing ones take their defaults."""
        sections = {}
        for f in dataclasses.fields(cls):
            sec_cls, values = f.default_factory, dict(d.get(f.name, {}))
            known = {g.name for g in dataclasses.fields(sec_cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(f"unknown {f.name} fields {unknown}")
            sections[f.name] = sec_cls(**values)
        return cls(**sections)

    def validate(self, world_size: Optional[int] = None) -> "RunConfig":
        self.model.validate()
        self.parallel.validate(self.model, world_size)
        self.memory.validate(self.model.num_layers, self.model.hidden_size, self.parallel.tp)
        v_dim, mp = self.memory.value_dim(self.model.hidden_size), self.parallel.memory_parallel()
        if v_dim % mp:
            raise ConfigError(f"memory.v_dim={v_dim} is not divisible by "
                              f"parallel.memory_parallel_size={mp}: the value table is split "
                              f"along its width over the memory-parallel group")
        self.train.validate()
        if self.train.cuda_graph_memory and self.parallel.pp > 1:
            raise ConfigError("train.cuda_graph_memory needs parallel.pp = 1: a pipeline schedule "
                              "keeps several micro-batches of a layer in flight, and a layer's "
                              "graphs serve one at a time")
        if self.data.data_path and not self.data.tokenizer:
            raise ConfigError("data.data_path needs data.tokenizer (a local tokenizer path)")
        if world_size is not None and self.train.global_batch_size is not None:
            dp = world_size // (self.parallel.tp * self.parallel.pp)
            if self.train.global_batch_size % (self.train.micro_batch_size * dp):
                raise ConfigError(f"train.global_batch_size={self.train.global_batch_size} is not "
                                  f"a multiple of micro_batch_size x DP = "
                                  f"{self.train.micro_batch_size * dp}")
        return self


def replace(cfg, **changes):
    """dataclasses.replace that also accepts nested 'section.field' keys."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, val in changes.items():
        if "." in key:
            sec, rest = key.split(".", 1)
            nested.setdefault(sec, {})[rest] = val
        else:
            flat[key] = val
    for sec, sub in nested.items():
        flat[sec] = replace(getattr(cfg, sec), **sub)
    return dataclasses.replace(cfg, **flat)


@dataclass(frozen=True)
class Environment:
    """What a run's derived defaults depend on besides its flags."""

    world_size: int = 1
    cuda: bool = False
    # The optimizer kind (distributed or not) a resumed checkpoint's state was saved with, which
    # the run must keep (``checkpoint.optimizer_kind`` decides it); None: no optimizer state.
    resumed_distributed_optimizer: Optional[bool] = None


def _thawed_copy(cfg: RunConfig) -> RunConfig:
    r = copy.deepcopy(cfg)
    for section in (r, *(getattr(r, f.name) for f in dataclasses.fields(r))):
        section.__dict__.pop("_frozen", None)
    return r


def resolve(cfg: RunConfig, env: Environment) -> RunConfig:
    """The one place where defaults are derived: a validated, frozen copy of ``cfg`` with every
    ``None`` that means "derive it" replaced by what the run will use. The Trainer,
    ``--print-config``, the memory calculator and preflight all read this; raises ConfigError."""
    cfg.validate(env.world_size)
    r = _thawed_copy(cfg)  # the caller's config is left as it was
    m, mem, p, t = r.model, r.memory, r.parallel, r.train
    dp = env.world_size // (p.tp * p.pp)
    m.ffn_hidden_size = m.ffn_size()
    m.num_query_groups = m.query_groups()
    mem.layers = mem.resolved_layers(m.num_layers)
    mem.v_dim = mem.value_dim(m.hidden_size)
    mem.value_init_std = mem.value_init_std or mem.v_dim ** -0.5
    mem.query_norm = QueryNorm(mem.query_norm)
    p.memory_parallel_size = p.memory_parallel()
    t.global_batch_size = t.global_batch_size or t.micro_batch_size * dp
    t.warmup_steps = t.warmup()
    t.bf16 = env.cuda if t.bf16 is None else t.bf16
    if t.bf16 and not env.cuda:
        raise ConfigError("train.bf16 needs CUDA; on CPU train in fp32 (--no-bf16)")
    if m.transformer_impl == "transformer_engine" and not env.cuda:
        raise ConfigError("model.transformer_impl='transformer_engine' needs CUDA; on CPU use 'local'")
    if t.cuda_graph_memory and not env.cuda:
        raise ConfigError("train.cuda_graph_memory needs CUDA (CUDA graphs); on CPU leave it off")
    # Graphs by default where they are verified and pay: CUDA, bf16, and one pipeline stage (a
    # pipeline schedule keeps several micro-batches of a layer in flight; one pair of graphs
    # serves one at a time).
    if t.cuda_graph_memory is None:
        t.cuda_graph_memory = env.cuda and t.bf16 and p.pp == 1
    # Overlapped DP communication and the deferred table gradient pay on GPUs (Triton lookups);
    # on CPU they only add bookkeeping.
    if t.overlap_comm is None:
        t.overlap_comm = env.cuda
    if t.defer_table_grad is None:
        t.defer_table_grad = env.cuda
    if env.resumed_distributed_optimizer is not None:
        t.distributed_optimizer = env.resumed_distributed_optimizer
    elif t.distributed_optimizer is None:
        t.distributed_optimizer = dp > 1
    if p.memory_parallel_size > p.tp and t.bf16 and not t.distributed_optimizer:
        raise ConfigError(f"parallel.memory_parallel_size={p.memory_parallel_size} > parallel.tp "
                          f"needs the distributed optimizer in bf16 (the checkpoint of megatron-"
                          f"core's non-distributed bf16 optimizer is not supported there): drop "
                          f"--no-distributed-optimizer")
    r._freeze()
    return r


def with_vocab(resolved: RunConfig, vocab_size: int) -> RunConfig:
    """``resolved`` with ``model.vocab_size`` filled in: the one derived value that needs the
    tokenizer (or a checkpoint) and so is settled after ``resolve``. Frozen as ``resolved``."""
    if not resolved.resolved:
        raise ValueError("with_vocab takes resolve()'s output")
    r = _thawed_copy(resolved)
    r.model.vocab_size = vocab_size
    r._freeze()
    return r
