"""Op-count proxy for GPU launch cost: aten ops in ONE training step, CapaBoost-LoRA vs PEFT LoRA.

A small-rank adapter step on a GPU is bound by kernel launches, and CPU op counts are deterministic
(no timing noise), so they can be compared on any machine. One step = forward, backward and an AdamW
step (``foreach=True``, the GPU default) of a tiny LLaMA (2 layers, all 7 projections adapted),
counted after one warm-up step (caches and optimizer state built). Three counts per method:

* ``top-level``: torch.profiler aten events with no aten ancestor (the issue's measure; a composite
  op such as ``aten::linear`` counts once);
* ``dispatched``: every aten op reaching a TorchDispatchMode (composites decomposed, views included);
* ``kernels``: dispatched ops that are neither views nor bare allocations (``empty``), the closest
  CPU proxy of GPU kernel launches.

    python benchmarks/bench_ops.py [--layers 2] [--hidden 64]
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import capaboost  # noqa: F401  (registers the method)
from capaboost import CapaBoostLoraConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS: dict[str, Callable[[], object]] = {
    "capaboost d=2 r=8": lambda: CapaBoostLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, num_copies=2,
                                                     mask_density=0.5),
    "lora r=16": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS),
    "lora r=8": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
}


_NO_KERNEL = {torch.ops.aten._unsafe_view.default, torch.ops.aten.empty.memory_format,
              torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default}


class _Dispatched(TorchDispatchMode):
    """Counts aten ops below autograd; separately those that launch no kernel (views, allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += bool(func.is_view) or func in _NO_KERNEL
        return func(*args, **(kwargs or {}))


def _top_level(prof) -> int:
    def is_top(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and is_top(e))


def count(method: str, layers: int, hidden: int, seq: int) -> dict[str, int]:
    """Op counts of the second training step of ``method`` (the first builds caches and AdamW state)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    model = get_peft_model(LlamaForCausalLM(cfg), METHODS[method]())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with _Dispatched() as mode:
        step()
    with profile() as prof:
        step()
    return {"top-level": _top_level(prof), "dispatched": mode.ops, "kernels": mode.ops - mode.views}


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=16)
    args = ap.parse_args(argv)
    counts = {m: count(m, args.layers, args.hidden, args.seq) for m in METHODS}
    cb, l16, l8 = "capaboost d=2 r=8", "lora r=16", "lora r=8"
    print(f"tiny LLaMA ({args.layers} layers, hidden {args.hidden}, all 7 projections), one training step "
          f"(forward + backward + AdamW foreach), torch {torch.__version__}")
    print("| method | top-level aten ops | dispatched aten ops | non-view, non-alloc (≈ kernels) |")
    print("|---|---:|---:|---:|")
    for m, c in counts.items():
        print(f"| {m} | {c['top-level']:,} | {c['dispatched']:,} | {c['kernels']:,} |")
    for key in ("top-level", "dispatched", "kernels"):
        print(f"- {key}: CapaBoost / LoRA r=16 = **{counts[cb][key] / counts[l16][key]:.3f}**, "
              f"CapaBoost / LoRA r=8 = {counts[cb][key] / counts[l8][key]:.3f}")
    return counts


if __name__ == "__main__":
    main()
