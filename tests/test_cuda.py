"""Checks that only a CUDA GPU can make: skipped on the CPU-only CI, run on a lent GPU with
``pytest tests/test_cuda.py`` (see docs/benchmarks.md for the last run and its device).

The same adapter built on the CPU and on the GPU must be the same function (masks from the counter-based
generator, gathers through device-side index tables); a training step must never wait on the host
(``torch.cuda.set_sync_debug_mode("error")`` raises on any sync); the runner must train in every precision.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

import helpers
from capaboost import CapaBoostLoraConfig
from capaboost.tuner import masks_fingerprint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 would make CPU-vs-GPU comparisons loose; these tests compare float32 to float32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _capaboost_llama(device: str, **options):
    model = helpers.tiny_llama(seed=0).to(device)
    config = CapaBoostLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **options)
    torch.manual_seed(1)
    return get_peft_model(model, config)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("pattern", ["random", "2:4"])
def test_the_adapter_built_on_the_gpu_is_the_cpu_one(pattern):
    cpu, gpu = _capaboost_llama("cpu", mask_pattern=pattern), _capaboost_llama("cuda", mask_pattern=pattern)
    assert masks_fingerprint(cpu) == masks_fingerprint(gpu)
    with torch.no_grad():  # same packed values on both: then ΔW, forward and gradients must agree
        for name, p in _trainable(gpu).items():
            p.copy_(_trainable(cpu)[name])
    deltas = 0
    for (name, c), (_, g) in zip(cpu.named_modules(), gpu.named_modules()):
        if hasattr(c, "capaboost_pairs"):
            torch.testing.assert_close(g.get_delta_weight("default").cpu(), c.get_delta_weight("default"),
                                       rtol=1e-5, atol=1e-6, msg=name)
            deltas += 1
    assert deltas == 2 * len(TARGETS)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    out_c = cpu(input_ids=ids, labels=ids)
    out_g = gpu(input_ids=ids.cuda(), labels=ids.cuda())
    torch.testing.assert_close(out_g.logits.cpu(), out_c.logits, rtol=1e-4, atol=1e-5)
    out_c.loss.backward()
    out_g.loss.backward()
    grads_c = {n: p.grad for n, p in _trainable(cpu).items()}
    for name, p in _trainable(gpu).items():
        torch.testing.assert_close(p.grad.cpu(), grads_c[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_a_training_step_never_syncs_with_the_host(autocast):
    """Forward, backward and AdamW of CapaBoost-LoRA linears: both the fused path and the autocast one."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).cuda()
    model = get_peft_model(net, CapaBoostLoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"],
                                                    init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    x = torch.randn(32, 64, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # first step: device tables and optimizer state are created (allowed to sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_merge_on_the_gpu_equals_the_unmerged_forward():
    model = _capaboost_llama("cuda").eval()
    ids = torch.randint(0, 100, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_runner_trains_on_the_gpu_in_each_precision(tmp_path, bert, cache, precision):
    from capaboost.train import run as runner
    from capaboost.train.run_config import RunConfig

    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=32, n_dev=8)
    metrics = runner.train(RunConfig(
        task="sst2", method="capaboost-lora", data_dir=data, model=bert, output_dir=str(tmp_path / precision),
        batch_size=8, max_steps=4, max_seq_len=32, threads=1, progress=False, cache_dir=cache, precision=precision,
    ))
    assert metrics["device"] == "cuda" and metrics["precision"] == precision
    assert metrics["tf32"] is (torch.cuda.get_device_capability() >= (8, 0))
    assert all(math.isfinite(e["loss"]) for e in metrics["train_loss"])
    assert metrics["train_tokens_per_s"] > 0 and metrics["train_examples_per_s"] > 0
