"""Issue 13, item 1 (paper Table 1): rank(ΔW) = d*r and the parameter factor of CapaBoost-LoRA, after short training.

    python benchmarks/rank_table.py            # trains 12 short runs (resumable), writes docs/results/rank_table/

For r in {8, 16, 32, 64} and d in {1, 2, 4} (d=1: plain LoRA, s=1; d>1: s=0.5) the runner fine-tunes the MiniLM
on CoLA for 24 steps (batch 8, lr 2e-3, so B != 0) with CapaBoost-LoRA on query/value. The rank of every adapted
layer's ΔW is measured twice: ``capaboost.delta_ranks`` (exact, via a d*r x d*r core) and
``torch.linalg.matrix_rank`` of the dense ΔW (``get_delta_weight``, float32, its default tolerance).
d*r <= 256 < 384, so the MiniLM's width never caps the rank. Parameter factor: the stored union of the masks over a dense LoRA of the
same r, from ``capaboost.parameter_counts`` (exact counts, adapter only, head excluded).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RS, DS = (8, 16, 32, 64), (1, 2, 4)
ROOT = Path("runs/rank-table")
OUT = Path("docs/results/rank_table")


def main() -> None:
    import torch

    from capaboost import delta_ranks, parameter_counts
    from capaboost.lora import CapaBoostLoraLayer
    from capaboost.train.run_config import make_config
    from capaboost.train.run import train
    from capaboost.train.trained import load_trained

    rows = []
    start = time.time()
    for r in RS:
        for d in DS:
            out = ROOT / f"d{d}-r{r}"
            train(make_config({
                "task": "cola", "data_dir": "../shared/data/glue/CoLA", "protocol": "propetl", "method": "capaboost-lora",
                "d": d, "density": 1.0 if d == 1 else 0.5, "r": r, "max_steps": 24, "batch_size": 8, "lr": 2e-3,
                "max_seq_len": 64, "max_eval_samples": 64, "seed": 0, "threads": 1, "output_dir": str(out),
                "resume": True, "progress": False,
            }))
            model, _ = load_trained(out)
            exact = delta_ranks(model)
            with torch.no_grad():
                # float32 ΔW with matrix_rank's float32 tolerance (max(m, n) * eps * σ_max); a cast to float64
                # would judge the float32 rounding noise as rank
                dense = {m.capaboost_name: int(torch.linalg.matrix_rank(m.get_delta_weight("default")))
                         for m in model.modules() if isinstance(m, CapaBoostLoraLayer) and m.cblora_A}
            counts = parameter_counts(model)
            rows.append({"r": r, "d": d, "density": 1.0 if d == 1 else 0.5, "expected_rank": d * r,
                         "delta_ranks": sorted(set(exact.values())), "matrix_rank": sorted(set(dense.values())),
                         "modules": len(exact), "union": counts["union"], "dense_lora_r": counts["dense"],
                         "param_factor": counts["union"] / counts["dense"],
                         "expected_factor": 1 - (1 - (1.0 if d == 1 else 0.5)) ** d})
            print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rank_table.json").write_text(json.dumps(rows, indent=1))
    lines = ["| r | d | s | rank(ΔW) expected d·r | delta_ranks (12 modules) | matrix_rank of dense ΔW | "
             "stored params (union) | dense LoRA r | #Param factor | 1−(1−s)^d |", "|---" * 10 + "|"]
    for row in rows:
        lines.append(f"| {row['r']} | {row['d']} | {row['density']} | {row['expected_rank']} | "
                     f"{'/'.join(map(str, row['delta_ranks']))} | {'/'.join(map(str, row['matrix_rank']))} | "
                     f"{row['union']:,} | {row['dense_lora_r']:,} | {row['param_factor']:.4f} | "
                     f"{row['expected_factor']:.4f} |")
    (OUT / "rank_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
