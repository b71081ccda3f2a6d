"""Serving many CapaBoost-LoRA adapters: mixed-adapter batches, add_weighted_adapter (via LoRA), hotswap."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import capaboost
from capaboost import CapaBoostLoraConfig, export_as_lora
from capaboost.lora import CapaBoostLoraLayer
import helpers


def tiny_bert(seed=0):
    return helpers.tiny_bert(seed, num_labels=3, **helpers.BERT_NO_DROPOUT).eval()


def tiny_gpt2(seed=0):
    return helpers.tiny_gpt2(seed, n_positions=64, **helpers.GPT2_NO_DROPOUT).eval()


def bert_config(**kw):
    base = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    base.update(kw)
    return CapaBoostLoraConfig(**base)


def gpt2_config(**kw):
    base = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM")
    base.update(kw)
    return CapaBoostLoraConfig(**base)


def ids(rows=5, cols=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (rows, cols), generator=g)


def layers(model):
    return [m for m in model.modules() if isinstance(m, CapaBoostLoraLayer)]


def randomize(model, adapter, seed):
    """Nonzero packed values (and classifier copy) for ``adapter``: a fresh adapter has B = 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers(model):
            if adapter in m.cblora_A:
                for p in (m.cblora_A[adapter], m.cblora_B[adapter]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, p in model.named_parameters():
            if f"modules_to_save.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def two_adapter_bert():
    model = get_peft_model(tiny_bert(), bert_config())
    model.add_adapter("second", bert_config(mask_seed=9, num_copies=3, r=2, lora_alpha=5))
    randomize(model, "default", 3)
    randomize(model, "second", 4)
    return model.eval()


def alone(model, x, adapter, **kw):
    if adapter == "__base__":
        with model.disable_adapter():
            return model(x, **kw).logits
    model.set_adapter(adapter)
    return model(x, **kw).logits


# --- mixed-adapter batches ------------------------------------------------------------------------

def test_mixed_batch_rows_equal_each_adapter_alone_bert():
    model = two_adapter_bert()
    x = ids()
    names = ["second", "default", "__base__", "second", "default"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
        for name in set(names):
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], alone(model, x[rows], name), atol=1e-6, rtol=0)
        # the adapters really differ, so the check above is not vacuous
        outs = {name: alone(model, x, name) for name in ("default", "second", "__base__")}
    assert not torch.allclose(outs["default"], outs["second"], atol=1e-3)
    assert not torch.allclose(outs["default"], outs["__base__"], atol=1e-3)


def test_mixed_batch_all_rows_one_adapter_equals_set_adapter():
    model = two_adapter_bert()
    x = ids(rows=3)
    with torch.no_grad():
        model.set_adapter("default")
        mixed = model(x, adapter_names=["second"] * 3).logits
        torch.testing.assert_close(mixed, alone(model, x, "second"), atol=1e-6, rtol=0)


def two_adapter_gpt2():
    model = get_peft_model(tiny_gpt2(), gpt2_config())
    model.add_adapter("other", gpt2_config(mask_seed=5, num_copies=3))
    randomize(model, "default", 1)
    randomize(model, "other", 2)
    return model.eval()


def test_mixed_batch_gpt2_forward_and_generate():
    model = two_adapter_gpt2()
    x = ids(rows=4, cols=6, seed=3)
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        for name in set(names):
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], alone(model, x[rows], name), atol=1e-6, rtol=0)

        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        for extra in ({}, {"num_beams": 2}):
            out = model.generate(input_ids=x, adapter_names=names, **gen, **extra)
            per_adapter = {}
            for name in set(names):
                rows = [i for i, n in enumerate(names) if n == name]
                if name == "__base__":
                    with model.disable_adapter():
                        per_adapter[name] = (rows, model.generate(input_ids=x[rows], **gen, **extra))
                else:
                    model.set_adapter(name)
                    per_adapter[name] = (rows, model.generate(input_ids=x[rows], **gen, **extra))
            for rows, expected in per_adapter.values():
                assert torch.equal(out[rows], expected)
        # the three generations differ: the rows really used different adapters
        firsts = {name: tuple(per_adapter[name][1][0].tolist()) for name in per_adapter}
        assert len(set(firsts.values())) > 1


def test_mixed_batch_refusals():
    model = two_adapter_bert()
    x = ids(rows=2)
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model(x, adapter_names=["default", "typo"])
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(x, adapter_names=["default"] * 3)
    model.train()
    with pytest.raises(NotImplementedError, match="training mode"):
        model(x, adapter_names=["default", "second"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(x, adapter_names=["default", "second"])
    model.unmerge_adapter()
    assert model(x, adapter_names=["default", "second"]).logits.shape == (2, 3)


def test_mixed_batch_hooks_are_removed():
    model = two_adapter_bert()
    x = ids(rows=2)
    with torch.no_grad():
        model(x, adapter_names=["second", "second"])
        model.set_adapter("default")
        torch.testing.assert_close(model(x).logits, alone(model, x, "default"), atol=0, rtol=0)
    assert all(not m._forward_pre_hooks for m in model.modules())


# --- add_weighted_adapter -------------------------------------------------------------------------

@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd", "ties"])
def test_add_weighted_adapter_refused_with_route(combination_type):
    model = two_adapter_bert()
    with pytest.raises(NotImplementedError, match="export_as_lora.*combination_type='cat'"):
        model.add_weighted_adapter(["default", "second"], [1.0, 1.0], "mix", combination_type=combination_type)
    assert "mix" not in model.peft_config


def test_export_then_lora_cat_combination_is_exact(tmp_path):
    """The documented route: ΔW of LoRA's cat combination of the exports = Σ w_i ΔW_i of the CapaBoost adapters."""
    # no task_type: LoRA's add_weighted_adapter refuses adapters that each hold a modules_to_save classifier copy
    configs = {
        "a": bert_config(task_type=None),
        "b": bert_config(task_type=None, mask_seed=7, num_copies=3, r=2, lora_alpha=3, mask_density=0.6),
    }
    deltas = {}
    for seed, (name, config) in enumerate(configs.items()):
        model = get_peft_model(tiny_bert(), config)
        randomize(model, "default", 10 + seed)
        deltas[name] = {m.capaboost_name: m.get_delta_weight("default").detach().clone() for m in layers(model)}
        export_as_lora(model).save_pretrained(tmp_path / name)

    lora = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    lora.load_adapter(tmp_path / "b", adapter_name="b")
    weights = {"a": 0.7, "b": -1.3}
    lora.add_weighted_adapter(["a", "b"], list(weights.values()), "ab", combination_type="cat")
    checked = 0
    for name, module in lora.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "ab" in module.lora_A:
            expected = sum(w * deltas[a][name] for a, w in weights.items())
            torch.testing.assert_close(module.get_delta_weight("ab"), expected, atol=1e-5, rtol=0)
            checked += 1
    assert checked == 4


# --- hotswap --------------------------------------------------------------------------------------

def saved_adapter(path, config, seed):
    model = get_peft_model(tiny_bert(), config)
    randomize(model, "default", seed)
    model.save_pretrained(path)
    return path


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def packed_pointers(model):
    return [p.data_ptr() for m in layers(model) for p in (*m.cblora_A.values(), *m.cblora_B.values())]


def test_hotswap_equals_fresh_load_and_keeps_tensors(tmp_path):
    first = saved_adapter(tmp_path / "first", bert_config(), 1)
    second = saved_adapter(tmp_path / "second", bert_config(lora_alpha=13), 2)  # same masks, other alpha
    x = ids()
    model = PeftModel.from_pretrained(tiny_bert(), first)
    before = logits(model, x)
    pointers = packed_pointers(model)
    capaboost.hotswap_adapter(model, str(second), adapter_name="default")
    fresh = PeftModel.from_pretrained(tiny_bert(), second)
    torch.testing.assert_close(logits(model, x), logits(fresh, x), atol=1e-6, rtol=0)
    assert not torch.allclose(before, logits(model, x), atol=1e-3)
    assert packed_pointers(model) == pointers  # copied in place: no re-allocation
    assert model.peft_config["default"].lora_alpha == 13


def test_hotswap_with_new_masks_equals_fresh_load(tmp_path):
    # num_copies=1: the union is one mask of an exact count, so another seed keeps the packed sizes
    first = saved_adapter(tmp_path / "first", bert_config(num_copies=1), 1)
    second = saved_adapter(tmp_path / "second", bert_config(num_copies=1, mask_seed=21), 2)
    x = ids()
    model = PeftModel.from_pretrained(tiny_bert(), first)
    digests = [m.capaboost_pairs["default"].digest for m in layers(model)]
    capaboost.hotswap_adapter(model, str(second), adapter_name="default")
    fresh = PeftModel.from_pretrained(tiny_bert(), second)
    torch.testing.assert_close(logits(model, x), logits(fresh, x), atol=1e-6, rtol=0)
    assert [m.capaboost_pairs["default"].digest for m in layers(model)] == [
        m.capaboost_pairs["default"].digest for m in layers(fresh)
    ] != digests
    model.save_pretrained(tmp_path / "resaved")  # the swapped config and masks save and reload consistently
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "resaved")
    torch.testing.assert_close(logits(reloaded, x), logits(fresh, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "other, match",
    [
        (dict(r=2), "rank"),
        (dict(mask_seed=4), "cannot resize"),
        (dict(target_modules=["query"]), "other modules"),
        (dict(lora_dropout=0.1), "lora_dropout"),
    ],
)
def test_hotswap_refuses_incompatible_adapter_untouched(tmp_path, other, match):
    first = saved_adapter(tmp_path / "first", bert_config(), 1)
    second = saved_adapter(tmp_path / "second", bert_config(**other), 2)
    x = ids()
    model = PeftModel.from_pretrained(tiny_bert(), first)
    before = logits(model, x)
    with pytest.raises(ValueError, match=match):
        capaboost.hotswap_adapter(model, str(second), adapter_name="default")
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
    assert model.peft_config["default"].mask_seed == 0


def test_hotswap_refuses_missing_fingerprint_and_other_types(tmp_path):
    import json

    first = saved_adapter(tmp_path / "first", bert_config(), 1)
    second = saved_adapter(tmp_path / "second", bert_config(), 2)
    cfg_file = second / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("mask_fingerprint")
    cfg_file.write_text(json.dumps(cfg))
    model = PeftModel.from_pretrained(tiny_bert(), first)
    with pytest.raises(ValueError, match="no mask_fingerprint"):
        capaboost.hotswap_adapter(model, str(second), adapter_name="default")
    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="swaps a CapaBoost-LoRA adapter"):
        capaboost.hotswap_adapter(lora, str(first), adapter_name="default")


def test_hotswap_compiled_model_does_not_recompile(tmp_path):
    first = saved_adapter(tmp_path / "first", bert_config(), 1)
    second = saved_adapter(tmp_path / "second", bert_config(), 2)
    x = ids()
    model = PeftModel.from_pretrained(tiny_bert(), first)
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled(x)
            capaboost.hotswap_adapter(compiled, str(second), adapter_name="default")
            with torch.compiler.set_stance("fail_on_recompile"):
                out = compiled(x).logits
        fresh = PeftModel.from_pretrained(tiny_bert(), second)
        torch.testing.assert_close(out, logits(fresh, x), atol=1e-6, rtol=0)
    finally:
        torch._dynamo.reset()


def test_mixed_batch_conv_and_linear_layers():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    model = get_peft_model(Net().eval(), CapaBoostLoraConfig(r=2, target_modules=["conv", "fc"]))
    model.add_adapter("other", CapaBoostLoraConfig(r=3, num_copies=3, mask_seed=2, target_modules=["conv"]))
    randomize(model, "default", 5)
    randomize(model, "other", 6)
    model.eval()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    names = ["other", "default", "__base__", "default"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for name in set(names):
            rows = [i for i, n in enumerate(names) if n == name]
            if name == "__base__":
                with model.disable_adapter():
                    expected = model(x[rows])
            else:
                model.set_adapter(name)
                expected = model(x[rows])
            torch.testing.assert_close(mixed[rows], expected, atol=1e-6, rtol=0)
        model.set_adapter("default")
        assert not torch.allclose(model(x), mixed, atol=1e-3)
