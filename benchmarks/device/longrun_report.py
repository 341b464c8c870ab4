# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Markdown summary and PNGs of a long run (benchmarks/device/longrun.py), from its TensorBoard events,
logs and recall results, for any list of models (issue 29: memory sizes and dense variants).

Tables: one row per model (steps, tokens, final and best validation loss, held-out recall with
its 95% interval, per attribute, cloze, tok/s, peak memory, values touched per 10M-token span);
validation loss of every model at every validation step (by tokens); Memory+ key usage per layer
over time; FLOPs per token.

    python benchmarks/device/longrun_report.py --loss-plot out.png TB_DIR:LABEL[:TOKENS_PER_STEP] ...
    # validation (points) and training (lines) loss against tokens, from TensorBoard folders
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from megatron_memory.config import padded_vocab, replace
from megatron_memory.configs.presets import get_preset
from megatron_memory.training.data import Tokenizer
from megatron_memory.training.metrics import flops_per_token
from megatron_memory.tools.plot_run import layer_series, read_scalars


def _at(series, step):
    return next((v for s, v in series if s == step), None)


def _f(v, fmt=".4f"):
    return "-" if v is None else format(v, fmt)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (Wilson score) interval of a proportion ``p`` measured over ``n`` trials."""
    if n <= 0:
        return (0.0, 1.0)
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def pct_ci(p: float, n: int) -> str:
    lo, hi = wilson(p, n)
    return f"{100 * p:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]"


def spans(sc: dict) -> dict[int, list[tuple[float, int]]]:
    """{layer: [(share touched, tokens in the span), ...]}: the cumulative share of values touched
    in each --key-usage-span-tokens span, just before the span restarts (the last may be partial)."""
    cum, tokens = layer_series(sc, "cumulative"), layer_series(sc, "span_tokens")
    out = {}
    for lid, series in cum.items():
        found, prev = [], None
        toks = dict(tokens.get(lid, []))
        for s, v in series:
            if prev is not None and toks.get(s, 0) < toks.get(prev[0], 0):  # a new span began
                found.append(prev)
            prev = (s, v)
        if prev is not None:
            found.append(prev)
        out[lid] = [(v, int(toks.get(s, 0))) for s, v in found]
    return out


def span_table(sc: dict) -> list[str]:
    found = spans(sc)
    if not found:
        return ["(no key-usage events)"]
    rows = ["| layer | share touched per span (tokens in span, M) |", "|---|---|"]
    for lid, ss in found.items():
        rows.append(f"| {lid} | " + ", ".join(f"{100 * v:.0f}% ({t / 1e6:.2f})" for v, t in ss) + " |")
    return rows


def span_summary(sc: dict, span_tokens: int = 10_000_000) -> str:
    """Per layer: min-max share touched over the complete spans after the first (warm-up) span."""
    cells = []
    for lid, ss in spans(sc).items():
        full = [v for v, t in ss[1:] if t >= 0.95 * span_tokens] or [v for v, t in ss if t >= 0.95 * span_tokens]
        cells.append(f"L{lid} " + (f"{100 * min(full):.0f}-{100 * max(full):.0f}%" if full else "-"))
    return ", ".join(cells) or "-"


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


def loss_table(models, sc: dict, tokens_per_step: int) -> list[str]:
    """Validation loss of every model at every validation step any of them reached, by tokens."""
    steps = sorted({s for m in models for s, _ in sc[m.tag].get("valid/loss", [])})
    rows = ["| step | tokens (M) | " + " | ".join(f"{m.label} valid" for m in models) + " |",
            "|---|---|" + "---|" * len(models)]
    for s in steps:
        rows.append(f"| {s} | {s * tokens_per_step / 1e6:.2f} | "
                    + " | ".join(_f(_at(sc[m.tag].get("valid/loss", []), s)) for m in models) + " |")
    return rows


def recall_cells(rec: dict) -> tuple[str, str, str]:
    q, c = rec["questions"], rec["cloze"]
    ns = q.get("n_by_attribute", {})
    attrs = ", ".join(f"{a} {pct_ci(v, ns[a])}" if a in ns else f"{a} {100 * v:.1f}%"
                      for a, v in q["by_attribute"].items())
    return pct_ci(q["recall"], q["n"]) + f" (n={q['n']})", attrs, pct_ci(c["recall"], c["n"]) + f" (n={c['n']})"


def run_table(models, run, sc: dict, meta: dict, tokens_per_step: int) -> list[str]:
    rows = ["| run | values | steps | tokens (M) | final valid | best valid (step) | held-out recall "
            "[95% CI] | by attribute [95% CI] | cloze [95% CI] | tok/s | peak GiB | values touched "
            "per 10M-token span (complete spans after the first) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        valid = sc[m.tag].get("valid/loss", [])
        done = meta.get("runs", {}).get(m.tag, {})
        phases = done.get("phases", [])
        rates = [p.get("steady_tok_s") or p.get("last_tok_s") for p in phases]
        rates = [r for r in rates if r]
        peaks = [p["peak_gib"] for p in phases if p.get("peak_gib")]
        step = run.step(m.tag)
        best = min(valid, key=lambda sv: sv[1]) if valid else None
        rec = done.get("recall")
        q, attrs, cl = recall_cells(rec) if rec else ("-", "-", "-")
        rows.append(
            f"| {m.label} | {m.num_values():,} | {step}/{m.steps} | {step * tokens_per_step / 1e6:.2f} | "
            f"{_f(valid[-1][1]) if valid else '-'}" + (f" (step {valid[-1][0]})" if valid else "")
            + f" | {_f(best[1]) + f' ({best[0]})' if best else '-'} | {q} | {attrs} | {cl} | "
            + (", ".join(f"{r:,}" for r in rates) or "-") + " | "
            + (f"{max(peaks):.1f}" if peaks else "-") + " | "
            + (span_summary(sc[m.tag]) if m.kind == "memory" else "-") + " |")
    return rows


def plot_loss_vs_tokens(runs: list[tuple[str, dict, int]], path: Path) -> Path:
    """Validation (markers) and training (lines) loss against tokens (M) for [(label, scalars,
    tokens per step)]."""
    import matplotlib  # function-local: an optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, (label, sc, tps) in enumerate(runs):
        color = f"C{n % 10}"
        if sc.get("train/loss"):
            ax.plot([s * tps / 1e6 for s, _ in sc["train/loss"]], [v for _, v in sc["train/loss"]],
                    "-", color=color, alpha=0.45, lw=1, label=f"{label} train")
        if sc.get("valid/loss"):
            ax.plot([s * tps / 1e6 for s, _ in sc["valid/loss"]], [v for _, v in sc["valid/loss"]],
                    "o-", color=color, ms=4, label=f"{label} valid")
    ax.set(xlabel="training tokens (M)", ylabel="loss", title="Loss against tokens")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(plan, run, models, out: Path, phase: int, echo: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    present = [m for m in models if run.tb(m.tag).is_dir() and any(run.tb(m.tag).glob("events.*"))]
    for m in present:  # events and logs come back with the call
        shutil.copytree(run.tb(m.tag), out / "tb" / m.tag, dirs_exist_ok=True)
    if run.logs.is_dir():
        shutil.copytree(run.logs, out / "logs", dirs_exist_ok=True)
    sc = {m.tag: (read_scalars(run.tb(m.tag)) if m in present else {}) for m in models}
    vocab = padded_vocab(Tokenizer(run.data / "tokenizer.json").vocab_size, 1)
    seq = get_preset(plan.presets["dense"]).model.seq_length
    tokens_per_step = plan.global_batch * seq
    meta = run.load_meta()
    lines = [f"# Long run, phase {phase}: " + ", ".join(m.label for m in models), "",
             f"Same data ({run.data.name}), seed, batch ({plan.global_batch} x {seq} = "
             f"{tokens_per_step:,} tokens/step), schedule shape (cosine, lr {plan.lr:g} -> "
             f"{plan.lr / 10:g}, warm-up a tenth of the steps).", ""]
    for m in models:
        cfg = get_preset(m.preset)
        if m.n_keys:
            cfg = replace(cfg, **{"memory.n_keys": m.n_keys})
        fl = flops_per_token(cfg, vocab)
        lines.append(f"- {m.label} (`{m.tag}`, preset {m.preset}"
                     + (f", --memory-n-keys {m.n_keys}" if m.n_keys else "")
                     + f"): {fl / 1e9:.4f} GFLOP/token; step {run.step(m.tag)} of {m.steps}; "
                     + "; ".join(f"phase {p['phase']} steps {p['start']}->{p['end']} in "
                                 f"{p['seconds']:.0f} s" for p in meta.get("runs", {}).get(m.tag, {}).get("phases", [])))
    lines += ["", "## Per run", "",
              "tok/s: the trainer's steady rate (after step 3) of each phase; peak GiB: torch's "
              "peak allocation; recall: exact match, greedy; 95% CI: Wilson interval over the "
              "questions scored.", ""] + run_table(models, run, sc, meta, tokens_per_step)
    rate = {}
    for m in models:
        rs = [p.get("steady_tok_s") for p in meta.get("runs", {}).get(m.tag, {}).get("phases", [])]
        rs = [r for r in rs if r]
        if rs:
            rate[m.tag] = sum(rs) / len(rs)
    if "dense" in rate and "memory" in rate:
        steps = next(m.steps for m in models if m.tag == "memory")
        lines += ["", f"Dense at Memory+ 2^20's GPU time: {steps} x {rate['dense']:,.0f} / "
                  f"{rate['memory']:,.0f} tok/s = {steps * rate['dense'] / rate['memory']:.0f} steps "
                  f"(model spec dense-s{round(steps * rate['dense'] / rate['memory'])}; training "
                  "time only, measured rates of this run)."]
    lines += ["", "## Validation loss at equal tokens", ""] + loss_table(models, sc, tokens_per_step)
    for m in models:
        if m.kind != "memory" or not sc[m.tag]:
            continue
        lines += ["", f"## {m.label}: key usage over time", "",
                  "used = share of values selected in the log window, eff = exp(entropy)/N, cum = "
                  "share touched since the span began; in/q shared = shared-direction share of "
                  "input/query.", ""] + usage_table(sc[m.tag])
        lines += ["", f"## {m.label}: values touched per 10M-token span", ""] + span_table(sc[m.tag])
    recall = {m.tag: meta["runs"][m.tag]["recall"] for m in models
              if "recall" in meta.get("runs", {}).get(m.tag, {})}
    if recall:
        (out / "recall.json").write_text(json.dumps(recall, indent=2) + "\n")
    try:
        if present:
            png = plot_loss_vs_tokens([(m.label, sc[m.tag], tokens_per_step) for m in present],
                                      out / "plots" / "loss_vs_tokens.png")
            lines += ["", f"PNG: plots/{png.name}"]
    except ImportError:  # matplotlib is optional; the events came back, plot them there
        lines += ["", "No matplotlib here: python benchmarks/device/longrun_report.py --loss-plot "
                  "loss.png OUT/tb/TAG:LABEL ..."]
    path = out / f"longrun_phase{phase}.md"
    path.write_text("\n".join(lines) + "\n")
    if echo:
        print(path.read_text(), flush=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="loss-against-tokens PNG of long runs' TensorBoard folders")
    p.add_argument("--loss-plot", type=Path, required=True, help="the PNG to write")
    p.add_argument("runs", nargs="+", help="TB_DIR:LABEL[:TOKENS_PER_STEP] (default 131072 = 64 x 2048)")
    args = p.parse_args(argv)
    runs = []
    for r in args.runs:
        parts = r.split(":")
        runs.append((parts[1] if len(parts) > 1 else Path(parts[0]).name, read_scalars(Path(parts[0])),
                     int(parts[2]) if len(parts) > 2 else 131072))
    print(plot_loss_vs_tokens(runs, args.loss_plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
