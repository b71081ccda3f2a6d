"""CapaBoost-LoRA as a PEFT method: equivalences, accounting, save/load, merge, export, errors."""

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertForSequenceClassification

import capaboost
from capaboost import CapaBoostLoraConfig, delta_ranks, export_as_lora, parameter_counts
from capaboost.lora import CapaBoostLoraLayer
import helpers

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_bert(seed=0, num_labels=2):
    return helpers.tiny_bert(seed, num_labels=num_labels, **helpers.BERT_NO_DROPOUT).eval()


def tiny_gpt2(seed=0):
    return helpers.tiny_gpt2(seed, n_positions=32, **helpers.GPT2_NO_DROPOUT).eval()


def cb_config(**kw):
    base = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    base.update(kw)
    return CapaBoostLoraConfig(**base)


def ids(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (3, 9), generator=g)


def layers(model):
    return [m for m in model.modules() if isinstance(m, CapaBoostLoraLayer)]


def randomize(model, seed=3):
    """Nonzero packed values everywhere (a fresh model has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers(model):
            for p in (*m.cblora_A.values(), *m.cblora_B.values()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --- config ---------------------------------------------------------------------------------------

def test_config_roundtrip(tmp_path):
    cfg = cb_config(num_copies=3, mask_density=0.6, mask_seed=5, rank_pattern={"query": 2},
                    copies_pattern={"value": 4}, density_pattern={"value": 0.4})
    cfg.save_pretrained(tmp_path)
    loaded = CapaBoostLoraConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.peft_type == "CAPABOOST_LORA" and loaded.peft_type is capaboost.lora.config.CAPABOOST_LORA


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask_density=0.0), "mask_density must be in \\(0, 1\\]"),
        (dict(mask_density=1.2), "mask_density must be in \\(0, 1\\]"),
        (dict(num_copies=0), "num_copies must be an integer >= 1"),
        (dict(mask_pattern="2/4"), "malformed"),
        (dict(mask_pattern="6:4"), "N <= M"),
        (dict(mask_pattern="2:4", mask_density=0.3), "N/M"),
        (dict(mask_mode="random"), "mask_mode"),
        (dict(r=0), "r must be an integer >= 1"),
        (dict(rank_pattern={"query": 0}), "rank_pattern"),
        (dict(copies_pattern={"query": 0}), "num_copies"),
        (dict(density_pattern={"value": 2.0}), "mask_density"),
        (dict(generator_version=999), "generator version 999"),
    ],
)
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cb_config(**kwargs)


def test_use_dora_is_a_bool_and_adds_a_magnitude_per_layer():
    # CapaBoost-DoRA itself is tested in test_dora.py (against PEFT's DoRA and the dense formula)
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        cb_config(use_dora="yes")
    model = get_peft_model(tiny_bert(), cb_config(use_dora=True))
    layers = [m for m in model.modules() if isinstance(m, CapaBoostLoraLayer)]
    assert layers and all(m.lora_magnitude_vector["default"].shape == (m.out_features,) for m in layers)


def test_dense_copies_warn():
    with pytest.warns(UserWarning, match="all copies coincide"):
        get_peft_model(tiny_bert(), cb_config(num_copies=2, mask_density=1.0))


# --- behaviour ------------------------------------------------------------------------------------

def test_init_is_noop():
    base = tiny_bert()
    ref = base(ids()).logits
    model = get_peft_model(copy.deepcopy(base), cb_config())
    model.eval()
    # the classifier head is a trainable copy (modules_to_save) with the same init
    assert torch.equal(model(ids()).logits, ref)


def test_d1_s1_equals_peft_lora():
    base = tiny_bert()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS", init_lora_weights=False))
    cb = get_peft_model(copy.deepcopy(base), cb_config(num_copies=1, mask_density=1.0))
    with torch.no_grad():
        for lora_layer, cb_layer in zip(
            [m for n, m in lora.named_modules() if n.endswith(("query", "value"))], layers(cb)
        ):
            cb_layer.cblora_A["default"].copy_(lora_layer.lora_A["default"].weight.reshape(-1))
            cb_layer.cblora_B["default"].copy_(lora_layer.lora_B["default"].weight.reshape(-1))
    lora.eval(), cb.eval()
    torch.testing.assert_close(cb(ids()).logits, lora(ids()).logits, rtol=0, atol=1e-6)


def test_forward_equals_d_separate_masked_loras():
    """Eq. 4 written naively: Σ_i (B⊙m_Bi)(A⊙m_Ai) as d separate products."""
    model = get_peft_model(tiny_bert(), cb_config(num_copies=3, mask_density=0.5))
    randomize(model)
    layer = layers(model)[0]
    pair = layer.capaboost_pairs["default"]
    a = pair.A.unpack(layer.cblora_A["default"])
    b = pair.B.unpack(layer.cblora_B["default"])
    x = torch.randn(5, 32)
    naive = layer.base_layer(x) + layer.scaling["default"] * sum(
        x @ (a * pair.A.masks[i]).t() @ (b * pair.B.masks[i]).t() for i in range(3)
    )
    torch.testing.assert_close(layer(x), naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [2, 4])
def test_rank_is_d_times_r(d):
    model = get_peft_model(tiny_bert(), cb_config(num_copies=d, mask_density=0.5, r=4))
    assert set(delta_ranks(model).values()) == {0}  # B = 0 at init
    randomize(model)
    ranks = delta_ranks(model)
    assert len(ranks) == 4 and set(ranks.values()) == {d * 4}
    assert all(k.startswith("bert.encoder.layer.") for k in ranks)  # base-model-relative names
    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"], init_lora_weights=False))
    # same check through PEFT's own delta for d=1 density 1
    one = get_peft_model(tiny_bert(), cb_config(num_copies=1, mask_density=1.0))
    randomize(one)
    assert set(delta_ranks(one).values()) == {4}
    del lora


def test_trainable_count_is_union():
    model = get_peft_model(tiny_bert(), cb_config(num_copies=2, mask_density=0.5, r=8))
    counts = parameter_counts(model)
    trainable, _ = model.get_nb_trainable_parameters()
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    assert trainable - head == counts["union"]
    assert counts["dense"] == 4 * (8 * 32 + 32 * 8)
    assert abs(counts["ratio"] - 0.75) < 0.03
    for m in counts["modules"].values():
        assert m["per_copy_active"] == [m["dense"] // 2] * 2
    four = parameter_counts(get_peft_model(tiny_bert(), cb_config(num_copies=4, mask_density=0.5, r=8)))
    assert abs(four["ratio"] - 0.9375) < 0.03


def test_zero_gradient_outside_union_and_masks_static():
    model = get_peft_model(tiny_bert(), cb_config(init_lora_weights=False))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {id(m): copy.deepcopy(m.capaboost_pairs["default"].A.masks) for m in layers(model)}
    for step in range(3):
        loss = model(ids(step), labels=torch.tensor([0, 1, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for m in layers(model):
        pair = m.capaboost_pairs["default"]
        a_cat, b_cat = m.cat_factors("default")
        a_mask = pair.A._layout(pair.A.masks)
        b_mask = pair.B._layout(pair.B.masks)
        assert torch.all(a_cat[~a_mask] == 0) and torch.all(b_cat[~b_mask] == 0)
        assert torch.all(a_cat[a_mask] != 0)
        assert torch.equal(pair.A.masks, before[id(m)])
    # optimizer state is union-sized
    state_numel = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state_numel == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_masks_are_not_parameters_or_buffers():
    model = get_peft_model(tiny_bert(), cb_config())
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not any("mask" in n for n in names)
    assert all(n.endswith(".default") for n in names if "cblora_" in n)


def test_mask_key_ignores_wrapper_prefix():
    m1 = get_peft_model(tiny_bert(), cb_config())
    m2 = get_peft_model(tiny_bert(), cb_config())
    m2.add_adapter("other", cb_config())
    for a, b in zip(layers(m1), layers(m2)):
        assert a.capaboost_name == b.capaboost_name
        assert torch.equal(a.capaboost_pairs["default"].A.masks, b.capaboost_pairs["other"].A.masks)


def test_save_load_bit_identical_and_compact(tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), cb_config(r=8, num_copies=2, mask_density=0.5))
    randomize(model)
    model.eval()
    out = model(ids()).logits
    model.save_pretrained(tmp_path / "cb")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "cb").eval()
    assert torch.equal(loaded(ids()).logits, out)
    saved = json.loads((tmp_path / "cb" / "adapter_config.json").read_text())
    assert saved["mask_fingerprint"] and saved["generator_version"] == capaboost.GENERATOR_VERSION
    assert saved["peft_type"] == "CAPABOOST_LORA"
    # compact: only union values (no classifier head here, to compare the adapters alone)
    no_head = dict(task_type=None)
    cb = get_peft_model(tiny_bert(), cb_config(r=8, **no_head))
    lora = get_peft_model(tiny_bert(), LoraConfig(r=8, target_modules=["query", "value"]))
    cb.save_pretrained(tmp_path / "c2")
    lora.save_pretrained(tmp_path / "l2")
    size = lambda p: os.path.getsize(p / "adapter_model.safetensors")  # noqa: E731
    assert size(tmp_path / "c2") <= 0.78 * size(tmp_path / "l2")


def test_loaded_model_trains_from_checkpoint(tmp_path):
    model = get_peft_model(tiny_bert(), cb_config())
    randomize(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert any("cblora_A" in n for n in trainable)


def test_tampered_config_refused(tmp_path):
    model = get_peft_model(tiny_bert(), cb_config())
    randomize(model)
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    original = cfg_path.read_text()
    for field, value in [("mask_seed", 1), ("mask_mode", "same"), ("mask_density", 0.6)]:
        data = json.loads(original)
        data[field] = value
        cfg_path.write_text(json.dumps(data))
        with pytest.raises((ValueError, RuntimeError), match="masks regenerated|size mismatch"):
            PeftModel.from_pretrained(tiny_bert(), tmp_path)
    data = json.loads(original)
    data["generator_version"] = 99
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="generator version 99"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_load_without_import_fails_loudly(tmp_path):
    model = get_peft_model(tiny_bert(), cb_config())
    model.save_pretrained(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        from transformers import BertConfig, BertForSequenceClassification
        from peft import PeftModel
        base = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=64))
        try:
            PeftModel.from_pretrained(base, {str(tmp_path)!r})
        except KeyError as err:
            print("KeyError", err)
            sys.exit(0)
        print("loaded silently"); sys.exit(1)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CAPABOOST_LORA" in res.stdout


def test_merge_unmerge_unload_exact():
    base = tiny_bert()
    ref = base(ids()).logits
    model = get_peft_model(copy.deepcopy(base), cb_config())
    randomize(model)
    model.eval()
    out = model(ids()).logits
    assert (out - ref).abs().max() > 1e-3
    model.merge_adapter()
    torch.testing.assert_close(model(ids()).logits, out, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(ids()).logits, out, rtol=0, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids()).logits, model.base_model.model.classifier.original_module(
            model.base_model.model.bert(ids()).pooler_output), rtol=0, atol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, CapaBoostLoraLayer) for m in merged.modules())
    assert type(merged) is BertForSequenceClassification
    torch.testing.assert_close(merged(ids()).logits, out, rtol=0, atol=1e-5)
    unloaded = copy.deepcopy(model).unload()
    assert not any(isinstance(m, CapaBoostLoraLayer) for m in unloaded.modules())


def test_safe_merge_detects_nan():
    model = get_peft_model(tiny_bert(), cb_config())
    with torch.no_grad():
        layers(model)[0].cblora_B["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs"):
        model.merge_adapter(safe_merge=True)


def test_export_as_lora_matches_and_loads_in_stock_peft(tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), cb_config(num_copies=2, r=4, lora_alpha=8))
    randomize(model)
    model.eval()
    out = model(ids()).logits
    a_cat, b_cat = (t.detach().clone() for t in layers(model)[0].cat_factors("default"))
    lora = export_as_lora(model)
    cfg = lora.peft_config["default"]
    # rank d*r = 8 at the same scaling: alpha 8/4 * 8 = 16, times scale_by_density's 1/(d*s^2) = 2 (the default)
    assert type(cfg) is LoraConfig and cfg.r == 8 and cfg.lora_alpha == 32
    first = [m for m in lora.modules() if hasattr(m, "lora_A")][0]
    assert torch.equal(first.lora_A["default"].weight, a_cat) and torch.equal(first.lora_B["default"].weight, b_cat)
    torch.testing.assert_close(lora(ids()).logits, out, rtol=0, atol=1e-5)
    lora.save_pretrained(tmp_path)
    torch.save({"ids": ids(), "out": out, "state": base.state_dict()}, tmp_path / "ref.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import BertConfig, BertForSequenceClassification
        from peft import PeftModel
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        base = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        base.load_state_dict(ref["state"])
        model = PeftModel.from_pretrained(base, {str(tmp_path)!r}).eval()
        assert "capaboost" not in sys.modules
        err = (model(ref["ids"]).logits - ref["out"]).abs().max().item()
        print(err); sys.exit(0 if err < 1e-5 else 1)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_export_with_per_module_patterns():
    model = get_peft_model(tiny_bert(), cb_config(copies_pattern={"value": 3}, rank_pattern={"query": 2}))
    randomize(model)
    model.eval()
    out = model(ids()).logits
    lora = export_as_lora(model)
    ranks = {n.rsplit(".", 1)[-1]: m.r["default"] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert ranks == {"query": 4, "value": 12}
    torch.testing.assert_close(lora(ids()).logits, out, rtol=0, atol=1e-5)


def test_multiple_adapters():
    model = get_peft_model(tiny_bert(), cb_config())
    randomize(model, seed=3)
    model.add_adapter("second", cb_config(mask_seed=9))
    randomize_adapter = layers(model)
    with torch.no_grad():
        for m in randomize_adapter:
            m.cblora_B["second"].normal_()
    model.eval()
    out_default = model(ids()).logits
    model.set_adapter("second")
    out_second = model(ids()).logits
    assert not torch.allclose(out_default, out_second)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("cblora_A.default"))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("cblora_A.second"))
    model.set_adapter("default")
    assert torch.equal(model(ids()).logits, out_default)
    model.delete_adapter("second")
    assert all("second" not in m.capaboost_pairs for m in layers(model))


def test_unsupported_ops_raise():
    model = get_peft_model(tiny_bert(), cb_config())
    with pytest.raises(NotImplementedError, match="export_as_lora"):
        model.add_weighted_adapter(["default"], [1.0], "mix", combination_type="svd")
    with pytest.raises(NotImplementedError, match="mixed-adapter batches"):
        model(ids(), adapter_names=["default"] * 3)


def test_hotswap_refused(tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    model = get_peft_model(tiny_bert(), cb_config())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Hotswapping only supports"):
        hotswap_adapter(model, str(tmp_path), adapter_name="default", torch_device="cpu")


def test_target_not_found_and_unsupported_layer():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_bert(), cb_config(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="supported layer types are torch.nn.Linear"):
        get_peft_model(tiny_bert(), cb_config(target_modules=["LayerNorm"]))  # embeddings are supported now


def test_unmatched_mask_pattern_is_an_error():
    with pytest.raises(ValueError, match=r"copies_pattern keys \['valu'\] match no adapted module"):
        get_peft_model(tiny_bert(), cb_config(copies_pattern={"valu": 3}))
    with pytest.raises(ValueError, match="density_pattern keys"):
        get_peft_model(tiny_bert(), cb_config(density_pattern={"key": 0.3}))


def test_nm_masks_and_input_dim_error():
    model = get_peft_model(tiny_bert(), cb_config(mask_pattern="2:4", mask_density=0.5))
    randomize(model)
    assert set(delta_ranks(model).values()) == {8}
    with pytest.raises(ValueError, match="must divide the input dimension"):
        get_peft_model(tiny_bert(), cb_config(mask_pattern="2:8", mask_density=0.25, r=4))


def test_gpt2_conv1d_merge_exact():
    base = tiny_gpt2()
    model = get_peft_model(copy.deepcopy(base), CapaBoostLoraConfig(r=4, target_modules=["c_attn"],
                                                                   fan_in_fan_out=True))
    randomize(model)
    model.eval()
    x = ids()
    out = model(x).logits
    assert set(delta_ranks(model).values()) == {8}
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x).logits, out, rtol=0, atol=1e-5)


def test_bf16():
    base = tiny_bert().to(torch.bfloat16)
    model = get_peft_model(base, cb_config(init_lora_weights=False), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "cblora_" in n)
    model.train()
    loss = model(ids(), labels=torch.tensor([0, 1, 0])).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "cblora_A" in n]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    # default autocast keeps adapters in fp32 on a bf16 base
    model32 = get_peft_model(tiny_bert().to(torch.bfloat16), cb_config(init_lora_weights=False))
    assert all(p.dtype == torch.float32 for n, p in model32.named_parameters() if "cblora_" in n)
    model32.eval()
    assert model32(ids()).logits.dtype == torch.bfloat16


def test_dropout_mode_trains_and_eval_is_deterministic():
    model = get_peft_model(tiny_bert(), cb_config(mask_mode="dropout", init_lora_weights=False))
    counts = parameter_counts(model)
    assert counts["ratio"] == 1.0
    model.train()
    layer = layers(model)[0]
    x = torch.randn(2, 32)
    assert not torch.equal(layer(x), layer(x))
    model.eval()
    assert torch.equal(layer(x), layer(x))


def test_trainer_few_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_bert(), cb_config())
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (9,), generator=g), "labels": int(i % 2)} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    before = [p.detach().clone() for n, p in model.named_parameters() if "cblora_B" in n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Trainer(model=model, args=args, train_dataset=data).train()
    after = [p.detach() for n, p in model.named_parameters() if "cblora_B" in n]
    assert result.global_step == 4 and all(not torch.equal(a, b) for a, b in zip(before, after))
    assert set(delta_ranks(model).values()) == {8}
