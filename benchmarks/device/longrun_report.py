# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Markdown summary and PNGs of a long run (benchmarks/device/longrun.py), from its TensorBoard events.

Tables: loss at equal tokens (validation and training loss of both models at every validation
step), Memory+ key usage per layer over time, the share of values touched per 10M-token span
(the issue's yardstick: >= 80% after warm-up), FLOPs per token of both models, and recall.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_memory.config import padded_vocab
from megatron_memory.configs.presets import get_preset
from megatron_memory.training.data import Tokenizer
from megatron_memory.training.metrics import flops_per_token
from megatron_memory.tools.plot_run import layer_series, plot_runs, read_scalars

MODELS = ("memory", "dense")


def _at(series, step):
    return next((v for s, v in series if s == step), None)


def _f(v, fmt=".4f"):
    return "-" if v is None else format(v, fmt)


def loss_table(sc: dict, tokens_per_step: int) -> list[str]:
    """Validation and training loss of both models at the steps both validated."""
    steps = sorted(set(s for s, _ in sc["memory"].get("valid/loss", []))
                   & set(s for s, _ in sc["dense"].get("valid/loss", [])))
    rows = ["| step | tokens (M) | dense valid | Memory+ valid | Memory+ - dense | dense train | "
            "Memory+ train |", "|---|---|---|---|---|---|---|"]
    for s in steps:
        vd, vm = _at(sc["dense"]["valid/loss"], s), _at(sc["memory"]["valid/loss"], s)
        td, tm = (_at(sc[m].get("train/loss", []), s) for m in ("dense", "memory"))
        rows.append(f"| {s} | {s * tokens_per_step / 1e6:.2f} | {_f(vd)} | {_f(vm)} | "
                    f"{_f(vm - vd, '+.4f')} | {_f(td)} | {_f(tm)} |")
    return rows


def usage_table(sc: dict, points: int = 8) -> list[str]:
    """used / effective / cumulative % per memory layer at ``points`` log steps spread evenly."""
    used = layer_series(sc, "keys_used")
    if not used:
        return ["(no key-usage events)"]
    layers = list(used)
    steps = [s for s, _ in used[layers[0]]]
    pick = sorted({steps[round(i * (len(steps) - 1) / max(points - 1, 1))] for i in range(points)})
    stats = {k: layer_series(sc, k) for k in ("keys_used", "effective_usage", "cumulative",
                                               "input_shared", "query_shared")}
    rows = ["| step | " + " | ".join(f"layer {lid} used/eff/cum % (in/q shared)" for lid in layers)
            + " |", "|---|" + "---|" * len(layers)]
    for s in pick:
        cells = []
        for lid in layers:
            u, e, c, i, q = (_at(stats[k].get(lid, []), s) for k in stats)
            cells.append(f"{_f(u and 100 * u, '.0f')}/{_f(e and 100 * e, '.0f')}/"
                         f"{_f(c and 100 * c, '.0f')} ({_f(i, '.2f')}/{_f(q, '.2f')})")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    return rows


def span_table(sc: dict) -> list[str]:
    """Share of values touched in each span of --key-usage-span-tokens (10M) tokens, per layer:
    the cumulative share just before it restarts (the last span may be incomplete)."""
    cum, tokens = layer_series(sc, "cumulative"), layer_series(sc, "span_tokens")
    if not cum:
        return ["(no key-usage events)"]
    rows = ["| layer | share touched per span (tokens in span, M) |", "|---|---|"]
    for lid, series in cum.items():
        spans, prev = [], None
        toks = dict(tokens.get(lid, []))
        for s, v in series:
            if prev is not None and toks.get(s, 0) < toks.get(prev[0], 0):  # a new span began
                spans.append(prev)
            prev = (s, v)
        spans.append(prev)
        rows.append(f"| {lid} | " + ", ".join(f"{100 * v:.0f}% ({toks.get(s, 0) / 1e6:.2f})"
                                             for s, v in spans) + " |")
    return rows


def write_report(plan, run, out: Path, phase: int, recall) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for model in MODELS:  # events and logs come back with the call
        shutil.copytree(run.tb[model], out / "tb" / model, dirs_exist_ok=True)
    shutil.copytree(run.logs, out / "logs", dirs_exist_ok=True)
    sc = {m: read_scalars(run.tb[m]) for m in MODELS}
    vocab = padded_vocab(Tokenizer(run.data / "tokenizer.json").vocab_size, 1)
    cfgs = {m: get_preset(plan.presets[m]) for m in MODELS}
    seq = cfgs["dense"].model.seq_length
    tokens_per_step = plan.global_batch * seq
    flops = {m: flops_per_token(cfgs[m], vocab) for m in MODELS}
    meta = run.load_meta()
    steps = {m: run.step(m) for m in MODELS}
    lines = [f"# Long run, phase {phase}: {plan.presets['dense']} vs {plan.presets['memory']}", "",
             f"Same data ({run.data.name}), seed, batch ({plan.global_batch} x {seq} = "
             f"{tokens_per_step:,} tokens/step), schedule ({plan.steps} steps, cosine, lr "
             f"{plan.lr:g}, warm-up {max(1, plan.steps // 10)}).", "",
             f"- steps reached: Memory+ {steps['memory']}, dense {steps['dense']} of {plan.steps}"
             + ("" if min(steps.values()) >= plan.steps else " (schedule not finished)"),
             f"- tokens: {min(steps.values()) * tokens_per_step / 1e6:.2f}M each",
             f"- training FLOPs per token: dense {flops['dense'] / 1e9:.4f} G, Memory+ "
             f"{flops['memory'] / 1e9:.4f} G (Memory+ / dense = {flops['memory'] / flops['dense']:.4f};"
             " the lookup counted as 2 x bag x v, metrics.flops_per_token)"]
    for ph in meta.get("phases", []):
        lines.append(f"- phase {ph['phase']}: " + "; ".join(
            f"{m} steps {ph[m]['start']}->{ph[m]['end']} in {ph[m]['seconds']:.0f} s"
            + (f" ({tokens_per_step / ph[m]['step_s']:,.0f} tok/s)" if ph[m]["step_s"] else "")
            for m in MODELS))
    lines += ["", "## Loss at equal tokens", ""] + loss_table(sc, tokens_per_step)
    lines += ["", "## Memory+ key usage over time", "",
              "used = share of values selected in the log window, eff = exp(entropy)/N, cum = share "
              "touched since the span began; in/q shared = shared-direction share of input/query.",
              ""] + usage_table(sc["memory"])
    lines += ["", "## Values touched per 10M-token span", ""] + span_table(sc["memory"])
    if recall:
        lines += ["", "## Fact recall (exact match, greedy)", "",
                  "| model | held-out questions | cloze (memorisation) | by attribute (questions) |",
                  "|---|---|---|---|"]
        for m in MODELS:
            q, c = recall[m]["questions"], recall[m]["cloze"]
            attrs = ", ".join(f"{a} {v:.1%}" for a, v in q["by_attribute"].items())
            lines.append(f"| {m} | {q['recall']:.2%} (n={q['n']}) | {c['recall']:.2%} (n={c['n']}) "
                         f"| {attrs} |")
        d, mm = recall["dense"]["questions"]["recall"], recall["memory"]["questions"]["recall"]
        lines.append(f"\nMemory+ / dense recall: {mm / d:.2f}x" if d else
                     "\nMemory+ / dense recall: dense recalled nothing")
        # per attribute: 'job' has 15 values, so guessing alone scores ~7%; the others cannot be
        # guessed, and the ratio must hold on them too
        by = {m: recall[m]["questions"]["by_attribute"] for m in MODELS}
        lines.append("by attribute: " + ", ".join(
            f"{a} {by['memory'][a] / v:.1f}x" if v else f"{a} (dense 0)"
            for a, v in by["dense"].items()))
        (out / "recall.json").write_text(json.dumps(recall, indent=2) + "\n")
    try:
        pngs = plot_runs([("Memory+", sc["memory"]), ("dense", sc["dense"])], out / "plots")
        lines += ["", "PNGs: " + ", ".join(f"plots/{p.name}" for p in pngs)]
    except ImportError:  # matplotlib is optional; the events came back, plot them there
        lines += ["", "No matplotlib here: python -m megatron_memory.tools.plot_run "
                  "OUT/tb/memory OUT/tb/dense --labels Memory+ dense --out OUT/plots"]
    path = out / f"longrun_phase{phase}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text(), flush=True)
    return path
