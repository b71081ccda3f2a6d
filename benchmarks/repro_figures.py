"""Figures and tables of issue 13's claims 2-5 from committed metrics.json files (no training).

    python benchmarks/repro_figures.py            # reads docs/results/repro-*/, writes docs/repro_*.png, prints tables
    python benchmarks/repro_figures.py --copy     # first copies runs/repro-*/**/metrics.json into docs/results/

The SST-2 runs come from configs/repro_{density,rank_copies,headline,dora}_sst2.yaml and repro_nm_sst2_10k.yaml
(`capaboost sweep FILE --jobs 2`); the CoLA runs from configs/repro_cola_gpu.yaml and repro_cola_gpu_more.yaml
(one sweep folder, run on a lent GPU by scripts/gpu_check.sh).
Scores: the task's main test metric x100 (SST-2 accuracy, CoLA Matthews correlation) of the model picked on
validation, mean ± sample std over the seeds that finished.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from capaboost.train.report.sweep import collect

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ("repro-density-sst2", "repro-rank-copies-sst2", "repro-headline-sst2", "repro-dora-sst2", "repro-nm-sst2-10k",
          "repro-cola-gpu")
COLA = "repro-cola-gpu"
# the CoLA sweep's lr-grid tags that are also points of the density and rank figures (lr 1e-3, s = 0.5)
COLA_ALIASES = {"diff-s0.5": "cb-d2r8-lr1e-3", "d1-r8": "lora-r8-lr1e-3", "d2-r8": "cb-d2r8-lr1e-3"}
RESULTS = ROOT / "docs" / "results"


def copy_results() -> None:
    for sweep in SWEEPS:
        for src in sorted((ROOT / "runs" / sweep).rglob("metrics.json")):
            dst = RESULTS / src.relative_to(ROOT / "runs")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def by_tag(sweep: str, aliases: dict[str, str] | None = None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    folder = RESULTS / sweep
    for m in collect(folder) if folder.is_dir() else []:
        out.setdefault(m["tag"], []).append(m)
    for alias, tag in (aliases or {}).items():
        if tag in out:
            out[alias] = out[tag]
    return out


def score(run: dict) -> float:
    return run["test"][run["main_metric"]] * 100


def val_score(run: dict) -> float:
    """Validation score of the model the run picked (its selected step)."""
    return next(v["metrics"][run["main_metric"]] for v in run["validation"] if v["step"] == run["selected_step"]) * 100


def stats(runs: list[dict]) -> tuple[float, float, int]:
    acc = np.array([score(r) for r in runs])
    return float(acc.mean()), float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, len(acc)


def cell(runs: list[dict]) -> str:
    if not runs:
        return "pending"
    mean, std, n = stats(runs)
    seeds = "/".join(f"{score(r):.1f}" for r in sorted(runs, key=lambda r: r["config"]["seed"]))
    return f"{mean:.1f} ± {std:.1f} (n={n}: {seeds})"


def params(runs: list[dict]) -> str:
    return f"{np.mean([r['trainable_params'] for r in runs]):,.0f}" if runs else "-"


def density_figure(plt, runs: dict[str, list[dict]], lora: list[dict], what: str = "SST-2 test accuracy (%)",
                   data: str = "2k SST-2", out: str = "repro_density_sst2.png") -> str:
    densities = (0.1, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0)
    lines = ["| density s | diff | same | dropout |", "|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("diff", "o"), ("same", "s"), ("dropout", "^")):
        xs, ys, es, ns = [], [], [], []
        for s in densities:
            got = runs.get("all-s1.0" if s == 1.0 else f"{mode}-s{s}", [])
            if got:
                mean, std, n = stats(got)
                xs.append(s), ys.append(mean), es.append(std), ns.append(n)
        if xs:
            line = ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=f"CapaBoost-LoRA, {mode} masks")
            few = [(x, y) for x, y, n in zip(xs, ys, ns) if n < 3]
            if few:  # hollow: fewer than 3 seeds
                ax.scatter(*zip(*few), marker=marker, s=60, facecolors="white", edgecolors=line[0].get_color(), zorder=3)
    for s in densities:
        tags = ["all-s1.0"] * 3 if s == 1.0 else [f"{m}-s{s}" for m in ("diff", "same", "dropout")]
        run_all_modes = s in (0.3, 0.5, 0.7, 0.9, 1.0)  # what repro_density_sst2.yaml runs for same/dropout
        cells = [f"{cell(runs.get(t, []))}<br>{params(runs.get(t, []))} params" if i == 0 or run_all_modes else "not run"
                 for i, t in enumerate(tags)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if lora:
        mean, std, _ = stats(lora)
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.2)
        ax.axhline(mean, color="grey", ls="--", label="LoRA r=8 (mean ± std)")
    ax.set_xlabel("mask density s (d = 2 copies, r = 8 per copy)")
    ax.set_ylabel(what)
    ax.set_title(f"Density x mask mode (paper Fig. 3a), {data}, MiniLM\n(error bars: std over 3 seeds; hollow: fewer seeds)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / out, dpi=120)
    plt.close(fig)
    return "\n".join(lines)


def rank_figure(plt, runs: dict[str, list[dict]], what: str = "SST-2 test accuracy (%)", data: str = "2k SST-2",
                out: str = "repro_rank_copies_sst2.png") -> str:
    ranks = (4, 8, 16, 32)
    lines = ["| d \\ r | " + " | ".join(map(str, ranks)) + " | 64 |", "|---|---|---|---|---|---|"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for d, marker in ((1, "o"), (2, "s"), (3, "^")):
        row, xs, ps, ys, es, ns = [], [], [], [], [], []
        for r in ranks + ((64,) if d == 1 else ()):
            got = runs.get(f"d{d}-r{r}", [])
            row.append(f"{cell(got)}<br>{params(got)} params" if got else "pending")
            if got:
                mean, std, n = stats(got)
                xs.append(r), ps.append(np.mean([g["trainable_params"] for g in got])), ys.append(mean), es.append(std)
                ns.append(n)
        lines.append(f"| {d} | " + " | ".join(row) + (" |" if d == 1 else " | - |"))
        label = "LoRA (d = 1)" if d == 1 else f"CapaBoost d = {d}, s = 0.5"
        for ax, x in ((ax1, xs), (ax2, ps)):
            if not x:
                continue
            line = ax.errorbar(x, ys, yerr=es, marker=marker, capsize=3, label=label)
            few = [(a, y) for a, y, n in zip(x, ys, ns) if n < 3]
            if few:  # hollow: fewer than 3 seeds
                ax.scatter(*zip(*few), marker=marker, s=60, facecolors="white", edgecolors=line[0].get_color(), zorder=3)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax1.set_xscale("log", base=2)
    ax1.set_xticks([4, 8, 16, 32, 64])
    ax1.xaxis.set_major_formatter(ScalarFormatter())
    ax1.set_xlabel("rank r per copy")
    ax2.set_xscale("log")
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.set_xlabel("trainable parameters (adapter + head)")
    for ax in (ax1, ax2):
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Rank vs copies (paper Fig. 3b), {data}, MiniLM (error bars: std over 3 seeds; hollow: fewer seeds)")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / out, dpi=120)
    plt.close(fig)
    return "\n".join(lines)


def headline(density: dict, ranks: dict, head: dict, dora: dict) -> str:
    rows = [("full fine-tuning (lr 5e-5)", head.get("full", [])), ("BitFit (lr 4e-3)", head.get("bitfit", [])),
            ("LoRA r=8", ranks.get("d1-r8", [])), ("AdaLoRA r=8", head.get("adalora-r8", [])),
            ("CapaBoost-LoRA d=2 r=8 s=0.5", density.get("diff-s0.5", [])),
            ("  same mask", density.get("same-s0.5", [])), ("  dropout masks", density.get("dropout-s0.5", [])),
            ("  2:4 masks", head.get("capaboost-lora-2of4", [])), ("PAdapter (lr 2e-3)", head.get("padapter", [])),
            ("CapaBoost-PAdapter d=2 s=0.5, lr 2e-3", head.get("capaboost-padapter-lr2e-3", [])),
            ("CapaBoost-PAdapter d=2 s=0.5, lr 4e-3", head.get("capaboost-padapter-lr4e-3", [])),
            ("DoRA r=8", dora.get("dora-r8", [])), ("CapaBoost-DoRA d=2 r=8 s=0.5", dora.get("capaboost-dora-d2r8", []))]
    return method_table(rows, "| test acc | train time (s, mean) |")


def method_table(rows: list[tuple[str, list[dict]]], columns: str, validation: bool = False) -> str:
    """One row per method: parameters, % of the model, test score (± std, per seed), [validation], train time."""
    lines = ["| method | trainable params | % of model " + columns, "|---" * (columns.count("|") + 2) + "|"]
    for name, got in rows:
        pct = f"{np.mean([g['trainable_percent'] for g in got]):.3f}" if got else "-"
        wall = f"{np.mean([g['train_time_s'] for g in got]):.0f}" if got else "-"
        val = (f" {np.mean([val_score(g) for g in got]):.1f} |" if got else " - |") if validation else ""
        lines.append(f"| {name} | {params(got)} | {pct} | {cell(got)} |{val} {wall} |")
    return "\n".join(lines)


def cola_headline(runs: dict[str, list[dict]]) -> str:
    rows = [("full fine-tuning (lr 5e-5)", "full"), ("BitFit (lr 4e-3)", "bitfit"), ("AdaLoRA r=8 (lr 1.6e-2)", "adalora"),
            ("LoRA r=8, lr 5e-4", "lora-r8-lr5e-4"), ("LoRA r=8, lr 1e-3", "lora-r8-lr1e-3"),
            ("LoRA r=8, lr 2e-3", "lora-r8-lr2e-3"), ("CapaBoost-LoRA d=2 r=8 s=0.5, lr 5e-4", "cb-d2r8-lr5e-4"),
            ("CapaBoost-LoRA d=2 r=8 s=0.5, lr 1e-3", "cb-d2r8-lr1e-3"),
            ("CapaBoost-LoRA d=2 r=8 s=0.5, lr 2e-3", "cb-d2r8-lr2e-3"), ("  same mask, lr 1e-3", "same-s0.5"),
            ("  dropout masks, lr 1e-3", "dropout-s0.5"), ("  2:4 masks, lr 1e-3", "cb-2of4"),
            ("PAdapter (lr 1e-3)", "padapter"), ("CapaBoost-PAdapter d=2 s=0.5 (lr 1e-3)", "cb-padapter")]
    columns = "| test MCC ×100 | validation MCC ×100 (picked model) | train time (s, mean; 16 runs sharing one H200) |"
    return method_table([(name, runs.get(tag, [])) for name, tag in rows], columns, validation=True)


def nm_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| SST-2-10k | trainable params | test acc |", "|---|---|---|"]
    for tag, name in (("capaboost-random", "CapaBoost-LoRA d=2 r=8, random masks s=0.5"),
                      ("capaboost-2of4", "CapaBoost-LoRA d=2 r=8, 2:4 masks"), ("lora-r8", "LoRA r=8")):
        lines.append(f"| {name} | {params(runs.get(tag, []))} | {cell(runs.get(tag, []))} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copy", action="store_true", help="copy runs/repro-*/ metrics.json into docs/results/ first")
    args = parser.parse_args(argv)
    if args.copy:
        copy_results()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density, ranks, head, dora, nm = (by_tag(s) for s in SWEEPS[:5])
    cola = by_tag(COLA, COLA_ALIASES)
    print("## density x mask mode\n\n" + density_figure(plt, density, ranks.get("d1-r8", [])) + "\n")
    print("## rank vs copies\n\n" + rank_figure(plt, ranks) + "\n")
    print("## headline\n\n" + headline(density, ranks, head, dora) + "\n")
    print("## N:M on SST-2-10k\n\n" + nm_table(nm) + "\n")
    if cola:
        mcc = "CoLA test MCC ×100"
        print("## CoLA: density x mask mode\n\n" + density_figure(plt, cola, cola.get("d1-r8", []), mcc, "CoLA",
                                                                     "repro_density_cola.png") + "\n")
        print("## CoLA: rank vs copies\n\n" + rank_figure(plt, cola, mcc, "CoLA", "repro_rank_copies_cola.png") + "\n")
        print("## CoLA: headline\n\n" + cola_headline(cola))


if __name__ == "__main__":
    main(sys.argv[1:])
