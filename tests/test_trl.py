"""TRL (``pip install capaboost[trl]``, tested with trl 1.16.0) trains CapaBoost-LoRA as passed in ``peft_config``:
SFT (save, exact reload, merge), gradient checkpointing, bf16 autocast, DPO (reference = adapter disabled) and
GRPO, on a tiny GPT-2 / LLaMA built from a config with an offline word-level tokenizer, on the CPU."""

from __future__ import annotations

import random

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL extra is not installed: pip install capaboost[trl]")
datasets = pytest.importorskip("datasets")

from peft import PeftModel  # noqa: E402

from capaboost import CapaBoostLoraConfig, export_as_lora  # noqa: E402
import helpers  # noqa: E402
from test_causal_lm_data import CLM_GPT2, WORDS, tiny_tokenizer  # noqa: E402

LLAMA = dict(vocab_size=32, bos_token_id=0, eos_token_id=1)
TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj"]}
IDS = torch.tensor([[3, 7, 11, 4, 19, 5], [8, 8, 2, 21, 13, 6]])
COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, per_device_train_batch_size=4,
              learning_rate=2e-2, disable_tqdm=True)


def base(arch: str):
    return helpers.tiny_gpt2(**CLM_GPT2) if arch == "gpt2" else helpers.tiny_llama(**LLAMA)


def config(arch: str, **kwargs) -> CapaBoostLoraConfig:
    return CapaBoostLoraConfig(**{"r": 4, "lora_alpha": 8, "num_copies": 2, "target_modules": TARGETS[arch],
                                  "task_type": "CAUSAL_LM", "init_lora_weights": False, **kwargs})


def tokenizer():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    return tok


def text_data(n: int = 12):
    rng = random.Random(0)
    return datasets.Dataset.from_list([{"text": " ".join(rng.sample(WORDS, 5))} for _ in range(n)])


def adapter_values(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "cblora_" in n}


def logits(model, ids=IDS, bf16: bool = False) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=ids).logits.float()


def sft(arch: str, tmp_path, steps: int = 3, **args):
    trainer = trl.SFTTrainer(model=base(arch), train_dataset=text_data(), processing_class=tokenizer(),
                             peft_config=config(arch),
                             args=trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=steps, max_length=16,
                                                **{**COMMON, **args}))
    before = adapter_values(trainer.model)
    trainer.train()
    return trainer, before


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sft_trains_saves_reloads_exactly_and_merges(arch, tmp_path):
    trainer, before = sft(arch, tmp_path)
    model = trainer.model
    assert isinstance(model, PeftModel) and isinstance(model.peft_config["default"], CapaBoostLoraConfig)
    assert trainer.args.gradient_checkpointing  # TRL's default: the path every SFT user takes
    after = adapter_values(model)
    assert after and all(not torch.equal(before[n], after[n]) for n in after)  # every packed factor trained
    fresh = base(arch)
    frozen = {n.replace("base_layer.", ""): p for n, p in model.get_base_model().named_parameters() if "cblora_" not in n}
    assert all(torch.equal(p, frozen[n]) for n, p in fresh.named_parameters())  # the base stayed frozen

    trainer.save_model(str(tmp_path / "adapter"))
    saved = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"peft_type": "CAPABOOST_LORA"' in saved
    reloaded = PeftModel.from_pretrained(base(arch), str(tmp_path / "adapter"))
    # TRL's default bf16=True: Accelerate runs the trained model's forward under bf16 autocast (on the CPU too),
    # so the reloaded adapter is compared in that precision, then both in float32, bit for bit
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    torch.testing.assert_close(logits(reloaded, bf16=True), logits(model), rtol=0, atol=0)
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # the float32 forward
    expected = logits(model)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)
    assert (logits(base(arch)) - expected).abs().max() > 1e-3  # the adapter changes the outputs
    merged = PeftModel.from_pretrained(base(arch), str(tmp_path / "adapter")).merge_and_unload()
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    lora = export_as_lora(PeftModel.from_pretrained(base(arch), str(tmp_path / "adapter")))
    torch.testing.assert_close(logits(lora), expected, rtol=1e-5, atol=1e-5)


def test_reentrant_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    """Reentrant checkpointing gives no gradient to parameters inside a block unless the block's input requires
    grad: TRL calls enable_input_require_grads, and then the adapter gets exactly the uncheckpointed update."""
    plain, _ = sft("llama", tmp_path / "plain", steps=2, gradient_checkpointing=False)
    ckpt, before = sft("llama", tmp_path / "ckpt", steps=2, gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": True})
    inner = ckpt.model.get_base_model()
    assert inner.is_gradient_checkpointing and not plain.model.get_base_model().is_gradient_checkpointing
    assert getattr(inner, "_require_grads_hook", None) is not None  # enable_input_require_grads was called
    want, got = adapter_values(plain.model), adapter_values(ckpt.model)
    assert all(not torch.equal(before[n], got[n]) for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_training_keeps_fp32_factors_and_matches_lora_in_the_same_precision(tmp_path):
    trainer, before = sft("gpt2", tmp_path, steps=2)  # TRL's default bf16=True
    model = trainer.model
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights stay fp32
    assert all(not torch.equal(before[n], p) for n, p in adapter_values(model).items())
    model.eval()
    with torch.no_grad():
        wrapped = model(input_ids=IDS).logits  # Accelerate's forward: autocast(bf16), outputs cast back to fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model._original_forward(input_ids=IDS).logits
    assert wrapped.dtype == torch.float32 and autocast.dtype == torch.bfloat16
    torch.testing.assert_close(wrapped, autocast.float(), rtol=0, atol=0)
    with torch.no_grad():
        fp32 = model._original_forward(input_ids=IDS).logits
    assert not torch.equal(wrapped, fp32)  # the training forward did run in bf16

    trainer.save_model(str(tmp_path / "adapter"))  # the same weights as a stock PEFT LoRA, same precision
    lora = export_as_lora(PeftModel.from_pretrained(base("gpt2"), str(tmp_path / "adapter"))).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lora_autocast = lora(input_ids=IDS).logits
    assert lora_autocast.dtype == torch.bfloat16
    torch.testing.assert_close(autocast, lora_autocast, rtol=1.6e-2, atol=2e-3)  # bf16 rounding apart
    torch.testing.assert_close(wrapped, fp32, rtol=1.6e-2, atol=2e-2)

    fp32_run, _ = sft("gpt2", tmp_path / "fp32", steps=1, bf16=False)  # bf16=False: no autocast anywhere
    with torch.no_grad():
        fp32_run.model.eval()
        torch.testing.assert_close(fp32_run.model(input_ids=IDS).logits,
                                   fp32_run.model.get_base_model()(input_ids=IDS).logits, rtol=0, atol=0)
        assert fp32_run.accelerator.mixed_precision == "no"


def _sequence_logps(model, batch) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens, from plain logits (no TRL code)."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(out[:, :-1].float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


def test_dpo_reference_is_the_adapter_disabled_which_is_the_base_model(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.sample(WORDS, 3)), "chosen": " yes", "rejected": " no"} for _ in range(8)]
    trainer = trl.DPOTrainer(model=base("gpt2"), train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer(), peft_config=config("gpt2", init_lora_weights=True),
                             args=trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, max_length=16,
                                                bf16=False, **COMMON))  # float32: the reference compared tightly
    trainer.train()
    model = trainer.model
    assert list(model.peft_config) == ["default"] and trainer.ref_model is None  # no copy: the adapter disabled
    history = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(history) == 2 and history[-1]["rewards/margins"] > 0  # chosen over rejected after one update

    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    reference = _sequence_logps(base("gpt2").eval(), batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), reference, rtol=1e-5, atol=1e-5)
    fresh = base("gpt2").eval()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(fresh), rtol=0, atol=0)
    assert (logits(model) - logits(fresh)).abs().max() > 1e-4  # the policy itself moved away from it
    assert not torch.allclose(_sequence_logps(model, batch), reference)


def test_grpo_generates_and_trains_the_adapter_on_cpu(tmp_path):
    rng = random.Random(0)
    prompts = datasets.Dataset.from_list([{"prompt": " ".join(rng.sample(WORDS, 3))} for _ in range(8)])

    def reward(completions, **_):  # varies within a group, so the advantages (and the gradient) are nonzero
        return [float(len(c)) for c in completions]

    trainer = trl.GRPOTrainer(model=base("llama"), reward_funcs=reward, train_dataset=prompts,
                              processing_class=tokenizer(), peft_config=config("llama"),
                              args=trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, num_generations=4,
                                                  max_completion_length=4, beta=0.1, **COMMON))
    before = adapter_values(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all(h["completions/mean_length"] > 0 for h in logs)
    assert any(h["grad_norm"] > 0 for h in logs) and "kl" in logs[-1]  # beta > 0: KL to the disabled adapter
    assert all(not torch.equal(before[n], p) for n, p in adapter_values(trainer.model).items())
