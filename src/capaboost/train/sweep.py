"""Sweeps (tasks x methods x settings x seeds) and their paper-style report.

A sweep file (YAML/TOML/JSON; relative paths are relative to the working directory)::

    output_dir: runs/glue-small
    base: {epochs: 3, max_train_samples: 1000, protocol: propetl}   # any `capaboost train` option
    tasks:                                                         # or task/data_dir inside base
      - {task: cola, data_dir: ../shared/data/glue/CoLA}
      - {task: sst2, data_dir: ../shared/data/glue/SST-2}
    methods: [capaboost-lora, lora, {method: lora, r: 16, tag: lora-r16}]
    grid: {density: [0.3, 0.5]}                                    # optional: every combination
    seeds: [0, 1, 2]

Each run goes to ``output_dir/<task>/<tag>/seed<seed>``. Finished runs (``metrics.json``) are
skipped and unfinished ones resumed, so re-running a sweep after an interruption only does what is
missing. The report groups runs by (task, tag) and gives mean ± std over seeds, like the paper.
"""

from __future__ import annotations

import itertools
import json
import math
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write_bytes
from .run_config import ConfigError, make_config, read_config_file

SWEEP_KEYS = {"output_dir", "base", "tasks", "methods", "grid", "seeds"}
# Metrics reported as fractions by capaboost.train.metrics; shown x100 like the paper's tables.
PERCENT_SCALE = {"squad": 1.0, "squad_v2": 1.0}


def expand_sweep(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's runs as `capaboost train` option dicts (with output_dir and tag set)."""
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep keys {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    if "output_dir" not in spec:
        raise ConfigError("a sweep file needs output_dir: the folder its runs go to")
    base = dict(spec.get("base") or {})
    tasks = spec.get("tasks") or [{}]
    methods = spec.get("methods") or [base.get("method", "capaboost-lora")]
    seeds = spec.get("seeds") or [base.get("seed", 0)]
    grid = spec.get("grid") or {}
    if not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("every grid entry must be a non-empty list of values, e.g. grid: {density: [0.3, 0.5]}")
    runs = []
    for task_opts, method, values, seed in itertools.product(
        tasks, methods, itertools.product(*grid.values()), seeds
    ):
        method_opts = {"method": method} if isinstance(method, str) else dict(method)
        setting = dict(zip(grid, values))
        suffix = "".join(f"-{k}{v}" for k, v in setting.items())
        tag = (method_opts.pop("tag", None) or method_opts.get("method", "")) + suffix
        options = {**base, **task_opts, **method_opts, **setting, "seed": seed, "tag": tag}
        if "task" not in options:
            raise ConfigError("the sweep names no task: set base.task or a tasks: list")
        options["output_dir"] = str(Path(spec["output_dir"]) / options["task"] / tag / f"seed{seed}")
        make_config(options)  # unknown option names fail here, before anything trains
        runs.append(options)
    return runs


def run_sweep(path: str | Path, dry_run: bool = False) -> list[dict[str, Any]]:
    """Run every missing run of the sweep file; returns one status dict per run."""
    from .runner import train

    spec = read_config_file(path)
    runs = expand_sweep(spec)
    results = []
    for options in runs:
        out = Path(options["output_dir"])
        status = {"output_dir": str(out), "sweep_dir": spec["output_dir"], "tag": options["tag"]}
        if (out / "metrics.json").exists():
            results.append({**status, "status": "done"})
            continue
        if dry_run:
            results.append({**status, "status": "resume" if (out / "checkpoint").exists() else "pending"})
            continue
        try:
            train(make_config({**options, "resume": True}))
            results.append({**status, "status": "trained"})
        except (ValueError, RuntimeError) as err:  # one broken run must not stop the sweep
            (out / "error.txt").parent.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(traceback.format_exc())
            print(f"error: run {out} failed: {err}")
            results.append({**status, "status": "failed", "error": str(err)})
    return results


def collect(folder: str | Path) -> list[dict[str, Any]]:
    """Every metrics.json below ``folder``."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).rglob("metrics.json"))]


def _scale(task: str) -> float:
    return PERCENT_SCALE.get(task, 100.0)


def summarize(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(task, tag) -> mean/std over seeds of every test metric, trainable params, seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for m in runs:
        groups.setdefault((m["task"], m.get("tag") or m["method"]), []).append(m)
    out = {}
    for (task, tag), ms in groups.items():
        scale = _scale(task)
        metrics = {}
        for name in ms[0]["test"]:
            values = np.array([m["test"][name] for m in ms if name in m["test"]]) * scale
            metrics[name] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
        out[(task, tag)] = {
            "main": ms[0]["main_metric"],
            "metrics": metrics,
            "params": float(np.mean([m["trainable_params"] for m in ms])),
            "seeds": sorted(m["config"]["seed"] for m in ms),
            "rank": ms[0].get("rank"),
        }
    return out


def _params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown_table(summary: dict[tuple[str, str], dict[str, Any]]) -> str:
    """Tags as rows, tasks as columns (main metric, mean ± std over seeds), plus the average."""
    tasks = sorted({t for t, _ in summary})
    tags = sorted({g for _, g in summary})
    head = ["method", "trainable params", "rank"] + [
        f"{t} ({summary[next(k for k in summary if k[0] == t)]['main']})" for t in tasks
    ] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tag in tags:
        cells, means = [], []
        for task in tasks:
            s = summary.get((task, tag))
            if s is None:
                cells.append("–")
                continue
            mean, std = s["metrics"][s["main"]]
            means.append(mean)
            cells.append(f"{mean:.1f} ± {std:.1f} (n={len(s['seeds'])})")
        any_s = next(s for (_, g), s in summary.items() if g == tag)
        params = np.mean([s["params"] for (_, g), s in summary.items() if g == tag])
        avg = f"{np.mean(means):.1f}" if len(means) == len(tasks) else "–"
        rank = "–" if any_s["rank"] is None else str(any_s["rank"])
        lines.append("| " + " | ".join([tag, _params(params), rank, *cells, avg]) + " |")
    return "\n".join(lines)


def detail_table(summary: dict[tuple[str, str], dict[str, Any]]) -> str:
    lines = ["| task | method | metric | mean ± std | seeds |", "|---|---|---|---|---|"]
    for (task, tag), s in sorted(summary.items()):
        for name, (mean, std) in s["metrics"].items():
            lines.append(f"| {task} | {tag} | {name} | {mean:.2f} ± {std:.2f} | {s['seeds']} |")
    return "\n".join(lines)


def plot(summary: dict[tuple[str, str], dict[str, Any]], path: Path) -> Path:
    """Main metric vs trainable parameters (log scale), one panel per task, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in summary})
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for (t, tag), s in sorted(summary.items()):
            if t != task:
                continue
            mean, std = s["metrics"][s["main"]]
            ax.errorbar(s["params"], mean, yerr=std, fmt="o", capsize=3, label=tag)
            ax.annotate(tag, (s["params"], mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        main = summary[next(k for k in summary if k[0] == task)]["main"]
        ax.set_ylabel(f"{main} (test)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(folder: str | Path) -> str:
    """Write ``report.md`` and ``report.png`` into ``folder``; returns the markdown."""
    folder = Path(folder)
    runs = collect(folder)
    if not runs:
        raise ConfigError(f"no metrics.json below {str(folder)!r}: run `capaboost sweep` or `capaboost train` first.")
    summary = summarize(runs)
    png = plot(summary, folder / "report.png")
    text = (
        f"# Results ({len(runs)} runs)\n\nTest score x100 (SQuAD: %), mean ± std over seeds.\n\n"
        f"{markdown_table(summary)}\n\n![accuracy vs trainable parameters]({png.name})\n\n"
        f"## All test metrics\n\n{detail_table(summary)}\n"
    )
    atomic_write_bytes(folder / "report.md", text.encode())
    return text
