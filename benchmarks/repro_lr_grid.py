"""Issue 13, item 5: every method on one learning-rate grid, the lr picked on the validation split (no training).

    python benchmarks/repro_lr_grid.py --copy      # copy runs/repro-lrgrid-sst2/**/metrics.json into docs/results/
    python benchmarks/repro_lr_grid.py --next F    # write sweep file F: seed 2 at each method's picked and shared lr
    python benchmarks/repro_lr_grid.py             # tables (markdown) + docs/repro_lr_grid_sst2.png

The runs come from configs/repro_lr_grid_sst2.yaml. Protocol: every grid point with seeds 0 and 1; each method's lr
is the one with the highest mean validation accuracy over those two seeds (ties: the smaller lr); seed 2 is then
run at that lr and at the shared lr, so both comparisons have 3 seeds. Scores are test accuracy x100.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

from repro_figures import RESULTS, ROOT, by_tag, params
from repro_figures import score as test
from repro_figures import val_score as val

SWEEP = "repro-lrgrid-sst2"
CONFIG = ROOT / "configs" / "repro_lr_grid_sst2.yaml"
SHARED_LR = 2e-3
SELECT_SEEDS = (0, 1)
ARMS = {  # tag prefix -> label, in table order
    "lora-r8": "LoRA r=8",
    "capaboost-d2r8-sbd": "CapaBoost-LoRA d=2 r=8 (scale_by_density, the default)",
    "capaboost-d2r8": "CapaBoost-LoRA d=2 r=8 (paper scaling)",
    "padapter": "PAdapter",
    "capaboost-padapter": "CapaBoost-PAdapter d=2",
    "adalora-r8": "AdaLoRA r=8",
    "bitfit": "BitFit",
    "full": "full fine-tuning",
}


def grid() -> dict[str, dict[float, list[dict]]]:
    """arm -> lr -> finished runs."""
    out: dict[str, dict[float, list[dict]]] = {}
    for tag, runs in by_tag(SWEEP).items():
        arm = max((a for a in ARMS if tag.startswith(a + "-lr")), key=len)
        for run in runs:
            out.setdefault(arm, {}).setdefault(run["config"]["lr"], []).append(run)
    return out


def pick(by_lr: dict[float, list[dict]]) -> float | None:
    """The lr with the best mean validation accuracy over SELECT_SEEDS (all of them finished)."""
    scored = []
    for lr, runs in by_lr.items():
        chosen = [val(r) for r in runs if r["config"]["seed"] in SELECT_SEEDS]
        if len(chosen) == len(SELECT_SEEDS):
            scored.append((-np.mean(chosen), lr))
    return min(scored)[1] if scored else None


def summary(runs: list[dict]) -> str:
    if not runs:
        return "pending"
    acc = sorted(runs, key=lambda r: r["config"]["seed"])
    scores = np.array([test(r) for r in acc])
    std = f" ± {scores.std(ddof=1):.1f}" if len(scores) > 1 else ""
    return f"{scores.mean():.1f}{std} (n={len(scores)}: {'/'.join(f'{s:.1f}' for s in scores)})"


def grid_table(data: dict[str, dict[float, list[dict]]]) -> str:
    lrs = sorted({lr for by_lr in data.values() for lr in by_lr if lr >= 5e-4})
    lines = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for arm, label in ARMS.items():
        by_lr = data.get(arm, {})
        if arm == "full":
            continue
        best, cells = pick(by_lr), []
        for lr in lrs:
            runs = [r for r in by_lr.get(lr, []) if r["config"]["seed"] in SELECT_SEEDS]
            if not runs:
                cells.append("–")
                continue
            text = f"{np.mean([test(r) for r in runs]):.1f} ({np.mean([val(r) for r in runs]):.1f})"
            cells.append(f"**{text}**" if lr == best else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    full = data.get("full", {})
    if full:
        best = pick(full)
        cells = []
        for lr in sorted(full):
            runs = [r for r in full[lr] if r["config"]["seed"] in SELECT_SEEDS]
            text = f"{lr:g}: {np.mean([test(r) for r in runs]):.1f} ({np.mean([val(r) for r in runs]):.1f})"
            cells.append(f"**{text}**" if lr == best else text)
        lines.append("")
        lines.append("Full fine-tuning, its own grid: " + "; ".join(cells) + ".")
    return "\n".join(lines)


def best_table(data: dict[str, dict[float, list[dict]]]) -> str:
    lines = ["| method | trainable params | picked lr | test acc at the picked lr | test acc at the shared lr 2e-3 |",
             "|---|---|---|---|---|"]
    for arm, label in ARMS.items():
        by_lr = data.get(arm, {})
        best = pick(by_lr)
        if best is None:
            lines.append(f"| {label} | - | pending | pending | pending |")
            continue
        shared = "(not on its grid)" if arm == "full" else summary(by_lr.get(SHARED_LR, []))
        lines.append(f"| {label} | {params(by_lr[best])} | {best:g} | {summary(by_lr[best])} | {shared} |")
    return "\n".join(lines)


def next_sweep(data: dict[str, dict[float, list[dict]]], path: Path) -> None:
    """A sweep file with CONFIG's base and only the entries (picked lr, shared lr) that still lack seed 2."""
    config = yaml.safe_load(CONFIG.read_text())
    wanted = set()
    for arm, by_lr in data.items():
        best = pick(by_lr)
        for lr in {best, None if arm == "full" else SHARED_LR} - {None}:
            if not any(r["config"]["seed"] == 2 for r in by_lr.get(lr, [])):
                wanted.add(f"{arm}-lr{lr:g}")
    config["methods"] = [m for m in config["methods"] if m["tag"] in wanted]
    config["seeds"] = [2]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"{path}: {len(config['methods'])} runs ({', '.join(m['tag'] for m in config['methods'])})")


def _lr(lr: float) -> str:
    """1.6e-2 style: short tick labels."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


PANELS = (("LoRA family", ("lora-r8", "capaboost-d2r8-sbd", "capaboost-d2r8"), (70, 84)),
          ("adapters, AdaLoRA, BitFit", ("padapter", "capaboost-padapter", "adalora-r8", "bitfit"), (45, 85)))


def figure(data: dict[str, dict[float, list[dict]]], out: Path) -> None:
    """Test accuracy vs lr, one panel per method family; filled markers: 3 seeds, hollow: 2 (seeds 0 and 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, (title, arms, ylim) in zip(axes, PANELS):
        for arm in arms:
            by_lr = data.get(arm, {})
            lrs = sorted(by_lr)
            scores = [[test(r) for r in by_lr[lr]] for lr in lrs]
            means = [np.mean(s) for s in scores]
            line = ax.errorbar(lrs, means, yerr=[np.std(s, ddof=1) for s in scores], capsize=3,
                               label=ARMS[arm].replace(" (", "\n("))[0]
            ax.scatter(lrs, means, s=36, zorder=3, color=line.get_color(),
                       facecolors=[line.get_color() if len(s) == 3 else "white" for s in scores])
        ax.set_xscale("log")
        grid_lrs = sorted({lr for arm in arms for lr in data.get(arm, {})})
        ax.set_xticks(grid_lrs, [_lr(lr) for lr in grid_lrs])
        ax.minorticks_off()
        ax.set_ylim(*ylim)
        below = [f"{'paper' if a == 'capaboost-d2r8' else ARMS[a].split(' ')[0]} "
                 f"{np.mean([test(r) for r in data[a][lr]]):.1f} at {_lr(lr)}"
                 for a in arms for lr in sorted(data.get(a, {}))
                 if np.mean([test(r) for r in data[a][lr]]) < ylim[0]]
        ax.set_xlabel("learning rate (adapter and head)")
        ax.set_ylabel("SST-2 test accuracy (%), mean ± std over seeds")
        ax.set_title(title + ("\noff the scale: " + ", ".join(below) if below else ""), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if below else "lower center")
    fig.suptitle("One lr grid for every method (SST-2, 2k examples, 125 steps); hollow: 2 seeds, filled: 3")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copy", action="store_true", help="first copy the runs' metrics.json into docs/results/")
    parser.add_argument("--next", type=Path, help="write the seed-2 sweep file here and stop")
    args = parser.parse_args(argv)
    if args.copy:
        for src in sorted((ROOT / "runs" / SWEEP).rglob("metrics.json")):
            dst = RESULTS / src.relative_to(ROOT / "runs")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    data = grid()
    if args.next:
        next_sweep(data, args.next)
        return
    print("Test accuracy, mean of seeds 0 and 1 (validation accuracy in brackets); bold: the lr picked on validation.\n")
    print(grid_table(data) + "\n")
    print(best_table(data))
    figure(data, ROOT / "docs" / "repro_lr_grid_sst2.png")


if __name__ == "__main__":
    main(sys.argv[1:])
