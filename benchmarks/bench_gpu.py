"""GPU step time: CapaBoost-LoRA vs PEFT LoRA, as ratios measured in one process.

Two cases (issue 11), each timed in interleaved rounds with the order rotated every round, the median
per method, CUDA events around each round's steps:

* a LLaMA-shaped decoder built from its config (hidden 2048, intermediate 5632, 8 layers, 16 heads,
  vocab 32000), batch 4x1024 tokens, bf16, all 7 projections adapted, one step = forward + backward +
  AdamW: CapaBoost d=2 r=8 vs LoRA r=16 (same rank) and LoRA r=8; also peak GPU memory per step;
* one frozen 4096x4096 linear on 8,192 tokens, forward + backward: CapaBoost d=2 r=16 vs LoRA r=32.

Before timing, one CapaBoost forward + backward of the linear runs under
``torch.cuda.set_sync_debug_mode("error")``: any host-device sync in the adapter path raises.

    python benchmarks/bench_gpu.py [--rounds 7] [--steps 5] [--adapter-dtype auto|model]
    python benchmarks/bench_gpu.py --smoke      # tiny shapes on the CPU, so the script never rots
    python benchmarks/bench_gpu.py --profile /tmp/prof.md   # + per-kernel device time of 3 LLaMA steps each

``--adapter-dtype auto`` is PEFT's default (bf16 base, float32 adapter weights); ``model`` keeps the
adapters in the base model's dtype (``autocast_adapter_dtype=False``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import capaboost  # noqa: F401  (registers the method)
from capaboost import CapaBoostLoraConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(hidden=2048, intermediate=5632, layers=8, heads=16, vocab=32000, batch=4, seq=1024, dim=4096, tokens=8192)
SMOKE = dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=128, batch=2, seq=16, dim=64, tokens=32)


class _Timer:
    """Seconds of a block: CUDA events on a GPU (no sync inside the block), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None], steps: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / steps
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps


def interleaved(steps_by_name: dict[str, Callable[[], None]], timer: _Timer, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each callable, rounds interleaved in rotated order (2 warm-up steps each)."""
    names = list(steps_by_name)
    for fn in steps_by_name.values():
        fn()
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(timer(steps_by_name[n], steps))
    return {n: statistics.median(v) for n, v in times.items()}


def llama_case(shape: dict, device: torch.device, dtype: torch.dtype, autocast_adapter: bool, rounds: int,
               steps: int) -> tuple[dict[str, float], dict[str, float], dict[str, Callable[[], None]]]:
    methods = {
        "capaboost d=2 r=8": CapaBoostLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, num_copies=2,
                                                 mask_density=0.5),
        "lora r=16": LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS),
        "lora r=8": LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
    }
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["heads"], vocab_size=shape["vocab"])
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(1)).to(device)
    steps_by_name, peak = {}, {}
    for name, peft_cfg in methods.items():
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        model = get_peft_model(base, peft_cfg, autocast_adapter_dtype=autocast_adapter)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt) -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps_by_name[name] = step
    if device.type == "cuda":
        for name, step in steps_by_name.items():
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated()
    return interleaved(steps_by_name, _Timer(device), rounds, steps), peak, steps_by_name


def profile(steps_by_name: dict[str, Callable[[], None]], device: torch.device, path: str, steps: int = 3) -> str:
    """Where each method's step time goes: torch.profiler tables (device time on a GPU) written to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    parts = [f"# bench_gpu.py profile: {steps} steps per method, sorted by {sort}\n"]
    for name, step in steps_by_name.items():
        step()
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if cuda and e.device_type.name == "CUDA")
        parts.append(f"## {name}: {kernels / steps:.0f} device kernels per step\n\n```\n"
                     f"{events.table(sort_by=sort, row_limit=25, max_name_column_width=70)}\n```\n")
    text = "\n".join(parts)
    with open(path, "w") as f:
        f.write(text)
    return text


def linear_case(shape: dict, device: torch.device, dtype: torch.dtype, autocast_adapter: bool, rounds: int,
                steps: int) -> dict[str, float]:
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(shape["dim"], shape["dim"], bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    x = torch.randn(shape["tokens"], shape["dim"], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    methods = {
        "capaboost d=2 r=16": CapaBoostLoraConfig(r=16, lora_alpha=32, target_modules=["proj"],
                                                  init_lora_weights=False),
        "lora r=32": LoraConfig(r=32, lora_alpha=32, target_modules=["proj"], init_lora_weights=False),
    }
    steps_by_name = {}
    for name, peft_cfg in methods.items():
        torch.manual_seed(0)
        model = get_peft_model(One().to(device=device, dtype=dtype), peft_cfg, autocast_adapter_dtype=autocast_adapter)
        params = [p for p in model.parameters() if p.requires_grad]

        def fwd_bwd(model=model, params=params) -> None:
            model(x).float().sum().backward()
            for p in params:
                p.grad = None

        steps_by_name[name] = fwd_bwd
    if device.type == "cuda":  # the adapter path must not sync: raise if it does
        steps_by_name["capaboost d=2 r=16"]()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps_by_name["capaboost d=2 r=16"]()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return interleaved(steps_by_name, _Timer(device), rounds, steps)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="steps per method per round")
    ap.add_argument("--adapter-dtype", choices=("auto", "model"), default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (float32), 2 rounds of 1 step")
    ap.add_argument("--profile", metavar="PATH", help="also write per-kernel tables of 3 LLaMA steps per method here")
    args = ap.parse_args(argv)
    if args.smoke:
        shape, device, dtype, rounds, steps = SMOKE, torch.device("cpu"), torch.float32, 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA GPU; use --smoke to run the tiny CPU version.")
        shape, device, dtype, rounds, steps = FULL, torch.device("cuda"), torch.bfloat16, args.rounds, args.steps
    autocast_adapter = args.adapter_dtype == "auto"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke: shapes too small to mean anything)"
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; adapter weights "
          f"{'float32 (PEFT default)' if autocast_adapter else 'in the model dtype'}; {rounds} interleaved rounds x "
          f"{steps} steps, median")

    med, peak, llama_steps = llama_case(shape, device, dtype, autocast_adapter, rounds, steps)
    cb, l16, l8 = "capaboost d=2 r=8", "lora r=16", "lora r=8"
    print(f"\nLLaMA-shaped decoder (hidden {shape['hidden']}, intermediate {shape['intermediate']}, {shape['layers']} "
          f"layers, batch {shape['batch']}x{shape['seq']}), forward + backward + AdamW")
    print("| method | step ms (median) | vs LoRA r=16 | vs LoRA r=8 | peak MB | peak vs LoRA r=16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, t in med.items():
        mem = f"{peak[n] / 2**20:,.0f} | {peak[n] / peak[l16]:.3f}" if peak else "n/a | n/a"
        print(f"| {n} | {t * 1e3:.2f} | {t / med[l16]:.3f} | {t / med[l8]:.3f} | {mem} |")
    ratios = {"llama_vs_lora16": med[cb] / med[l16], "llama_vs_lora8": med[cb] / med[l8]}
    print(f"- CapaBoost / LoRA r=16: **{ratios['llama_vs_lora16']:.3f}** (target ≤ 1.03); "
          f"CapaBoost / LoRA r=8: **{ratios['llama_vs_lora8']:.3f}** (target ≤ 1.05)")
    if peak:
        ratios["llama_peak_vs_lora16"] = peak[cb] / peak[l16]
        print(f"- peak memory CapaBoost / LoRA r=16: **{ratios['llama_peak_vs_lora16']:.3f}** (target ≤ 1.00)")

    if args.profile:
        profile(llama_steps, device, args.profile)
        print(f"- profile of each method's step: {args.profile}")
    del llama_steps  # the three LLaMA models' memory goes back before the linear case

    lin = linear_case(shape, device, dtype, autocast_adapter, rounds, steps)
    ratios["linear_vs_lora32"] = lin["capaboost d=2 r=16"] / lin["lora r=32"]
    print(f"\none frozen {shape['dim']}x{shape['dim']} linear, {shape['tokens']:,} tokens, forward + backward: "
          f"CapaBoost d=2 r=16 / LoRA r=32 = **{ratios['linear_vs_lora32']:.3f}** (target ≤ 1.03; "
          f"{lin['capaboost d=2 r=16'] * 1e3:.3f} ms vs {lin['lora r=32'] * 1e3:.3f} ms)"
          + ("; no host-device sync in the CapaBoost forward + backward" if device.type == "cuda" else ""))
    return ratios


if __name__ == "__main__":
    main()
