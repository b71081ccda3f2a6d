"""FSDP probe on CPU/gloo for docs/distributed.md: FSDP2 (fully_shard) and FSDP1 on the tiny CapaBoost BERT.

Usage: torchrun --nproc_per_node 2 tests/ddp_fsdp.py OUT.json
Trains ddp_worker's schedule with each wrapper and records the max |difference| of the trainable
values from the 1-process run, or the error raised.
"""

from __future__ import annotations

import faulthandler
import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import ddp_worker
from capaboost.distributed import shard_batch, verify_masks_identical


SHARDING: dict[str, list[int]] = {}  # wrapper -> [packed values held by this rank, all packed values]


def run(wrap: str) -> dict:
    model = ddp_worker.build_model()
    verify_masks_identical(model)
    layers = model.base_model.model.bert.encoder.layer
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
        packed = [p for n, p in model.named_parameters() if ".cblora_" in n]
        SHARDING[wrap] = [sum(p.to_local().numel() for p in packed), sum(p.numel() for p in packed)]
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(layers[0])}), use_orig_params=True,
                       device_id=torch.device("cpu"))
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for step in range(ddp_worker.STEPS):
        wrapped(**shard_batch(ddp_worker.global_batch(step))).loss.backward()
        opt.step()
        opt.zero_grad()
    if wrap == "fsdp2":
        state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()
                 if p.requires_grad}
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped):
            state = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in wrapped.named_parameters()
                     if p.requires_grad}
    return state


def main(out: Path) -> None:
    faulthandler.dump_traceback_later(200, exit=True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    reference = ddp_worker.train()  # the DDP run (== the 1-process run, see test_distributed)
    report = {}
    for wrap in ("fsdp2", "fsdp1"):
        try:
            state = run(wrap)
            missing = sorted(set(reference) - set(state))
            report[wrap] = {"ok": not missing, "missing": missing[:3], "sharding": SHARDING.get(wrap), "max_abs_diff": max(
                (state[n].float() - reference[n]).abs().max().item() for n in reference if n in state)}
        except Exception as err:  # noqa: BLE001 - the probe records what fails
            report[wrap] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500],
                            "where": traceback.format_exc().splitlines()[-3:]}
        dist.barrier()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
