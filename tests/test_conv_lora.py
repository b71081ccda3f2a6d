"""CapaBoost-LoRA on nn.Conv2d: the one-conv forward equals the sum of d masked copies; exact merge. Grouped convs
(Conv1d/2d/3d) as PEFT's LoRA: grouped B, r divisible by groups, merging refused."""

import copy

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


def test_grouped_conv_needs_r_divisible_by_groups():
    with pytest.raises(ValueError, match=r"'dw'.*grouped Conv2d \(groups=8\) and r=2 is not divisible.*exclude_modules"):
        make(targets=("dw",))
    with pytest.raises(ValueError, match=r"'g'.*groups=4\) and r=6 .*Choose an r divisible by 4"):
        get_peft_model(GroupedNet(2), CapaBoostLoraConfig(r=6, target_modules=["g"]))
    with pytest.warns(UserWarning, match=r"'dw', a grouped Conv2d \(groups=8\): merging it is not supported"):
        make(targets=("dw",), r=8)  # depthwise: r a multiple of the groups


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


# ------------------------------------------------------------------------------------------------ grouped convs
CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}
SHAPES = {1: (2, 8, 11), 2: (2, 8, 9, 7), 3: (2, 8, 5, 6, 7)}
MERGE_REFUSED = r"cannot merge .*'g': it is a grouped Conv\dd \(groups=4\).*exclude the grouped conv with exclude_modules"


class GroupedNet(nn.Module):
    """A grouped conv (groups=4, stride 2, padding 1) before a linear head."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims
        self.g = CONV[dims][0](8, 12, kernel_size=3, stride=2, padding=1, groups=4)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.g(x)).mean(tuple(range(2, 2 + self.dims))))


def make_grouped(dims, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(r=8, lora_alpha=4, num_copies=2, mask_density=0.5, mask_seed=7, init_lora_weights=False)
    cfg.update(kw)
    with pytest.warns(UserWarning, match="merging it is not supported"):
        return get_peft_model(GroupedNet(dims), CapaBoostLoraConfig(target_modules=["g"], **cfg))


def stored_a(a: torch.Tensor, groups: int) -> torch.Tensor:
    """PEFT's lora_A weight (r, in_channels, *kernel) -> CapaBoost's stored A (r/G, G*fan_in)."""
    rows = a.shape[0] // groups
    return a.reshape(groups, rows, -1).transpose(0, 1).reshape(rows, -1)


def peft_a(a_stored: torch.Tensor, groups: int, kernel_shape) -> torch.Tensor:
    """The inverse of :func:`stored_a`."""
    rows = a_stored.shape[0]
    return a_stored.reshape(rows, groups, -1).transpose(0, 1).reshape(groups * rows, *kernel_shape)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grouped_d1_s1_is_peft_lora(dims):
    from peft import LoraConfig

    torch.manual_seed(0)
    base = GroupedNet(dims)
    x = torch.randn(SHAPES[dims])
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=4, target_modules=["g"],
                                                          init_lora_weights=False))
    with pytest.warns(UserWarning, match="merging it is not supported"):
        cb = get_peft_model(copy.deepcopy(base), CapaBoostLoraConfig(
            r=8, lora_alpha=4, num_copies=1, mask_density=1.0, target_modules=["g"], init_lora_weights=False))
    ll, cl = lora.base_model.model.g, cb.base_model.model.g
    a, b = ll.lora_A["default"].weight, ll.lora_B["default"].weight  # (8, 8, k..), (12, 2, 1..): grouped B
    pair = cl.capaboost_pairs["default"]
    assert cb.get_nb_trainable_parameters() == lora.get_nb_trainable_parameters()
    assert pair.A.shape == (2, 4 * a[0].numel()) and pair.B.shape == (12, 2)
    # the same init as PEFT: A kaiming-uniform for the kernel's fan_in (not the stored layout's)
    bound = 1 / a[0].numel() ** 0.5
    packed_a = cl.cblora_A["default"].detach()
    assert bound * 0.9 < packed_a.abs().max() <= bound
    with torch.no_grad():
        cl.cblora_A["default"].copy_(pair.A.pack(stored_a(a, 4)))
        cl.cblora_B["default"].copy_(pair.B.pack(b.reshape(b.shape[0], -1)))
    a_cat, b_cat = cl.lora_weights("default")  # what export_as_lora writes: PEFT's factors exactly
    assert torch.equal(a_cat, a) and torch.equal(b_cat, b)
    assert torch.equal(peft_a(pair.A.unpack(cl.cblora_A["default"].detach()), 4, a.shape[1:]), a)
    lora.eval(), cb.eval()
    torch.testing.assert_close(cb(x), lora(x), atol=1e-6, rtol=1e-6)
    lora.train(), cb.train()
    lora(x).sum().backward()
    cb(x).sum().backward()
    torch.testing.assert_close(cl.cblora_A["default"].grad, pair.A.pack(stored_a(a.grad, 4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cl.cblora_B["default"].grad, pair.B.pack(b.grad.reshape(12, -1)), atol=1e-5, rtol=1e-5)
    # PEFT refuses to merge a grouped conv; so does CapaBoost, by name
    lora.eval(), cb.eval()
    with pytest.raises(NotImplementedError):
        lora.merge_and_unload()
    with pytest.raises(NotImplementedError, match=MERGE_REFUSED):
        cb.merge_and_unload()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grouped_forward_is_the_sum_of_masked_copies(dims):
    model = make_grouped(dims).eval()
    layer = model.base_model.model.g
    conv, conv_fn = layer.get_base_layer(), CONV[dims][1]
    pair = layer.capaboost_pairs["default"]
    a = pair.A.unpack(layer.cblora_A["default"].detach())
    b = pair.B.unpack(layer.cblora_B["default"].detach())
    x = torch.randn(SHAPES[dims])
    expected = conv(x)
    for ma, mb in zip(pair.A.masks, pair.B.masks):  # copy by copy, each a PEFT grouped-conv LoRA of rank r
        kernel = peft_a(a * ma, 4, (8, *conv.kernel_size))
        h = conv_fn(x, kernel, None, conv.stride, conv.padding)
        up = (b * mb).reshape(12, 2, *(1,) * dims)
        expected = expected + layer.scaling["default"] * conv_fn(h, up, groups=4)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    counts = parameter_counts(model)["modules"]["g"]
    assert counts["dense"] == 8 * 8 * 3**dims + 12 * 2  # PEFT's: A (r, in, k..), B (out, r/groups)
    assert counts["union"] == layer.cblora_A["default"].numel() + layer.cblora_B["default"].numel() < counts["dense"]


def test_grouped_merge_refused_disable_mixed_train_save_reload(tmp_path):
    model = make_grouped(2).eval()
    layer = model.base_model.model.g
    x = torch.randn(SHAPES[2])
    out = model(x)
    with model.disable_adapter():
        base_out = model(x)
    assert not torch.allclose(out, base_out)
    w0 = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(NotImplementedError, match=MERGE_REFUSED):
        model.merge_adapter()
    assert not layer.merged and torch.equal(layer.get_base_layer().weight, w0)
    assert torch.equal(model(x), out)
    # mixed batches: row 0 with the adapter, row 1 without
    mixed = model(x, adapter_names=["default", "__base__"])
    torch.testing.assert_close(mixed, torch.cat([out[:1], base_out[1:]]), atol=1e-6, rtol=1e-6)
    model.train()
    model(x).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if "cblora_" in n}
    model.eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="merging it is not supported"):
        reloaded = PeftModel.from_pretrained(GroupedNet(2), tmp_path).eval()
    assert torch.equal(reloaded(x), out)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grouped_export_as_lora_matches(dims):
    from capaboost import export_as_lora

    model = make_grouped(dims, num_copies=3).eval()
    x = torch.randn(SHAPES[dims])
    expected = model(x)
    lora = export_as_lora(model).eval()
    assert lora.peft_config["default"].r == 24  # d*r
    layer = lora.base_model.model.g
    assert layer.lora_A["default"].weight.shape == (24, 8, *(3,) * dims)
    assert layer.lora_B["default"].weight.shape == (12, 6, *(1,) * dims)  # grouped B: d*r/groups
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)


def test_grouped_delta_ranks_is_the_rank_of_the_composed_kernel():
    # ΔW of a grouped adapter is a full conv kernel K[o, i, ...] = sum over o's group's channels c of B[o, c] A[c, i, ...]
    # (merging cannot hold it, but its rank is what rank accounting reports); groups=4, d*r=16, out=12
    model = make_grouped(2)
    layer = model.base_model.model.g
    a, b = (w.detach().double() for w in layer.lora_weights("default"))  # PEFT's layout: (16, 8, 3, 3), (12, 4, 1, 1)
    groups, out = 4, 12
    kernel = torch.cat([
        torch.einsum("oc,cikl->oikl", b[g * out // groups : (g + 1) * out // groups, :, 0, 0],
                     a[g * a.shape[0] // groups : (g + 1) * a.shape[0] // groups])
        for g in range(groups)
    ])
    expected = int(torch.linalg.matrix_rank(kernel.reshape(out, -1)))
    assert expected > 2 * 8 // groups  # more than the stored layout's d*r/G = 4 rows could give
    assert delta_ranks(model)["g"] == expected
    dense = make_grouped(2, r=4, num_copies=1, mask_density=1.0)  # d=1, s=1: PEFT's grouped LoRA of rank r = 4
    assert delta_ranks(dense)["g"] == 4


def test_grouped_nm_masks_stay_within_a_group_block():
    # 2:4 on GroupedNet (fan-in 8*3 = 24 per row of PEFT's A): every exported row keeps <= 2 of each 4 entries
    model = make_grouped(1, r=16, mask_pattern="2:4")  # r/groups = 4 columns of B: divisible by M too
    a, _ = model.base_model.model.g.lora_weights("default")  # (d*r, in, k) = (32, 8, 3)
    kept = (a.reshape(a.shape[0], -1, 4) != 0).sum(-1)
    assert kept.max() <= 2 and kept.sum() > 0
    # a fan-in of 2*3 = 6 is not divisible by M=4: a group of 4 would straddle two group blocks of the stored A
    net = nn.Sequential(nn.Conv1d(2, 4, kernel_size=3, groups=2))
    with pytest.raises(ValueError, match=r"kernel fan-in 6 is not divisible by M=4.*mask_pattern='random'"):
        get_peft_model(net, CapaBoostLoraConfig(target_modules=["0"], r=8, num_copies=2, mask_density=0.5,
                                                mask_pattern="2:4"))
