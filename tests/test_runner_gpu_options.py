"""Runner options for GPUs, checked on the CPU: --precision, --gradient-checkpointing, TF32, pinned batches,
one host-device sync per log line, tokens/s in metrics.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import helpers
from capaboost.cli import build_parser, main
from capaboost.train import run as runner
from capaboost.train.run import loop, session
from capaboost.train.errors import ConfigError
from capaboost.train.run_config import RunConfig, make_config


def _run(tmp_path, bert, cache, name, **options):
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=options.pop("n_train", 16), n_dev=8)
    opts = dict(task="sst2", method="capaboost-lora", data_dir=data, model=bert, output_dir=str(tmp_path / name),
                batch_size=8, max_steps=3, max_seq_len=32, threads=1, progress=False, cache_dir=cache)
    return runner.train(RunConfig(**{**opts, **options}))


def _record_step_losses(monkeypatch):
    """float(loss) of every training step, read in the test (the runner itself no longer syncs per step)."""
    import accelerate

    losses: list[float] = []
    backward = accelerate.Accelerator.backward

    def recording(self, loss, **kwargs):
        losses.append(float(loss.detach()))
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "backward", recording)
    return losses


def _hook_model(monkeypatch, hook):
    """Call ``hook(model)`` on the model the runner builds, right after the method wraps it."""
    apply_method = session.apply_method

    def wrapped(cfg, model, ctx):
        model = apply_method(cfg, model, ctx)
        hook(model)
        return model

    monkeypatch.setattr(session, "apply_method", wrapped)


# ---------------------------------------------------------------- --precision


def test_bf16_trains_under_autocast_and_fp32_does_not(tmp_path, bert, cache, monkeypatch):
    import accelerate

    dtypes: list[torch.dtype] = []

    def watch_linears(model):
        def record(module, args, output):
            if module.training:
                dtypes.append(output.dtype)

        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(record)

    _hook_model(monkeypatch, watch_linears)
    losses = _record_step_losses(monkeypatch)
    bf16 = _run(tmp_path, bert, cache, "bf16", precision="bf16")
    assert torch.bfloat16 in set(dtypes), set(dtypes)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(e["loss"]) for e in bf16["train_loss"])
    assert bf16["precision"] == "bf16" and bf16["config"]["precision"] == "bf16"
    assert bf16["tf32"] is None and bf16["device"] == "cpu"  # TF32 is a CUDA setting: null on the CPU
    on_disk = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert on_disk["precision"] == "bf16"
    assert accelerate.Accelerator().mixed_precision == "no"  # a later plain Accelerator() does not inherit bf16
    # the same process afterwards: fp32 really is fp32 (Accelerate's process-wide state is not inherited)
    dtypes.clear()
    fp32 = _run(tmp_path, bert, cache, "fp32")
    assert dtypes and set(dtypes) == {torch.float32}
    assert fp32["precision"] == "fp32"


def test_fp16_without_cuda_and_unknown_precisions_are_refused_before_training(tmp_path, bert, cache, capsys,
                                                                               monkeypatch):
    with pytest.raises(ConfigError, match=r"--precision fp16 needs a CUDA GPU.*'cpu'.*--precision bf16"):
        _run(tmp_path, bert, cache, "fp16", precision="fp16")
    assert not (tmp_path / "fp16").exists() or not any((tmp_path / "fp16").iterdir())
    import accelerate

    assert accelerate.Accelerator().mixed_precision == "no"  # the refused precision is not left behind
    assert runner.precision_problem("fp16", "cuda") is None and runner.precision_problem("bf16", "cpu") is None
    with pytest.raises(ConfigError, match="--precision must be one of fp32, bf16, fp16, got 'fp8'"):
        make_config({"task": "sst2", "precision": "fp8"})
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=16, n_dev=8)
    argv = ["train", "--task", "sst2", "--data-dir", data, "--model", bert, "--output-dir", str(tmp_path / "cli"),
            "--precision", "fp16", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --precision fp16 needs a CUDA GPU") and err.count("\n") == 1
    # a launcher's mixed precision that --precision contradicts is refused, not silently overridden
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="launcher asked for mixed precision 'bf16'.*--precision bf16"):
        _run(tmp_path, bert, cache, "env")


def test_cli_flags_reach_the_config():
    args = vars(build_parser().parse_args(["train", "--precision", "bf16", "--gradient-checkpointing", "--no-tf32"]))
    assert (args["precision"], args["gradient_checkpointing"], args["tf32"]) == ("bf16", True, False)
    defaults = RunConfig()
    assert (defaults.precision, defaults.gradient_checkpointing, defaults.tf32) == ("fp32", False, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--precision", "fp64"])


def test_resume_compares_precision_and_treats_options_a_record_lacks_as_defaults():
    cfg = RunConfig(task="sst2", model="m")
    saved = json.loads(json.dumps(cfg.identity(), default=str))
    del saved["precision"], saved["tf32"]  # a run recorded before these options existed
    assert runner.identity_diff(saved, cfg, "x") is None
    assert "precision" in runner.identity_diff({**saved, "precision": "bf16"}, cfg, "x")
    assert runner.identity_diff({**saved, "gradient_checkpointing": True}, cfg, "x") is None  # same gradients


# ---------------------------------------------------------------- --gradient-checkpointing


def test_gradient_checkpointing_recomputes_layers_with_the_same_losses(tmp_path, bert, cache, monkeypatch):
    state: dict[str, object] = {}

    def watch_layers(model):
        base = model.get_base_model()
        state["base"] = base
        state["calls"] = 0

        def count(module, args, output):
            if module.training:
                state["calls"] = int(state["calls"]) + 1

        for module in base.modules():  # inside the checkpointed layer forward (the layer's own hooks stay outside)
            if type(module).__name__ == "BertAttention":
                module.register_forward_hook(count)

    _hook_model(monkeypatch, watch_layers)
    losses = _record_step_losses(monkeypatch)
    options = dict(lr=0.05, max_steps=6, n_train=24)
    plain = _run(tmp_path, bert, cache, "plain", **options)
    plain_losses, plain_calls = list(losses), state["calls"]
    assert state["base"].is_activation_checkpointing is False
    losses.clear()
    ckpt = _run(tmp_path, bert, cache, "ckpt", gradient_checkpointing=True, **options)
    assert state["base"].is_activation_checkpointing is True
    # non-reentrant: the hook transformers and PEFT put on the embeddings for reentrant checkpointing is not
    # needed (the equal losses and adapters below show it) and is removed
    assert not state["base"].get_input_embeddings()._forward_hooks
    assert plain_calls == 6 * 2 and state["calls"] == 2 * plain_calls  # each layer recomputed in the backward
    assert np.allclose(losses, plain_losses, rtol=1e-5, atol=1e-6), (losses, plain_losses)
    a = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"))
    trained_b = [k for k in a if "cblora_B" in k]
    assert trained_b and all(a[k].abs().max() > 0 for k in trained_b)  # the adapters inside the layers trained
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert ckpt["gradient_checkpointing"] is True and plain["gradient_checkpointing"] is False


def test_gradient_checkpointing_is_refused_where_it_cannot_apply(tmp_path, bert, cache):
    from capaboost.train.models import TimmClassifier

    for method in ("prefix", "capaboost-prefix"):
        with pytest.raises(ConfigError, match=f"--gradient-checkpointing cannot be used with method '{method}'"):
            _run(tmp_path, bert, cache, method, method=method, gradient_checkpointing=True)
        assert not (tmp_path / method / "metrics.json").exists()
    with pytest.raises(ConfigError, match=r"the model \(TimmClassifier\) does not support gradient checkpointing"):
        runner.enable_gradient_checkpointing(TimmClassifier(torch.nn.Linear(4, 2)), "lora")


# ---------------------------------------------------------------- TF32


@pytest.mark.parametrize("capability, flag, wanted", [
    (None, True, None), (None, False, None),  # no CUDA device: nothing to decide, recorded as null
    ((7, 0), True, False), ((7, 5), True, False),  # Volta/Turing have no TF32
    ((8, 0), True, True), ((8, 6), True, True), ((9, 0), True, True),  # Ampere, Ada, Hopper
    ((8, 0), False, False), ((9, 0), False, False),  # --no-tf32
])
def test_tf32_is_on_by_default_from_ampere_on(capability, flag, wanted):
    assert runner.tf32_wanted(capability, flag) is wanted


def test_tf32_flags_are_set_for_cuda_devices_only_and_restored(monkeypatch):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert runner.set_tf32(torch.device("cpu"), True)[0] is None
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        wanted, restore = runner.set_tf32(torch.device("cuda"), True)
        assert wanted is True and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        restore()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        wanted, restore = runner.set_tf32(torch.device("cuda"), False)  # --no-tf32
        assert wanted is False and not torch.backends.cuda.matmul.allow_tf32
        restore()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------- pinned batches, syncs, throughput


class _FakeTensor:
    def __init__(self) -> None:
        self.calls: list = []

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", device.type, non_blocking))
        return self


def test_batches_are_pinned_and_copied_asynchronously_only_for_cuda():
    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.tensor([0, 1])}
    on_cpu = runner.batch_to_device(batch, torch.device("cpu"))
    assert all(not v.is_pinned() and torch.equal(v, batch[k]) for k, v in on_cpu.items())
    fake = _FakeTensor()
    runner.batch_to_device({"x": fake}, torch.device("cpu"))
    assert fake.calls == [("to", "cpu", False)]
    fake = _FakeTensor()
    runner.batch_to_device({"x": fake}, torch.device("cuda", 0))
    assert fake.calls == ["pin_memory", ("to", "cuda", True)]
    assert runner.count_tokens({"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}) == 3
    assert runner.count_tokens({"pixel_values": torch.zeros(2, 3)}) == 0


def test_losses_are_read_back_per_log_line_with_the_same_values_and_tokens_per_s(tmp_path, bert, cache, monkeypatch):
    import accelerate

    shapes: list[tuple] = []
    reduce = accelerate.Accelerator.reduce

    def recording_reduce(self, tensor, reduction="sum", scale=1.0):
        shapes.append(tuple(tensor.shape))
        return reduce(self, tensor, reduction, scale)

    tokens: list[int] = []
    to_device = runner.batch_to_device

    def recording_to_device(batch, device):
        if "labels" in batch:  # training batches (evaluation drops the labels)
            tokens.append(int(batch["attention_mask"].sum()))
        return to_device(batch, device)

    monkeypatch.setattr(accelerate.Accelerator, "reduce", recording_reduce)
    monkeypatch.setattr(loop, "batch_to_device", recording_to_device)
    losses = _record_step_losses(monkeypatch)
    metrics = _run(tmp_path, bert, cache, "sync", max_steps=25, n_train=200)  # one epoch: 25 steps of 8
    assert len(losses) == 25
    assert [e["step"] for e in metrics["train_loss"]] == [20, 25]
    assert [e["loss"] for e in metrics["train_loss"]] == [float(np.mean(losses[:20])), float(np.mean(losses[20:]))]
    assert () not in shapes  # no per-step reduce of a scalar loss ...
    assert (20,) in shapes and (5,) in shapes  # ... one per log line, of the losses since the last one
    log = (tmp_path / "sync" / "train.log").read_text()
    assert f"step 20 loss {np.mean(losses[:20]):.4f}" in log
    assert len(tokens) == 25 and sum(tokens) > 25 * 8
    assert metrics["train_tokens_per_s"] == pytest.approx(sum(tokens) / metrics["train_time_s"])
    assert metrics["train_examples_per_s"] == pytest.approx(25 * 8 / metrics["train_time_s"])
    assert metrics["eval_tokens_per_s"] > 0 and metrics["eval_examples_per_s"] > 0
