# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Pre-training loop on Megatron-Core: GPTModel + Memory+, DDP, Megatron optimizer and
schedule, pipeline schedules (``get_forward_backward_func``), indexed datasets, TensorBoard.

Runs on CPU (gloo, shims from ``cpu.py``) and on GPUs (NCCL), single process or under
torchrun / deepspeed / SLURM launchers (which set RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from torch.profiler import ProfilerActivity, profile

from megatron_memory import determinism
from megatron_memory.checkpointing import checkpoint
from megatron_memory.training import data, step_profile
from megatron_memory.model import parallel
from megatron_memory.config import (ConfigError, Environment, RunConfig, padded_vocab, resolve,
                                    with_vocab)
from megatron_memory.training.cpu import on_cpu_shims
from megatron_memory.model.graphs import graph_memory_layers, release_memory_layer_graphs
from megatron_memory.model.layer import VALUE_GRAD_NORM_GROUP
from megatron_memory.training.metrics import (
    KeyUsage,
    UsageStats,
    flops_per_token,
    format_key_usage,
    pack_usage,
    track_key_usage,
    peak_flops,
    unpack_usage,
    usage_scalars,
)
from megatron_memory.model.gpt import MemoryGPTModel, optimizer_overrides
from megatron_memory.training.optim import configure_adam
from megatron_memory.training.stopping import StopSignals, agreed_stop
from megatron_memory.training.tracking import Tracker


def init_distributed() -> torch.device:
    """Join (or create, for a plain single process) the default process group."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:  # started by torchrun / deepspeed / srun wrappers
            dist.init_process_group(backend)
        else:  # a plain process: a world of one, with an in-memory store (no port to collide)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def transformer_config(cfg: RunConfig, bf16: bool):
    """Megatron TransformerConfig of the GPT body (local spec: RMSNorm, SwiGLU, RoPE, no biases)."""
    m, p = cfg.model, cfg.parallel
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_size(),
        num_attention_heads=m.num_attention_heads, num_query_groups=m.query_groups(),
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm", layernorm_epsilon=m.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, init_method_std=m.init_std,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        sequence_parallel=p.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
        use_cpu_initialization=on_cpu,
        recompute_granularity="selective" if cfg.train.recompute_activations else None,
        recompute_modules=["core_attn", "mlp"] if cfg.train.recompute_activations else None,
        # Fused paths need CUDA extensions; batch_p2p_comm on gloo swaps the activations it sends.
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        batch_p2p_comm=not on_cpu, batch_p2p_sync=not on_cpu,
        # Megatron's deterministic choices (its vocabulary embedding's backward, TE attention)
        deterministic_mode=cfg.train.deterministic,
    )


@dataclass
class History:
    """What the run measured, step by step (for the summary, tests and TensorBoard)."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)        # all but the value table
    value_grad_norms: list[float] = field(default_factory=list)  # the value table's own
    tokens: int = 0
    seconds: float = 0.0
    valid_loss: Optional[float] = None
    key_usage: dict = field(default_factory=dict)  # last window: {layer: metrics.UsageStats}
    key_usage_log: list = field(default_factory=list)  # every window: (step, {layer: UsageStats})
    step_seconds: list[float] = field(default_factory=list)
    peak_gib: dict = field(default_factory=dict)   # {pipeline stage: max over its ranks}, CUDA only
    first_step: int = 1                            # > 1 when resumed from a checkpoint
    stopped_by: Optional[str] = None               # the signal that ended the run early, if any
    saved: list[str] = field(default_factory=list)  # checkpoint directories written

    def steady_tokens_per_s(self, tokens_per_step: int, skip: int = 3) -> float:
        """Throughput without the first ``skip`` steps (Triton compilation, allocator warm-up)."""
        times = self.step_seconds[skip:] if len(self.step_seconds) > skip else self.step_seconds
        return tokens_per_step * len(times) / max(sum(times), 1e-9)


def _fmt_time(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}" if sec >= 3600 else f"{sec // 60}:{sec % 60:02d}"


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output.view(-1).float() * mask) / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}  # clone: the schedule divides in place


def forward_step(device, data_iterator, model):
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(_loss_func, batch["loss_mask"])


class Trainer:
    """Builds everything from a validated RunConfig; ``fit()`` trains and returns a History."""

    @on_cpu_shims
    def __init__(self, cfg: RunConfig, log=print):
        """``cfg``: the user's config; the Trainer runs ``resolve(cfg, its environment)``, kept
        as ``self.cfg`` (frozen): every derived default is read from there."""
        if cfg.train.deterministic:  # before NCCL, cuBLAS and TE start: they read the environment
            determinism.enable()
        self.device = init_distributed()
        self.world_size = dist.get_world_size()
        cfg.validate(self.world_size)  # before reading a checkpoint named in it
        self.log = log
        self.iteration = 0
        self.checkpoint_seconds: dict[str, float] = {}  # last load / save, wall seconds
        self.checkpoint_bytes_read = 0  # tensor bytes this rank read from storage at the last load
        self.async_queue = AsyncCallsQueue() if cfg.train.async_save else None
        # Before any compute: the checkpoint to start from must be readable, --save safe to use.
        self.resume = checkpoint.peek(cfg.train.load) if cfg.train.load else None
        if cfg.train.save:
            root = self.resume[0].parent if self.resume and checkpoint.read_tracker(
                self.resume[0].parent) is not None else None
            checkpoint.check_save_dir(cfg.train.save, root)
        p = cfg.parallel
        dp = self.world_size // (p.tp * p.pp)
        resumed_kind = (checkpoint.optimizer_kind(cfg.train.distributed_optimizer, dp, self.resume,
                                                  cfg.train.finetune) if self.resume else None)
        cfg = self.cfg = resolve(cfg, Environment(self.world_size, self.device.type == "cuda",
                                                  resumed_kind))
        parallel.initialize_memory_parallel(p.tp, p.pp, cfg.parallel.memory_parallel_size)
        self.rank = dist.get_rank()
        self.dp = ps.get_data_parallel_world_size()
        t = cfg.train
        self.bf16, self.cuda_graphs, self.dist_opt = t.bf16, t.cuda_graph_memory, t.distributed_optimizer
        self.overlap, self.defer_table_grad = t.overlap_comm, t.defer_table_grad
        if self.resume and self.dist_opt != (self.dp > 1) and self.rank == 0:
            log(f"optimizer: {'distributed' if self.dist_opt else 'non-distributed'} at DP={self.dp}, "
                f"the kind checkpoint {self.resume[0].name} was saved with (its state format)")
        self.global_batch = t.global_batch_size
        self.num_micro = self.global_batch // (t.micro_batch_size * self.dp)
        self.tokens_per_step = self.global_batch * cfg.model.seq_length
        torch.manual_seed(cfg.train.seed)
        model_parallel_cuda_manual_seed(cfg.train.seed)
        self._build_data()
        self._build_model()
        self._build_optimizer()
        if self.resume:
            self._load(*self.resume)
        self.tracker = Tracker(cfg, self.rank, self.world_size)  # TensorBoard / W&B, last rank writes

    def _build_data(self):
        d, t = self.cfg.data, self.cfg.train
        if d.data_path:
            prefixes, tok_path = list(d.data_path), d.tokenizer
        else:  # rank 0 writes the embedded corpus once; the others wait, then read it
            if self.rank == 0:
                data.ensure_default_data()
            dist.barrier()
            prefix, tok_path = data.ensure_default_data()
            prefixes = [prefix]
        self.tokenizer = data.Tokenizer(tok_path)
        evals = 1 + (t.steps // t.eval_interval if t.eval_interval else 0)
        samples = (t.steps * self.global_batch, max(1, t.eval_iters * evals) * t.micro_batch_size * self.dp)
        train, valid = data.build_gpt_datasets(prefixes, self.tokenizer, self.cfg.model.seq_length,
                                               t.seed, d.split, samples, d.cache_dir)
        dp_rank = ps.get_data_parallel_rank()
        self.train_iter = data.MicroBatches(train, t.micro_batch_size, self.dp, dp_rank)
        self.valid_iter = data.MicroBatches(valid, t.micro_batch_size, self.dp, dp_rank) if valid else None

    def _build_model(self):
        cfg = self.cfg
        self.tconfig = transformer_config(cfg, self.bf16)
        vocab = cfg.model.vocab_size or self._checkpoint_vocab() or padded_vocab(
            self.tokenizer.vocab_size, cfg.parallel.tp)
        if vocab < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size}")
        self.cfg = cfg = with_vocab(cfg, vocab)
        if self.resume:  # before building: a different model is one clear error, not a traceback
            checkpoint.check_architecture(self.resume[1]["architecture"],
                                          checkpoint.architecture(cfg, vocab), self.resume[0])
        model = MemoryGPTModel(self.tconfig, cfg.memory, vocab_size=vocab,
                               max_sequence_length=cfg.model.seq_length,
                               pre_process=ps.is_pipeline_first_stage(),
                               post_process=ps.is_pipeline_last_stage(),
                               rotary_base=cfg.model.rope_base, attention=cfg.model.attention,
                               transformer_impl=cfg.model.transformer_impl)
        model.to(self.device)
        if cfg.train.key_usage:
            track_key_usage(model, self.device, cfg.train.key_usage_span_tokens)
        if self.cuda_graphs:
            graph_memory_layers(model)
        self.vocab_size = vocab
        self.raw_model = model
        if self.bf16:
            model = Float16Module(self.tconfig, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=self.overlap,
            overlap_param_gather=self.overlap and self.dist_opt,
            use_distributed_optimizer=self.dist_opt, bucket_size=cfg.train.ddp_bucket_size)
        self.model = parallel.MemoryDDP(self.tconfig, ddp_config, model,
                                        defer_table_grad=self.defer_table_grad,
                                        defer_max_bytes=int(cfg.train.defer_table_grad_gib * 2**30))
        self.tconfig.finalize_model_grads_func = parallel.finalize_memory_grads
        if self.overlap:  # as Megatron-LM's training loop wires its schedules
            # Only the last micro-batch's backward marks gradients ready; the others accumulate.
            self.tconfig.no_sync_func = self.model.no_sync
            self.tconfig.grad_sync_func = self.model.start_grad_sync
            if ddp_config.overlap_param_gather:
                self.tconfig.param_sync_func = self.model.start_param_sync

    @on_cpu_shims
    def sync_params(self) -> None:
        """With overlapped parameter all-gather, the distributed optimizer's last update reaches
        the model's bf16/fp32 weights only in the next forward: gather them now (before a save,
        at the end of training). A no-op otherwise."""
        if self.model.ddp_config.overlap_param_gather:
            self.model.start_param_sync(force_sync=True)

    def _checkpoint_vocab(self) -> Optional[int]:
        """The padded vocabulary a resumed checkpoint was trained with (the TP padding rule
        would otherwise change it when the TP size changes)."""
        if not self.resume:
            return None
        vocab = self.resume[1]["architecture"]["model.vocab_size"]
        if vocab % self.cfg.parallel.tp:
            raise ConfigError(f"checkpoint {self.resume[0]} has a vocabulary of {vocab}, not "
                              f"divisible by parallel.tp={self.cfg.parallel.tp}")
        return vocab

    def _load(self, target: Path, common: dict) -> None:
        t = self.cfg.train
        if t.finetune:
            common = {**common, "iteration": 0, "scheduler": None}
        elif common.get("iteration", 0) >= t.steps:
            raise ConfigError(f"checkpoint {target} is at step {common['iteration']}, which already "
                              f"reaches train.steps={t.steps}: raise --steps to train further, or "
                              f"pass --finetune to start a new schedule from its weights")
        start = time.time()
        loaded = checkpoint.load(self.checkpoint_state(), target, common)
        self.checkpoint_seconds["load"] = time.time() - start
        self.checkpoint_bytes_read = loaded.bytes_read
        per_rank = self.cfg.train.micro_batch_size * self.dp
        if loaded.progress["consumed_samples"] % per_rank:
            raise ConfigError(f"checkpoint {target} consumed {loaded.progress['consumed_samples']} "
                              f"samples, not a multiple of micro_batch_size x DP = {per_rank}")
        self.load_state_dict(loaded.progress)
        if self.iteration == 0:  # weights only: the optimizer's fp32 copies must follow them
            self.optimizer.reload_model_params()
            what = "weights"
        else:
            # the loaded param groups replaced ours: choose the Adam implementation again, and
            # give each parameter its own step (megatron restores one shared tensor)
            configure_adam(self.optimizer, t.fused_adam)
            what = f"step {self.iteration} (model, optimizer, schedule, data position)"
        if self.rank == 0:
            spread = self.cfg.train.fully_parallel_load and self.dp > 1
            share = f", fully parallel over DP={self.dp}" if spread else ""
            self.log(f"loaded {what} from {target} in {self.checkpoint_seconds['load']:.1f} s "
                     f"(rank 0 read {self.checkpoint_bytes_read / 2**30:.3f} GiB{share})")

    def _build_optimizer(self):
        t = self.cfg.train
        oc = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                             adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=1e-8,
                             clip_grad=t.clip_grad, bf16=self.bf16, params_dtype=torch.float32,
                             use_distributed_optimizer=self.dist_opt)
        self.optimizer = get_megatron_optimizer(oc, [self.model],
                                                config_overrides=optimizer_overrides(oc, self.cfg.memory))
        for problem in configure_adam(self.optimizer, t.fused_adam):
            if self.rank == 0:
                self.log(f"warning: fused AdamW off ({problem})")
        # override: on resume this run's flags define the schedule, the checkpoint its position.
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup(),
            lr_decay_steps=t.steps, lr_decay_style="cosine", start_wd=t.weight_decay,
            end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)

    def _run_schedule(self, data_iter, num_micro: int, forward_only: bool) -> float:
        """One pass of Megatron's (pipeline) schedule; returns the mean loss on every rank."""
        out = get_forward_backward_func()(
            forward_step_func=functools.partial(forward_step, self.device), data_iterator=data_iter,
            model=[self.model], num_microbatches=num_micro, seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only)
        local = sum(float(o["lm loss"]) for o in out) / len(out) if out else 0.0
        loss = torch.tensor([local], dtype=torch.float64, device=self.device)
        dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # last stage holds it
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        return float(loss) / self.dp

    @on_cpu_shims
    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step; returns (loss, grad norm of the rest, grad norm of the values)."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run_schedule(self.train_iter, self.num_micro, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step failed (non-finite gradients)")
        self.last_lr = self.scheduler.get_lr({"max_lr": self.cfg.train.lr, "min_lr": self.cfg.train.min_lr})
        self.scheduler.step(increment=1)
        value_norm = getattr(self.optimizer, "grad_norms_by_group", {}).get(VALUE_GRAD_NORM_GROUP)
        return loss, float(grad_norm or 0.0), float(value_norm or 0.0)

    @torch.no_grad()
    @on_cpu_shims
    def evaluate(self) -> Optional[float]:
        if self.valid_iter is None or self.cfg.train.eval_iters == 0:
            return None
        self.model.eval()
        loss = self._run_schedule(self.valid_iter, self.cfg.train.eval_iters, forward_only=True)
        self.model.train()
        return loss

    @on_cpu_shims
    def fit(self) -> History:
        """Train from ``self.iteration`` (0, or where a checkpoint left off) to ``train.steps``;
        SIGTERM / Ctrl-C finish the current step, save and return early (``hist.stopped_by``).
        An error releases the CUDA graphs before it propagates, so the process can still exit
        (see ``release_graphs``)."""
        try:
            return self._fit()
        except BaseException:
            self.release_graphs()
            raise

    def _fit(self) -> History:
        t, hist = self.cfg.train, History(first_step=self.iteration + 1)
        start = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with StopSignals() as stop:
            for step in range(self.iteration + 1, t.steps + 1):
                t0 = time.time()
                profiling = step == t.profile_step
                with (_profiler(self.device) if profiling else contextlib.nullcontext()) as prof:
                    loss, gnorm, vnorm = self.train_step()  # ends in a host sync (loss, grad norm)
                self.iteration = step
                if profiling:
                    self._log_profile(prof, time.time() - t0)
                else:  # the profiler's overhead stays out of the throughput figures
                    hist.step_seconds.append(time.time() - t0)
                hist.losses.append(loss)
                hist.grad_norms.append(gnorm)
                hist.value_grad_norms.append(vnorm)
                hist.tokens += self.tokens_per_step
                if step % t.log_interval == 0 or step == t.steps:
                    self._log_progress(step, start, hist)
                if t.eval_interval and step % t.eval_interval == 0 and step != t.steps:
                    self._log_validation(step, self.evaluate())
                hist.stopped_by = agreed_stop(stop.received, self.device)
                exiting = hist.stopped_by or (t.exit_interval and step % t.exit_interval == 0)
                if t.save and (exiting or step == t.steps or (t.save_interval and step % t.save_interval == 0)):
                    hist.saved.append(str(self.save(t.save)))
                if self.async_queue is not None:  # publish background saves that are done
                    self.async_queue.maybe_finalize_async_calls(blocking=False)
                if exiting:
                    self._log_stop(hist)
                    break
        self.finish_saves()
        hist.seconds = time.time() - start
        self.sync_params()
        hist.peak_gib = self.peak_memory()
        hist.valid_loss = self.evaluate()
        self._log_validation(self.iteration, hist.valid_loss, quiet=True)
        self.tracker.close()
        return hist

    @on_cpu_shims
    def peak_memory(self) -> dict[int, float]:
        """{pipeline stage: peak GiB allocated by torch, max over the stage's ranks} (CUDA)."""
        if self.device.type != "cuda":
            return {}
        mine = (ps.get_pipeline_model_parallel_rank(), torch.cuda.max_memory_allocated() / 2**30)
        every = [None] * self.world_size
        dist.all_gather_object(every, mine)
        out: dict[int, float] = {}
        for stage, gib in every:
            out[stage] = max(out.get(stage, 0.0), gib)
        return dict(sorted(out.items()))

    @on_cpu_shims
    def key_usage(self) -> dict[int, UsageStats]:
        """{memory layer id: UsageStats} over the last window, on every rank (collective: each
        stage contributes its own layers)."""
        layers = self.cfg.memory.resolved_layers(self.cfg.model.num_layers)
        if not (self.cfg.train.key_usage and layers):
            return {}
        width = len(pack_usage(UsageStats(0, 0, 0, 0, 0, 0, [0] * KeyUsage.BUCKETS)))
        stats = torch.zeros(len(layers), width, dtype=torch.float64, device=self.device)
        groups = (ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group())
        first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        for layer in self.raw_model.memory_layers():
            u = layer.key_usage.summarize(groups)
            if first:
                stats[layers.index(layer.layer_id)] = torch.tensor(pack_usage(u), dtype=torch.float64)
        dist.all_reduce(stats)
        return {lid: unpack_usage(stats[i].tolist()) for i, lid in enumerate(layers)}

    def mfu(self, tokens_per_s: float) -> Optional[float]:
        peak = self.cfg.train.peak_tflops * 1e12 if self.cfg.train.peak_tflops else peak_flops(self.device)
        if peak is None:
            return None
        return tokens_per_s * flops_per_token(self.cfg, self.vocab_size) / (peak * self.world_size)

    def _log_progress(self, step: int, start: float, hist: History) -> None:
        elapsed = time.time() - start
        tok_s = hist.tokens / max(elapsed, 1e-9)
        usage = self.key_usage()
        mfu = self.mfu(tok_s)
        hist.key_usage = usage
        if usage:
            hist.key_usage_log.append((step, usage))
        eta = elapsed / (step - hist.first_step + 1) * (self.cfg.train.steps - step)
        window = hist.losses[-self.cfg.train.log_interval:]
        loss = sum(window) / len(window)
        lr = self.last_lr  # the dense parameters' lr of this step (values: x value_lr_mult)
        if self.rank == 0:
            self.log(f"step {step:>5}/{self.cfg.train.steps} | loss {loss:7.4f} | lr {lr:.2e} | "
                     f"grad-norm {hist.grad_norms[-1]:6.3f} (values {hist.value_grad_norms[-1]:6.3f}) | "
                     f"{tok_s:8.0f} tok/s" + (f" | MFU {mfu:5.1%}" if mfu is not None else "")
                     + format_key_usage(usage)
                     + f" | elapsed {_fmt_time(elapsed)} | ETA {_fmt_time(eta)}")
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": hist.grad_norms[-1],
                   "train/value_grad_norm": hist.value_grad_norms[-1], "train/tokens_per_s": tok_s}
        scalars.update({"train/mfu": mfu} if mfu is not None else {})
        scalars.update(usage_scalars(usage))
        self.tracker.scalars(scalars, step)
        self.tracker.key_usage(self.raw_model, list(usage), step)  # collective

    def _log_validation(self, step: int, loss: Optional[float], quiet: bool = False) -> None:
        if loss is None:
            return
        if self.rank == 0 and not quiet:
            self.log(f"step {step:>5}/{self.cfg.train.steps} | validation loss {loss:7.4f}")
        self.tracker.scalars({"valid/loss": loss}, step)

    def _log_profile(self, prof, wall_s: float) -> None:
        """Rank 0 prints the profiled step's ops and kernels, most time first, and on a GPU where
        its time went (``step_profile``: busy vs idle, kernel time by kind)."""
        if self.rank != 0:
            return
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        self.log(f"profile of step {self.iteration} (rank 0):\n"
                 + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60))
        if self.device.type == "cuda":
            s = step_profile.summarize(step_profile.device_kernels(prof), wall_s,
                                       step_profile.triton_kernel_names())
            self.log(f"step {self.iteration} breakdown (rank 0, profiled):\n" + step_profile.format_summary(s))

    def _log_stop(self, hist: History) -> None:
        if self.rank != 0:
            return
        why = hist.stopped_by or f"exit interval {self.cfg.train.exit_interval}"
        if hist.saved:
            self.log(f"stopping after step {self.iteration} ({why}): saved {hist.saved[-1]}; "
                     f"resume with --load {self.cfg.train.save}")
        else:
            self.log(f"stopping after step {self.iteration} ({why}); nothing saved (no --save given)")

    def state_dict(self) -> dict:
        """The Trainer's own progress, as checkpoints store it: the step reached and the samples
        consumed (the data position)."""
        return {"iteration": self.iteration, "consumed_samples": self.iteration * self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s progress: the step, and each data-parallel rank's
        position in the micro-batch order."""
        self.iteration = state["iteration"]
        per_rank = self.cfg.train.micro_batch_size * self.dp
        self.train_iter.cursor = state["consumed_samples"] // per_rank

    def checkpoint_state(self) -> checkpoint.TrainingState:
        """What a checkpoint of this run holds (``checkpoint.save`` / ``load`` read only this)."""
        return checkpoint.TrainingState(self.raw_model, self.optimizer, self.scheduler, self.cfg,
                                        self.vocab_size, self.dist_opt, self.state_dict())

    @on_cpu_shims
    def save(self, directory: str) -> Path:
        """Checkpoint the current step into ``directory`` (collective; see checkpoint.py). With
        ``train.async_save`` the files are written in the background; one save at a time."""
        start = time.time()
        self.sync_params()
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)  # the previous one first
        path = checkpoint.save(self.checkpoint_state(), directory,
                               self.cfg.train.checkpoint_integrity, async_queue=self.async_queue)
        self.checkpoint_seconds["save"] = time.time() - start
        if self.rank == 0:
            how = "staged (writing in the background)" if self.async_queue is not None else "saved"
            self.log(f"{how} {path} in {self.checkpoint_seconds['save']:.1f} s")
        return path

    @on_cpu_shims
    def finish_saves(self) -> None:
        """Wait for background saves to be written and their tracker updates (collective)."""
        if self.async_queue is not None:
            start = time.time()
            self.async_queue.maybe_finalize_async_calls(blocking=True)
            self.checkpoint_seconds["async_wait"] = time.time() - start

    @on_cpu_shims
    def release_graphs(self) -> None:
        """Free the memory layers' CUDA graphs; later passes run eagerly. NCCL cannot destroy a
        communicator while a graph that captured one of its collectives is alive (a hang at
        exit, pytorch/pytorch#115388), so this runs before any process group goes."""
        release_memory_layer_graphs(self.raw_model)

    @on_cpu_shims
    def close(self) -> None:
        """Release the CUDA graphs and Megatron's model-parallel groups."""
        self.release_graphs()
        ps.destroy_model_parallel()


def _profiler(device: torch.device):
    """torch profiler over CPU ops, and CUDA kernels on a GPU."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts)
