"""QLoRA-style CapaBoost-LoRA: a small decoder trained on a 4-bit (or 8-bit / int8) base vs its float base.

Each base runs in its own process (so one run's allocations cannot hide in another's peak): build the LLaMA
from its config (same seed, so the same float weights), quantize it with ``capaboost.quantize.quantize_base``,
wrap it with CapaBoost-LoRA on every linear of the blocks (same masks and init in every run), train on a synthetic
low-entropy Markov "language", then measure the merges. Reported per run:

* base storage: parameter + buffer bytes as stored (``storage_bytes``: packed 4-bit data + statistics, int8 data
  + scales), split into the quantized blocks and the float rest (embeddings, lm_head, norms);
* RSS after set-up, and the peak RSS during training (Linux VmHWM, reset by ``/proc/self/clear_refs`` once the
  model is ready, so the float weights that existed before quantization are not counted);
* loss every step, wall time per step;
* merge errors (max |logit| difference on held-out batches vs the unmerged model): the re-quantized merge, PEFT's
  own LoRA merge of the same ΔW (``export_as_lora`` then ``merge_adapter``), and the merge after ``dequantize_base``.

    python benchmarks/qlora_memory.py                       # float nf4 8bit int8, 30 steps, markdown to stdout
    python benchmarks/qlora_memory.py --kinds float nf4 --steps 10 --hidden 128 --layers 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def markov_batches(vocab: int, n: int, batch: int, seq: int, seed: int):
    """Token batches from a fixed random Markov chain whose every token has 4 likely successors (~2 nats)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            ids[:, t] = succ[ids[:, t - 1], torch.randint(0, 4, (batch,), generator=g)]
        out.append(ids)
    return out


def run_one(args) -> dict:
    """One base kind, in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "src"))
    import capaboost  # noqa: F401
    from capaboost import CapaBoostLoraConfig, export_as_lora
    from capaboost.lora.quantized import dequantize_base
    from capaboost.quantize import quantize_base, storage_bytes
    from peft import PeftModel, get_peft_model

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    rss_start = rss_kib("VmRSS")
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.seq, tie_word_embeddings=False)

    def base_model():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        return model if args.kind == "float" else quantize_base(model, args.kind)

    model = base_model()
    blocks = model.model.layers
    base_bytes = storage_bytes(model)
    block_bytes = storage_bytes(blocks)
    peft_cfg = CapaBoostLoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, num_copies=2,
                                   mask_density=0.5, mask_seed=0)
    torch.manual_seed(1)  # the same adapter init in every run
    model = get_peft_model(model, peft_cfg)
    adapter_bytes = storage_bytes(model, trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    train = markov_batches(args.vocab, args.steps, args.batch, args.seq, seed=0)
    held_out = markov_batches(args.vocab, 2, args.batch, args.seq, seed=99)
    rss_ready = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    model.train()
    losses, times = [], []
    for ids in train:
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    peak_train = rss_kib("VmHWM")
    model.eval()

    def logits(m):
        with torch.no_grad():
            return torch.cat([m(ids).logits for ids in held_out])

    unmerged = logits(model)
    eval_loss = sum(model(ids, labels=ids).loss.item() for ids in held_out) / len(held_out)
    errors = {"logit_scale": unmerged.abs().max().item()}
    model.merge_adapter()
    errors["merge"] = (logits(model) - unmerged).abs().max().item()
    model.unmerge_adapter()
    errors["unmerge_round_trip"] = (logits(model) - unmerged).abs().max().item()
    if args.kind != "float":
        # the trained adapter on a fresh base (the round trip above re-quantized this one)
        out = Path(args.tmp) / f"adapter-{args.kind}"
        model.save_pretrained(out)
        fresh = PeftModel.from_pretrained(base_model(), out).eval()
        lora = export_as_lora(fresh)  # PEFT's own quantized LoRA layers
        errors["export"] = (logits(lora) - unmerged).abs().max().item()
        try:
            lora.merge_adapter()
            errors["peft_lora_merge"] = (logits(lora) - unmerged).abs().max().item()
        except ValueError as exc:  # PEFT's torchao LoRA re-quantizes only with the model's hf_quantizer
            errors["peft_lora_merge"] = f"n/a: {str(exc).split(',')[0]}"
        fresh = PeftModel.from_pretrained(base_model(), out).eval()
        dequantize_base(fresh)
        errors["dequantized_unmerged"] = (logits(fresh) - unmerged).abs().max().item()
        errors["dequantized_merge"] = (logits(fresh.merge_and_unload()) - unmerged).abs().max().item()
    return {
        "kind": args.kind, "base_bytes": base_bytes, "block_bytes": block_bytes, "adapter_bytes": adapter_bytes,
        "rss_start_mib": rss_start / 1024, "rss_ready_mib": rss_ready / 1024, "peak_train_mib": peak_train / 1024,
        "losses": losses, "eval_loss": eval_loss, "step_s": sorted(times)[len(times) // 2], "train_s": sum(times),
        "errors": errors,
    }


def table(results: list[dict], args) -> str:
    mib = 1 / 2**20
    rows = [
        f"LLaMA from config: hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
        f"vocab {args.vocab}; CapaBoost-LoRA d=2 r={args.r} s=0.5 on {', '.join(TARGETS)}; batch {args.batch} x "
        f"{args.seq} tokens, {args.steps} AdamW steps (lr {args.lr}), {args.threads} thread(s).",
        "",
        "| base | base storage (MiB) | of which blocks | adapter (MiB) | RSS ready (MiB) | peak RSS training (MiB) "
        "| step (s, median) | loss first → last | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['kind']} | {r['base_bytes'] * mib:.1f} | {r['block_bytes'] * mib:.1f} | {r['adapter_bytes'] * mib:.2f} "
            f"| {r['rss_ready_mib']:.0f} | {r['peak_train_mib']:.0f} | {r['step_s']:.2f} "
            f"| {r['losses'][0]:.3f} → {r['losses'][-1]:.3f} | {r['eval_loss']:.3f} |"
        )
    rows += ["", "Loss every 5 steps:", "", "| step | " + " | ".join(r["kind"] for r in results) + " |",
             "|---|" + "---|" * len(results)]
    for i in range(0, args.steps, 5):
        rows.append(f"| {i} | " + " | ".join(f"{r['losses'][i]:.3f}" for r in results) + " |")
    rows += ["", "Merge errors, max |logit difference| on 2 held-out batches vs the unmerged model:", "",
             "| base | max logit | merge (re-quantized) | unmerge round trip | PEFT LoRA merge, same ΔW "
             "| export_as_lora | dequantize_base: unmerged | dequantize_base + merge |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        e = r["errors"]
        keys = ("merge", "unmerge_round_trip", "peft_lora_merge", "export", "dequantized_unmerged", "dequantized_merge")
        cells = [e.get(k) for k in keys]
        shown = ["—" if c is None else c if isinstance(c, str) else f"{c:.2e}" for c in cells]
        rows.append(f"| {r['kind']} | {e['logit_scale']:.3f} | " + " | ".join(shown) + " |")
    return "\n".join(rows)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["float", "nf4", "8bit", "int8"],
                   choices=["float", "nf4", "fp4", "8bit", "int8"])
    p.add_argument("--kind", help=argparse.SUPPRESS)  # internal: run one kind in this process
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.kind:
        print("RESULT " + json.dumps(run_one(args)))
        return []
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
            cmd = [sys.executable, __file__, *passthrough, "--kind", kind, "--tmp", tmp]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"run {kind} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            print(f"{kind}: done in {results[-1]['train_s']:.1f} s of training", file=sys.stderr)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
