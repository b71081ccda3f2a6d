"""Export keeps every module's train/eval flag: a model exported in eval mode must not get its dropout back."""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import BertForSequenceClassification, GPT2LMHeadModel

import capaboost  # noqa: F401  (registers the methods)
from capaboost import CapaBoostLoraConfig, CapaBoostPrefixConfig, export_as_lora, export_as_prefix
import helpers

IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


def bert_with_dropout() -> BertForSequenceClassification:
    return helpers.tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3).eval()


def gpt2_with_dropout() -> GPT2LMHeadModel:
    return helpers.tiny_gpt2(n_positions=32, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3, bos_token_id=0,
                             eos_token_id=0).eval()


def lora_model(lora_dropout: float = 0.0) -> torch.nn.Module:
    cfg = CapaBoostLoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=["query", "value"],
                              task_type="SEQ_CLS", init_lora_weights=False)
    return get_peft_model(bert_with_dropout(), cfg)


def flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_export_as_lora_of_an_eval_model_keeps_dropout_off():
    model = lora_model()  # the wrapper says training=True, the base model's modules are in eval mode
    out = model(IDS).logits
    lora = export_as_lora(model)
    torch.testing.assert_close(lora(IDS).logits, out, rtol=0, atol=1e-5)
    dropouts = [m for n, m in lora.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_" not in n]
    assert len(dropouts) > 5 and not any(m.training for m in dropouts)


def test_export_as_lora_keeps_each_modules_flag_in_a_mixed_model():
    model = lora_model(lora_dropout=0.3)
    model.base_model.model.bert.encoder.layer[0].train()  # e.g. a partly frozen model
    model.base_model.model.classifier.eval()
    before = flags(model)
    assert len(set(before.values())) == 2
    lora = export_as_lora(model)
    after = flags(lora)
    common = before.keys() & after.keys()
    assert len(common) > 50 and {n: after[n] for n in common} == {n: before[n] for n in common}
    # modules the export created (lora_A, lora_B, ...) follow the layer they belong to
    for name, module in lora.named_modules():
        if name not in before:
            parent = name.rsplit(".", 1)[0]
            assert module.training == after[parent], name


def test_export_as_prefix_of_an_eval_model_keeps_dropout_off():
    cfg = CapaBoostPrefixConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8)
    model = get_peft_model(gpt2_with_dropout(), cfg)
    assert model.training and not model.base_model.training
    out = model(input_ids=IDS).logits
    before = flags(model)
    prefix = export_as_prefix(model)
    torch.testing.assert_close(prefix(input_ids=IDS).logits, out, rtol=0, atol=1e-5)
    after, common = flags(prefix), before.keys() & flags(prefix).keys()
    assert {n: after[n] for n in common} == {n: before[n] for n in common}
