"""CapaBoost-LoRA on nn.Conv2d: the one-conv forward equals the sum of d masked copies; exact merge."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import capaboost  # noqa: F401  (registers the method)
from capaboost import CapaBoostLoraConfig, delta_ranks, parameter_counts
from capaboost.lora.layer import Conv2d


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, dilation=2, bias=True)
        self.pw = nn.Conv2d(6, 8, kernel_size=1)
        self.dw = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(F.relu(self.pw(F.relu(self.conv(x)))))
        return self.head(x.mean((2, 3)))


def make(targets=("conv", "pw"), seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(r=2, lora_alpha=4, num_copies=3, mask_density=0.5, mask_seed=7, init_lora_weights=False)
    cfg.update(kw)
    return get_peft_model(TinyConvNet(), CapaBoostLoraConfig(target_modules=list(targets), **cfg))


def reference_delta(layer: Conv2d) -> torch.Tensor:
    """Σ_i (B ⊙ m_Bi)(A ⊙ m_Ai), copy by copy, from the dense shared factors and the masks."""
    pair = layer.capaboost_pairs["default"]
    a = pair.A.unpack(layer.cblora_A["default"].detach())
    b = pair.B.unpack(layer.cblora_B["default"].detach())
    delta = sum((b * mb) @ (a * ma) for ma, mb in zip(pair.A.masks, pair.B.masks))
    return layer.scaling["default"] * delta.reshape(layer.get_base_layer().weight.shape)


def test_forward_is_the_sum_of_masked_copies():
    model = make().eval()
    layer = model.base_model.model.conv
    assert isinstance(layer, Conv2d)
    base = layer.get_base_layer()
    x = torch.randn(2, 4, 11, 9)
    kernel = base.weight + reference_delta(layer)
    expected = F.conv2d(x, kernel, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_is_exact_and_unmerge_restores():
    model = make().eval()
    x = torch.randn(2, 4, 12, 12)
    before = model(x)
    w0 = model.base_model.model.conv.get_base_layer().weight.clone()
    model.merge_adapter()
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    layer = model.base_model.model.conv
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + reference_delta(layer), atol=1e-6, rtol=1e-6)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, atol=1e-6, rtol=1e-6)
    merged = model.merge_and_unload()
    assert isinstance(merged.conv, nn.Conv2d)
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)


def test_rank_is_d_times_r_and_union_is_stored():
    model = make(num_copies=2)
    assert delta_ranks(model) == {"conv": 4, "pw": 4}  # d*r = 2*2, from a conv A of 2 x 4*3*3
    counts = parameter_counts(model)["modules"]["conv"]
    assert counts["dense"] == 2 * 4 * 3 * 3 + 6 * 2
    layer = model.base_model.model.conv
    assert counts["union"] == layer.cblora_A["default"].numel() + layer.cblora_B["default"].numel() < counts["dense"]


def test_only_adapter_factors_get_gradients():
    model = make()
    model(torch.randn(2, 4, 10, 10)).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".cblora_" in n for n in grads)
    assert {n.split(".")[-3] for n in grads} == {"conv", "pw"}


def test_nm_pattern_runs_along_flattened_kernel_input():
    model = make(targets=("conv",), r=4, num_copies=2, mask_pattern="2:4", mask_density=0.5)
    masks = model.base_model.model.conv.capaboost_pairs["default"].A.masks  # (d, r, 4*3*3)
    assert masks.shape == (2, 4, 36)
    assert (masks.reshape(2, 4, 9, 4).sum(-1) == 2).all()


def test_grouped_conv_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"'dw'.*groups=8.*exclude_modules"):
        make(targets=("dw",))


def test_non_zero_padding_mode_is_refused():
    net = TinyConvNet()
    net.conv.padding_mode = "reflect"
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        get_peft_model(net, CapaBoostLoraConfig(r=2, target_modules=["conv"]))


def test_save_and_reload_give_identical_outputs(tmp_path):
    model = make().eval()
    x = torch.randn(2, 4, 12, 12)
    expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(TinyConvNet(), tmp_path).eval()
    assert torch.equal(reloaded(x), expected)


class PaddedConv(nn.Conv2d):
    """Like timm's Conv2dSame: pads inside forward, so the adapter cannot mirror it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.kernel_size[0] - 1  # 0 for a 1x1 kernel, as SAME padding at stride 1
        return super().forward(F.pad(x, (0, extra, 0, extra)))


def test_conv_with_custom_forward_is_refused_unless_pointwise():
    net = TinyConvNet()
    net.conv = PaddedConv(4, 6, kernel_size=3, stride=2)
    with pytest.raises(ValueError, match="PaddedConv overrides Conv2d.forward"):
        get_peft_model(net, CapaBoostLoraConfig(r=2, target_modules=["conv"]))
    net = TinyConvNet()
    net.pw = PaddedConv(6, 8, kernel_size=1)  # a 1x1/stride-1 conv needs no padding: accepted
    model = get_peft_model(net, CapaBoostLoraConfig(r=2, target_modules=["pw"], init_lora_weights=False)).eval()
    x = torch.randn(1, 4, 8, 8)
    expected = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_export_as_lora_matches_and_refuses_dilation():
    from capaboost import export_as_lora

    model = make(targets=("pw",)).eval()
    x = torch.randn(2, 4, 12, 12)
    expected = model(x)
    lora = export_as_lora(model).eval()
    assert lora.peft_config["default"].r == 6  # d*r = 3*2
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)
    dilated = make(targets=("conv",))
    with pytest.raises(ValueError, match=r"dilation=\(2, 2\).*merge_and_unload"):
        export_as_lora(dilated)
    assert isinstance(dilated.base_model.model.conv, Conv2d)  # refused before unloading anything
