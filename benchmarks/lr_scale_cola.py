"""Issue 13, item 6: CapaBoost-LoRA's learning rate vs LoRA's, with and without ``scale_by_density``.

    python benchmarks/lr_scale_cola.py configs/lr_scale_sst2.yaml            # train (resumable, seed-major)
    python benchmarks/lr_scale_cola.py configs/lr_scale_sst2.yaml --report   # table + plot of the finished runs
    python benchmarks/lr_scale_cola.py configs/lr_scale_cola.yaml            # the CoLA version (GPU-sized)
    python benchmarks/lr_scale_cola.py --ratio                               # the d*s^2 check (no data needed)

Training goes through the runner exactly as ``capaboost sweep`` does (``expand_sweep`` + ``train`` with
``resume``); the third arm is ``capaboost-lora`` with ``scale_by_density: true`` (``--scale-by-density``). Runs go
seed-major, and within a seed lr by lr with every arm (seed 0 all, then seed 1 ...), so a sweep cut short
still compares all arms at the same seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

def run(path: str) -> None:
    from capaboost.train.run_config import make_config, read_config_file
    from capaboost.train.run import train
    from capaboost.train.report.sweep import expand_sweep, stale_options

    spec = read_config_file(path)
    runs = expand_sweep(spec)
    arms = [m["tag"] for m in spec["methods"]]
    runs.sort(key=lambda o: (o["seed"], o["lr"], arms.index(o["tag"].split("-lr")[0])))
    for i, options in enumerate(runs):
        out = Path(options["output_dir"])
        if (out / "metrics.json").exists():
            changed = stale_options(out, options)
            if changed:
                sys.exit(f"{out} holds a run of other options {changed}; move it away first.")
            continue
        start = time.time()
        metrics = train(make_config({**options, "resume": True}))
        if options.get("scale_by_density"):  # the option must have reached the saved adapter
            saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
            assert saved.get("scale_by_density") is True, out
        print(f"[{i + 1}/{len(runs)}] {out}: test {metrics['test']} in {time.time() - start:.0f}s", flush=True)


def report(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from capaboost.train.run_config import read_config_file

    spec = read_config_file(path)
    root = Path(spec["output_dir"])
    rows: dict[tuple[str, float], list[dict]] = {}
    for p in sorted(root.rglob("metrics.json")):
        m = json.loads(p.read_text())
        tag = m["tag"].split("-lr")[0]
        rows.setdefault((tag, m["config"]["lr"]), []).append(m)
    arms = [m["tag"] for m in spec["methods"]]
    lrs = sorted({lr for _, lr in rows})
    first = next(iter(rows.values()))[0]
    task, metric = first["task"], first["main_metric"]
    steps, n_train = first["steps"], first["sizes"]["train"]
    lines = ["| method | trainable params | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---|" + "---|" * len(lrs)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        cells, xs, means, stds = [], [], [], []
        params = None
        for lr in lrs:
            ms = rows.get((arm, lr), [])
            if not ms:
                cells.append("–")
                continue
            scores = np.array([100 * m["test"][m["main_metric"]] for m in ms])
            params = ms[0]["trainable_params"]
            # MCC 0 or accuracy at most 52% (SST-2 dev: 50.9% positive): the model predicts one class
            collapsed = sum(m["test"][m["main_metric"]] <= (0.52 if m["main_metric"] == "accuracy" else 0) for m in ms)
            note = f" ({collapsed} at chance)" if collapsed else ""
            per_seed = "/".join(f"{v:.1f}" for v in scores)
            cells.append(f"{scores.mean():.1f} ± {scores.std(ddof=1) if len(scores) > 1 else 0:.1f} "
                         f"(n={len(scores)}: {per_seed}){note}")
            xs.append(lr), means.append(scores.mean()), stds.append(scores.std(ddof=1) if len(scores) > 1 else 0)
        lines.append(f"| {arm} | {params:,} | " + " | ".join(cells) + " |")
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=arm)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("learning rate (adapter and head)")
    ax.set_ylabel(f"{task} test {metric} ×100 (mean ± std over seeds)")
    ax.set_title(f"{task}, MiniLM, {n_train:,} training examples, {steps} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"docs/{Path(path).stem}.png", dpi=120)
    wall = sum(m["wall_time_s"] for ms in rows.values() for m in ms)
    lines.append(f"\n{sum(len(v) for v in rows.values())} runs, {wall / 60:.1f} min of run wall time in all.")
    print("\n".join(lines))


def ratio() -> None:
    """‖ΔW‖ of CapaBoost-LoRA (d, s, rank r per copy) over ‖ΔW‖ of LoRA rank r and rank d*r, at alpha = 2*rank.

    (1) i.i.d. factors at LoRA's init statistics (A kaiming-uniform, B ~ N(0, 0.02^2) instead of LoRA's 0);
    CapaBoost and LoRA r use the SAME dense A, B, LoRA d*r its own draw. (2) From LoRA's init (B = 0), k Adam
    steps (lr 1e-3) on one fixed regression task (y = x (I + T)^T, T random rank 4); each model from the same
    A. Mean over 3 seeds. Two sizes: the norm ‖ΔW‖, and the coherent part, ΔW projected on a fixed direction U
    (the same-(A, B) LoRA product in (1), the target T in (2)): ⟨ΔW, U⟩ / ⟨U, U⟩. Prediction for the coherent
    part: d*s^2 vs LoRA r (E_masks Σ_i (B⊙m_Bi)(A⊙m_Ai) = d*s^2 B A); for the norm of i.i.d. factors
    sqrt(d*s^2 + d(d-1)*s^4) (the masked-out terms of different copies add incoherently).
    """
    import numpy as np
    import torch
    from peft import get_peft_model

    from capaboost import CapaBoostLoraConfig

    n, r, s = 384, 8, 0.5
    torch.set_num_threads(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(n, n, bias=False)

        def forward(self, x):
            return self.lin(x)

    def delta_norm(rank, d, dens, steps, seed):
        torch.manual_seed(seed)
        cfg = CapaBoostLoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"], num_copies=d,
                                  mask_density=dens, mask_seed=seed)
        model = get_peft_model(Net(), cfg)
        lay = next(m for m in model.modules() if hasattr(m, "capaboost_pairs"))
        pair = lay.capaboost_pairs["default"]
        gen = torch.Generator().manual_seed(1000 + seed)
        a = (torch.rand(rank, n, generator=gen) * 2 - 1) / n**0.5  # kaiming_uniform(a=sqrt(5)): U(±1/sqrt(in))
        b = torch.randn(n, rank, generator=gen) * 0.02 if not steps else torch.zeros(n, rank)
        with torch.no_grad():
            lay.cblora_A["default"].copy_(pair.A.pack(a))
            lay.cblora_B["default"].copy_(pair.B.pack(b))
        if steps:
            gen = torch.Generator().manual_seed(7)
            target = torch.randn(n, 4, generator=gen) @ torch.randn(4, n, generator=gen) / n
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            for _ in range(steps):
                x = torch.randn(64, n, generator=gen)
                loss = ((model(x) - x @ (torch.eye(n) + target).T) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        delta = lay.get_delta_weight("default")
        direction = target if steps else 2.0 * b @ a  # LoRA rank r with the same dense A, B (scaling 2)
        return delta.norm().item(), ((delta * direction).sum() / (direction * direction).sum()).item()

    print("| d | s | factors | norm: CB / LoRA r | sqrt(d·s²+d(d−1)s⁴) | norm: CB / LoRA d·r "
          "| coherent part: CB / LoRA r | d·s² |")
    print("|---|---|---|---|---|---|---|---|")
    for d in (2, 4):
        for steps, what in ((0, "i.i.d. at init statistics"), (10, "10 Adam steps from B = 0"),
                            (100, "100 Adam steps from B = 0")):
            vs_r, vs_dr, coh = [], [], []
            for seed in range(3):
                cb, lo = delta_norm(r, d, s, steps, seed), delta_norm(r, 1, 1.0, steps, seed)
                vs_r.append(cb[0] / lo[0])
                vs_dr.append(cb[0] / delta_norm(d * r, 1, 1.0, steps, seed)[0])
                coh.append(cb[1] / lo[1])
            incoherent = (d * s**2 + d * (d - 1) * s**4) ** 0.5
            print(f"| {d} | {s} | {what} | {np.mean(vs_r):.3f} ± {np.std(vs_r):.3f} | {incoherent:.3f} | "
                  f"{np.mean(vs_dr):.3f} ± {np.std(vs_dr):.3f} | {np.mean(coh):.3f} ± {np.std(coh):.3f} | "
                  f"{d * s * s:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/lr_scale_cola.yaml")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--ratio", action="store_true")
    args = parser.parse_args()
    if args.ratio:
        ratio()
    elif args.report:
        report(args.config)
    else:
        run(args.config)


if __name__ == "__main__":
    main()
