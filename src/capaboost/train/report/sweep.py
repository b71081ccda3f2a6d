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

Each run goes to ``output_dir/<task>/<tag>/seed<seed>``. A method entry without a ``tag`` is named by
its options (``{method: lora, r: 16}`` -> ``lora-r16``), so entries that differ only in an option get
their own folders; two different runs that would still share a folder are an error. ``base`` and
``grid`` options that a run's task or method does not read are left out of that run (``lora`` in a
``grid: {density: [...]}`` sweep runs once, as ``lora``); the same option in a method entry is an error.

Finished runs (``metrics.json``) are skipped and unfinished ones resumed, so re-running a sweep after an
interruption only does what is missing. A finished run whose recorded options differ from the sweep's
current ones (``base:`` was edited) is never reported as the new config's: it is marked ``stale``, left
untouched, and the message says how to retrain. The report groups runs by (task, tag, options) and gives
mean ± std over seeds, like the paper.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from ...data.task_specs import greater_is_better, report_scale
from ...checkpoint import atomic_write_bytes
from ..errors import ConfigError
from ..run_config import ALIASES, LEGACY_DEFAULTS, RunConfig, make_config, option_applies, read_config_file

SWEEP_KEYS = {"output_dir", "base", "tasks", "methods", "grid", "seeds"}
FINISHED = ("done", "trained")  # statuses whose metrics.json belongs to the sweep as it is now


def _option_name(key: str) -> str:
    name = key.replace("-", "_")
    return ALIASES.get(name, name)


def _label(key: str, value: Any) -> str:
    """``key`` + ``value`` as a folder-safe tag part: lists joined by '+', anything else odd becomes '_'."""
    if isinstance(value, (list, tuple)):
        text = "+".join(map(str, value))
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+=,-]", "_", f"{_option_name(key)}{text}")


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
    runs: dict[str, dict[str, Any]] = {}
    for task_opts, method, values, seed in itertools.product(
        tasks, methods, itertools.product(*grid.values()), seeds
    ):
        method_opts = {"method": method} if isinstance(method, str) else dict(method)
        explicit_tag = method_opts.pop("tag", None)
        chosen = {**base, **task_opts, **method_opts}
        if "task" not in chosen:
            raise ConfigError("the sweep names no task: set base.task or a tasks: list")
        task, method_name = str(chosen["task"]), str(chosen.get("method", "capaboost-lora"))

        def applies(key: str) -> bool:  # shared options only go to the runs that read them
            return option_applies(_option_name(key), task, method_name)

        setting = {k: v for k, v in zip(grid, values) if applies(k)}
        own = "".join(f"-{_label(k, v)}" for k, v in method_opts.items() if k != "method")
        tag = (explicit_tag or f"{method_name}{own}") + "".join(f"-{_label(k, v)}" for k, v in setting.items())
        shared = {k: v for k, v in base.items() if applies(k)}
        options = {**shared, **task_opts, **method_opts, **setting, "seed": seed, "tag": tag}
        options["output_dir"] = str(Path(spec["output_dir"]) / task / tag / f"seed{seed}")
        if options.get("overwrite") or options.get("resume"):
            raise ConfigError(
                "a sweep resumes unfinished runs and skips finished ones by itself: remove overwrite/resume from "
                "the sweep file (delete a run's folder, or change output_dir, to train it again)."
            )
        make_config(options)  # unknown, mistyped, out-of-range or unused options fail here, before anything trains
        other = runs.get(options["output_dir"])
        if other is not None and other != options:
            differ = sorted(k for k in set(other) | set(options) if other.get(k) != options.get(k))
            raise ConfigError(
                f"two sweep runs would share {options['output_dir']!r} but differ in {differ}: give their method "
                "entries distinct tags (methods: [{method: ..., tag: NAME}]) or split the sweep."
            )
        runs[options["output_dir"]] = options  # an identical duplicate entry runs once
    return list(runs.values())


def stale_options(out: Path, options: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Options in which the finished run in ``out`` differs from ``options``: name -> (recorded, now)."""
    recorded = json.loads((out / "metrics.json").read_text()).get("config", {})
    return make_config(options).with_defaults().differences(recorded)


def _train_one(options: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one run; a failure is recorded in its folder, never raised: one broken run must not
    stop the sweep. Top-level, so ``--jobs`` worker processes can run it."""
    from ..run.runner import train

    out = Path(options["output_dir"])
    start = time.perf_counter()
    try:
        train(make_config({**options, "resume": True}))
        result = {"status": "trained"}
    except (ValueError, RuntimeError) as err:
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(traceback.format_exc())
        result = {"status": "failed", "error": str(err)}
    return {**result, "seconds": round(time.perf_counter() - start, 1)}


def _train_all(todo: list[dict[str, Any]], jobs: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index in ``todo``, result) as runs finish; ``jobs`` runs at once in spawned processes (each its own torch)."""
    if jobs == 1:
        yield from ((i, _train_one(options)) for i, options in enumerate(todo))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_one, options): i for i, options in enumerate(todo)}
        for future in as_completed(futures):
            yield futures[future], future.result()


def run_sweep(path: str | Path, dry_run: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every missing run of the sweep file, ``jobs`` at once; returns one status dict per run, in order."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be a whole number >= 1 (runs trained at once), got {jobs!r}.")
    spec = read_config_file(path)
    runs = expand_sweep(spec)
    results: list[dict[str, Any]] = []
    todo: list[tuple[int, dict[str, Any]]] = []  # (position in results, options)
    for options in runs:
        out = Path(options["output_dir"])
        status = {"output_dir": str(out), "sweep_dir": spec["output_dir"], "tag": options["tag"]}
        if (out / "metrics.json").exists():
            changed = stale_options(out, options)
            if changed:  # never report an old config's result as this one's, never delete it either
                what = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in sorted(changed.items()))
                error = (f"{out} holds a finished run of other options ({what}); move or delete that folder, or set "
                         "another output_dir, to train the current options.")
                print(f"error: {error}")
                results.append({**status, "status": "stale", "error": error})
            else:
                results.append({**status, "status": "done"})
            continue
        if dry_run:
            results.append({**status, "status": "resume" if (out / "checkpoint").exists() else "pending"})
            continue
        todo.append((len(results), options))
        results.append(status)
    for done, (i, result) in enumerate(_train_all([options for _, options in todo], jobs), start=1):
        position = todo[i][0]
        results[position].update(result)
        line = f"[{done}/{len(todo)}] {result['status']} {results[position]['output_dir']} ({result['seconds']} s)"
        print(line if result["status"] == "trained" else f"error: {line}: {result['error']}", flush=True)
    return results


def collect(folder: str | Path, run_dirs: Optional[Iterable[str | Path]] = None) -> list[dict[str, Any]]:
    """Every metrics.json below ``folder``, or only those of ``run_dirs`` (a sweep's current runs)."""
    if run_dirs is not None:
        paths = [Path(d) / "metrics.json" for d in run_dirs]
        return [json.loads(p.read_text()) for p in paths if p.is_file()]
    return [json.loads(p.read_text()) for p in sorted(Path(folder).rglob("metrics.json"))]


def options_key(config: dict[str, Any]) -> str:
    """Short digest of a run's options without its seed (and a mask seed that follows it): runs with equal
    keys are seeds of one setting, so only they are averaged together. Options the run's task and method never
    read are left out (a default of one that changed between runs does not split a setting), and a key recorded
    before it existed counts as what those runs used (``LEGACY_DEFAULTS``)."""
    seed, task, method = config.get("seed"), str(config.get("task", "")), str(config.get("method", ""))
    kept = {k: v for k, v in {**LEGACY_DEFAULTS, **config}.items()
            if k not in (*RunConfig.RUNTIME_ONLY, "seed", "tag") and not (k == "mask_seed" and v == seed)
            and (not (task and method) or option_applies(k, task, method))}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def summarize(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(task, tag) -> mean/std over seeds of every test metric, trainable params, seeds.

    Runs with one tag but different options (a tag reused across edits of a sweep, or hand-made runs)
    are never averaged together: each setting gets its own row, ``tag [options digest]``.
    """
    keyed: dict[tuple[str, str, str], list[dict]] = {}
    for m in runs:
        keyed.setdefault((m["task"], m.get("tag") or m["method"], options_key(m.get("config", {}))), []).append(m)
    settings: dict[tuple[str, str], int] = {}
    for task, tag, _ in keyed:
        settings[(task, tag)] = settings.get((task, tag), 0) + 1
    groups = {
        (task, tag if settings[(task, tag)] == 1 else f"{tag} [{key}]"): ms for (task, tag, key), ms in keyed.items()
    }
    out = {}
    for (task, tag), ms in groups.items():
        metrics = {}
        for name in ms[0]["test"]:
            # fractions x100 like the paper's tables; loss, perplexity and SQuAD's percentages as they are
            values = np.array([m["test"][name] for m in ms if name in m["test"]]) * report_scale(task, name)
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
        # an average of scores and perplexities would mean nothing
        comparable = all(greater_is_better(summary[next(k for k in summary if k[0] == t)]["main"]) for t in tasks)
        avg = f"{np.mean(means):.1f}" if len(means) == len(tasks) and comparable else "–"
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


def write_report(folder: str | Path, run_dirs: Optional[Iterable[str | Path]] = None) -> str:
    """Write ``report.md`` and ``report.png`` into ``folder``; returns the markdown.

    ``run_dirs``: report only these runs (what a sweep ran or found up to date), not every metrics.json
    below ``folder`` (which may hold stale runs of an earlier version of the sweep).
    """
    folder = Path(folder)
    runs = collect(folder, run_dirs)
    if not runs:
        raise ConfigError(f"no metrics.json below {str(folder)!r}: run `capaboost sweep` or `capaboost train` first.")
    summary = summarize(runs)
    png = plot(summary, folder / "report.png")
    text = (
        f"# Results ({len(runs)} runs)\n\nTest scores, mean ± std over seeds: fractions (accuracy, F1, MCC, "
        "correlations, exact match) x100, SQuAD already in %, loss and perplexity as they are.\n\n"
        f"{markdown_table(summary)}\n\n![accuracy vs trainable parameters]({png.name})\n\n"
        f"## All test metrics\n\n{detail_table(summary)}\n"
    )
    atomic_write_bytes(folder / "report.md", text.encode())
    return text
