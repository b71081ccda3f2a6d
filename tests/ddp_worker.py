"""Tiny CapaBoost BERT trained with DDP: run under ``torchrun`` by tests/test_distributed.py, or in-process.

Dropout is off and the optimizer is SGD with momentum, so a 2-rank run with the same global batch
equals the 1-process run up to float rounding (Adam's first step is ~sign(grad), which would
amplify rounding on near-zero gradients).

Usage: torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR RESUME_FROM_CKPT
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

import helpers  # noqa: E402  (tests/, on the path when run as a script or imported by pytest)
from capaboost import CapaBoostLoraConfig  # noqa: E402
from capaboost.distributed import (  # noqa: E402
    load_checkpoint,
    rank_and_world,
    save_checkpoint,
    shard_batch,
    trainable_state_dict,
    verify_masks_identical,
)

STEPS, CKPT_STEP, GLOBAL_BATCH, SEQ, VOCAB = 6, 3, 4, 8, 64
WATCHDOG_S = 200


def tiny_bert() -> BertForSequenceClassification:
    return helpers.tiny_bert(vocab_size=VOCAB, num_attention_heads=2, max_position_embeddings=32, num_labels=2,
                             **helpers.BERT_NO_DROPOUT)


def build_model(mask_seed: int = 0) -> torch.nn.Module:
    peft_config = CapaBoostLoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], mask_seed=mask_seed, init_lora_weights=False,
        task_type="SEQ_CLS",
    )
    return get_peft_model(tiny_bert(), peft_config)


def global_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "input_ids": torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
        "labels": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g),
    }


def train(ckpt_path: Path | None = None, resume: Path | None = None) -> dict:
    """Train to STEPS (from ``resume`` if given), writing a checkpoint at CKPT_STEP; returns the trainables."""
    model = build_model()
    verify_masks_identical(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    start = load_checkpoint(resume, model, opt)["step"] if resume else 0
    world = rank_and_world()[1]
    wrapped = DDP(model) if world > 1 else model
    for step in range(start, STEPS):
        loss = wrapped(**shard_batch(global_batch(step))).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if ckpt_path is not None and step + 1 == CKPT_STEP:
            save_checkpoint(ckpt_path, wrapped, opt, step=step + 1)
    return trainable_state_dict(wrapped)


def causal_lm_metrics() -> dict[str, float]:
    """Causal-LM metrics of a tiny GPT-2 on 5 examples (uneven shards on 2 ranks)."""
    from capaboost.data.causal_lm import CausalLMExample
    from capaboost.train.tasks.causal_lm import evaluate_causal_lm
    from test_causal_lm_data import tiny_gpt2, tiny_tokenizer

    examples = [CausalLMExample("what is one plus one", " two"), CausalLMExample("the capital of", " france paris"),
                CausalLMExample("", "a b c d", is_text=True), CausalLMExample("yes", " no"),
                CausalLMExample("one two", " three")]
    return evaluate_causal_lm(tiny_gpt2(), tiny_tokenizer(), examples, batch_size=2, max_new_tokens=2)


def main(out: Path, resume_from: Path) -> None:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hung rank prints its stacks and exits
    dist.init_process_group("gloo", timeout=timedelta(seconds=240))  # fail, never hang, if a rank dies
    rank, world = rank_and_world()
    model = build_model()
    ddp = DDP(model)
    ddp(**shard_batch(global_batch(0))).loss.backward()
    reducer = ddp._get_ddp_logging_data()  # what DDP's reducer all-reduces: the requires_grad tensors
    structure = {
        "world_size": world,
        "parameters": [n for n, _ in ddp.module.named_parameters()],
        "trainable": {n: p.numel() for n, p in ddp.module.named_parameters() if p.requires_grad},
        "buffers": [n for n, _ in ddp.module.named_buffers()],
        "reduced_tensors": int(reducer["num_parameter_tensors"]),
        "reduced_bytes": int(reducer["total_parameter_size_bytes"]),
    }
    del ddp, model
    final = train(out / "ckpt_w2")
    resumed = train(resume=resume_from)
    try:
        verify_masks_identical(build_model(mask_seed=rank))
        mismatch = None
    except RuntimeError as err:
        mismatch = str(err)
    structure["causal_lm_metrics"] = causal_lm_metrics()
    if rank == 0:
        torch.save({"final": final, "resumed": resumed}, out / "weights_w2.pt")
        (out / "structure.json").write_text(json.dumps(structure))
    (out / f"mismatch_rank{rank}.txt").write_text(mismatch or "")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
