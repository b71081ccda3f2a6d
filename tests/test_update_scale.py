"""``scale_by_density``: CapaBoost-LoRA's update rescaled by 1 / (d*s^2) to LoRA's size (issue 13, item 6).

Every path that applies the scaling must honour it: forward, get_delta_weight, merge, export_as_lora,
save/load; an adapter_config.json written before the field existed loads with the paper's scaling.
"""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import capaboost  # noqa: F401  (registers the methods)
from capaboost import CapaBoostLoraConfig, export_as_lora
from capaboost.lora import CapaBoostLoraLayer


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


def config(**kw):
    return CapaBoostLoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                                  "task_type": "SEQ_CLS", **kw})


def layers(model):
    return {m.capaboost_name: m for m in model.modules() if isinstance(m, CapaBoostLoraLayer) and m.cblora_A}


def randomize(model, seed=3):
    """The same nonzero packed values for equal configs (a fresh model has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(layers(model).items()):
            for p in (m.cblora_A["default"], m.cblora_B["default"]):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def pair(**kw):
    """(paper scaling, scale_by_density) models with identical base, masks and packed values."""
    plain = randomize(get_peft_model(bert(), config(scale_by_density=False, **kw))).eval()
    scaled = randomize(get_peft_model(bert(), config(scale_by_density=True, **kw))).eval()
    return plain, scaled


@pytest.mark.parametrize(
    "kw, factors",
    [
        ({"num_copies": 2, "mask_density": 0.5}, {"query": 2.0, "value": 2.0}),  # 1 / (2 * 0.25)
        ({"num_copies": 4, "mask_density": 0.25}, {"query": 4.0, "value": 4.0}),  # 1 / (4 * 0.0625)
        ({"num_copies": 1, "mask_density": 1.0}, {"query": 1.0, "value": 1.0}),  # plain LoRA: unchanged
        ({"num_copies": 2, "mask_density": 0.5, "mask_mode": "same"}, {"query": 2.0, "value": 2.0}),
        ({"num_copies": 2, "mask_density": 0.5, "mask_pattern": "2:4"}, {"query": 2.0, "value": 2.0}),
        ({"num_copies": 2, "mask_density": 0.5, "mask_mode": "dropout"}, {"query": 0.5, "value": 0.5}),  # 1 / d
        ({"num_copies": 2, "mask_density": 0.5, "copies_pattern": {"query": 3}, "density_pattern": {"query": 0.25}},
         {"query": 1 / (3 * 0.0625), "value": 2.0}),  # per module
    ],
)
def test_delta_weight_and_layer_output_scale_by_one_over_d_s2(kw, factors):
    plain, scaled = pair(**kw)
    lp, ls = layers(plain), layers(scaled)
    assert lp.keys() == ls.keys() and len(lp) == 4
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    for name, a in lp.items():
        b, f = ls[name], factors[name.rsplit(".", 1)[-1]]
        assert b.scaling["default"] == pytest.approx(f * a.scaling["default"], rel=1e-12)
        torch.testing.assert_close(b.get_delta_weight("default"), f * a.get_delta_weight("default"),
                                   rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            base = a.base_layer(x)
            torch.testing.assert_close(b(x) - base, f * (a(x) - base), rtol=1e-5, atol=1e-6)


def test_default_is_on_and_value_is_checked():
    """On by default: a user who swaps LoraConfig for CapaBoostLoraConfig keeps LoRA's lr (docs/reproduction.md)."""
    assert config().scale_by_density is True
    assert config(scale_by_density=False).update_scale("query") == 1.0
    with pytest.raises(ValueError, match="scale_by_density"):
        config(scale_by_density="yes")


def test_merge_and_unload_keep_the_scaled_outputs():
    _, scaled = pair()
    with torch.no_grad():
        expected = scaled(IDS).logits
        scaled.merge_adapter()
        torch.testing.assert_close(scaled(IDS).logits, expected, rtol=1e-5, atol=1e-6)
        scaled.unmerge_adapter()
        torch.testing.assert_close(scaled(IDS).logits, expected, rtol=1e-5, atol=1e-6)
        merged = scaled.merge_and_unload()
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-6)


def test_export_as_lora_reproduces_the_scaled_outputs():
    plain, scaled = pair(copies_pattern={"query": 4}, density_pattern={"query": 0.25})
    with torch.no_grad():
        expected, unscaled = scaled(IDS).logits, plain(IDS).logits
        assert not torch.allclose(expected, unscaled, atol=1e-4)  # the option changes the outputs
        lora = export_as_lora(scaled)
        torch.testing.assert_close(lora(IDS).logits, expected, rtol=1e-5, atol=1e-6)
    cfg = lora.peft_config["default"]
    # exported scaling = lora_alpha / r: query d=4, s=0.25 -> (4*8*4) / (4*4); value d=2, s=0.5 -> (2*8*2) / (2*4)
    alphas = {n: cfg.alpha_pattern.get(n.replace(".", r"\."), cfg.lora_alpha) for n in layers(plain)}
    ranks = {n: cfg.rank_pattern.get(n.replace(".", r"\."), cfg.r) for n in layers(plain)}
    for name in layers(plain):
        factor = 4.0 if name.endswith("query") else 2.0
        assert alphas[name] / ranks[name] == pytest.approx(factor * 8 / 4)


def test_save_load_roundtrip_keeps_the_option(tmp_path):
    _, scaled = pair()
    with torch.no_grad():
        expected = scaled(IDS).logits
    scaled.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["scale_by_density"] is True
    loaded = PeftModel.from_pretrained(bert(), tmp_path).eval()
    assert loaded.peft_config["default"].scale_by_density is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=0)


def test_old_adapter_config_without_the_field_loads_with_the_paper_scaling(tmp_path):
    """An adapter saved before scale_by_density existed has no such key: it must load exactly as it was saved."""
    plain, scaled = pair()
    with torch.no_grad():
        expected = plain(IDS).logits
    plain.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved.pop("scale_by_density") is False
    path.write_text(json.dumps(saved))
    assert CapaBoostLoraConfig.from_pretrained(tmp_path).scale_by_density is False  # not the new default
    loaded = PeftModel.from_pretrained(bert(), tmp_path).eval()
    assert loaded.peft_config["default"].scale_by_density is False
    for layer in layers(loaded).values():
        assert layer.scaling["default"] == 8 / 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=0)
        assert not torch.allclose(loaded(IDS).logits, scaled(IDS).logits, atol=1e-4)
    # load_adapter reads the file through the same hook
    second = PeftModel.from_pretrained(bert(), tmp_path)
    second.load_adapter(tmp_path, adapter_name="old")
    second.set_adapter("old")
    assert second.peft_config["old"].scale_by_density is False
    with torch.no_grad():
        torch.testing.assert_close(second.eval()(IDS).logits, expected, rtol=0, atol=0)


def test_a_saved_default_config_records_the_option_and_loads_it(tmp_path):
    """New files carry the key, so the legacy rule above never applies to them."""
    model = randomize(get_peft_model(bert(), config(num_copies=2, mask_density=0.5))).eval()
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["scale_by_density"] is True
    loaded = PeftModel.from_pretrained(bert(), tmp_path).eval()
    for layer in layers(loaded).values():
        assert layer.scaling["default"] == pytest.approx(8 / 4 * 2.0)  # alpha / r / (d * s^2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=0)
