"""CapaBoost prefix-tuning: PEFT baseline equality, masked MLP, save/load, stock-PEFT export, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from peft.tuners.prefix_tuning import PrefixEncoder

import capaboost
from capaboost import CapaBoostPrefixConfig, export_as_prefix
from capaboost.prefix import CapaBoostPrefixEncoder
import helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T.logging.set_verbosity_error()


def gpt2() -> T.GPT2LMHeadModel:
    return helpers.tiny_gpt2(n_head=2, bos_token_id=0, eos_token_id=0).eval()


def bert() -> T.BertForSequenceClassification:
    return helpers.tiny_bert(num_attention_heads=2, intermediate_size=37).eval()


IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def prefix_model(base, task="CAUSAL_LM", **kwargs) -> PeftModel:
    kwargs.setdefault("encoder_hidden_size", 8)
    return get_peft_model(base, CapaBoostPrefixConfig(task_type=task, num_virtual_tokens=4, **kwargs))


def test_plain_variant_equals_pefts_prefix_tuning_with_projection():
    ours = prefix_model(gpt2(), num_copies=1, mask_density=1.0).eval()
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8, prefix_projection=True)
    stock = get_peft_model(gpt2(), config).eval()
    mine, theirs = ours.prompt_encoder["default"], stock.prompt_encoder["default"]
    pair = mine.capaboost_pairs["default"]
    with torch.no_grad():
        theirs.embedding.weight.copy_(mine.embedding.weight)
        theirs.transform[0].weight.copy_(pair.A.unpack(mine.cbprefix_A))
        theirs.transform[0].bias.copy_(mine.cbprefix_bias_A)
        theirs.transform[2].weight.copy_(pair.B.unpack(mine.cbprefix_B))
        theirs.transform[2].bias.copy_(mine.cbprefix_bias_B)
    torch.testing.assert_close(ours(input_ids=IDS).logits, stock(input_ids=IDS).logits, rtol=1e-5, atol=1e-6)


def test_masked_mlp_is_the_sum_of_copies_at_three_quarters_of_the_weights():
    model = prefix_model(gpt2(), num_copies=2, mask_density=0.5, encoder_hidden_size=16)
    encoder = model.prompt_encoder["default"]
    assert isinstance(encoder, CapaBoostPrefixEncoder)
    assert capaboost.parameter_counts(model)["ratio"] == pytest.approx(0.75, abs=0.03)
    pair = encoder.capaboost_pairs["default"]
    down, up = pair.A.unpack(encoder.cbprefix_A), pair.B.unpack(encoder.cbprefix_B)
    emb = encoder.embedding.weight
    copies = sum(
        torch.tanh(emb @ (down * pair.A.masks[i]).T + encoder.cbprefix_bias_A) @ (up * pair.B.masks[i]).T
        for i in range(2)
    )
    torch.testing.assert_close(encoder.table(), copies + encoder.cbprefix_bias_B)
    assert encoder.table().shape == (4, 2 * 2 * 32)
    base_logits = gpt2()(input_ids=IDS).logits
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    assert not torch.allclose(out.logits, base_logits, atol=1e-4)  # the prefix acts
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in encoder.named_parameters())
    assert all(p.grad is None for p in model.get_base_model().parameters())


def test_stock_prefix_tuning_still_builds_pefts_own_encoder():
    stock = get_peft_model(gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert type(stock.prompt_encoder["default"]) is PrefixEncoder


def test_save_load_is_bit_identical(tmp_path):
    model = prefix_model(gpt2(), mask_seed=3).eval()
    before = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "CAPABOOST_PREFIX"
    loaded = PeftModel.from_pretrained(gpt2(), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], CapaBoostPrefixConfig)
    assert torch.equal(loaded(input_ids=IDS).logits, before)


STOCK_LOAD = textwrap.dedent(
    """
    import importlib.util, sys, torch, transformers, peft
    # capaboost/compat.py alone (stock PEFT 0.21 cannot run BERT prefix tuning on transformers >= 5.24)
    spec = importlib.util.spec_from_file_location("upstream_fix", sys.argv[5])
    fix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fix)
    fix.install()
    assert "capaboost" not in sys.modules
    base = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
    model = peft.PeftModel.from_pretrained(base, sys.argv[2]).eval()
    assert type(model.peft_config["default"]) is peft.PrefixTuningConfig
    ids = torch.load(sys.argv[3])
    torch.save(model(input_ids=ids).logits, sys.argv[4])
    """
)


def test_export_as_prefix_gives_a_stock_checkpoint_with_equal_outputs(tmp_path):
    base = bert()
    base.save_pretrained(tmp_path / "base")
    model = prefix_model(base, task="SEQ_CLS", num_copies=2, mask_density=0.5).eval()
    with torch.no_grad():  # a trained head must travel with the export
        model.base_model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = model(input_ids=IDS).logits
    assert not torch.allclose(expected, bert()(input_ids=IDS).logits, atol=1e-4)
    exported = export_as_prefix(model).eval()
    assert type(exported.peft_config["default"]) is PrefixTuningConfig
    torch.testing.assert_close(exported(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-6)
    exported.save_pretrained(tmp_path / "prefix")
    torch.save(IDS, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(tmp_path / "base"), str(tmp_path / "prefix"),
         str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), capaboost.compat.__file__],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-6)


def test_export_as_prefix_refuses_other_adapters():
    lora = get_peft_model(gpt2(), capaboost.CapaBoostLoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="needs a CapaBoost prefix adapter"):
        export_as_prefix(lora)


def test_trainer_steps_train_only_the_prefix_mlp(tmp_path):
    model = prefix_model(gpt2(), num_copies=2, mask_density=0.5)
    encoder = model.prompt_encoder["default"]
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    rows = [{"input_ids": IDS[i % 2], "labels": IDS[i % 2]} for i in range(8)]
    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    T.Trainer(model=model, args=args, train_dataset=rows).train()
    assert all(not torch.equal(p, before[n]) for n, p in encoder.named_parameters())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_virtual_tokens=0), "prefix length"),
        (dict(num_virtual_tokens=4, encoder_hidden_size=0), "encoder_hidden_size"),
        (dict(num_virtual_tokens=4, prefix_projection=False), "prefix_projection must be True"),
        (dict(num_virtual_tokens=4, num_copies=0), "num_copies must be an integer"),
    ],
)
def test_bad_config_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CapaBoostPrefixConfig(**kwargs)
