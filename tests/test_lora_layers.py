"""CapaBoost-LoRA on nn.Embedding, nn.Conv1d and nn.Conv3d: PEFT LoRA's layouts, exact merge, export."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

import capaboost  # noqa: F401  (registers the method)
from capaboost import CapaBoostLoraConfig, delta_ranks, export_as_lora, parameter_counts
from capaboost.lora.layer import Conv1d, Conv3d, Embedding


class ScaledEmbedding(nn.Embedding):
    """Like Gemma's scaled word embedding: the lookup times ``embed_scale``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embed_scale = 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale


class TinyEmbNet(nn.Module):
    def __init__(self, scaled: bool = False) -> None:
        super().__init__()
        self.emb = (ScaledEmbedding if scaled else nn.Embedding)(30, 16, padding_idx=0)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)).mean(1))


def make_emb(seed=0, scaled=False, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(r=3, lora_alpha=6, num_copies=2, mask_density=0.5, mask_seed=5, init_lora_weights=False)
    cfg.update(kw)
    return get_peft_model(TinyEmbNet(scaled), CapaBoostLoraConfig(target_modules=["emb"], **cfg))


def reference_delta(layer: nn.Module) -> torch.Tensor:
    """scaling * Σ_i (B ⊙ m_Bi)(A ⊙ m_Ai), copy by copy, from the dense shared factors and the masks."""
    pair = layer.capaboost_pairs["default"]
    a = pair.A.unpack(layer.cblora_A["default"].detach())
    b = pair.B.unpack(layer.cblora_B["default"].detach())
    return layer.scaling["default"] * sum((b * mb) @ (a * ma) for ma, mb in zip(pair.A.masks, pair.B.masks))


TOKENS = torch.tensor([[1, 5, 0, 29, 7], [3, 3, 12, 0, 2]])


def test_embedding_d1_s1_equals_peft_lora_exactly():
    torch.manual_seed(0)
    base = TinyEmbNet()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["emb"])).eval()
    cb = get_peft_model(
        copy.deepcopy(base), CapaBoostLoraConfig(r=4, lora_alpha=8, num_copies=1, mask_density=1.0, target_modules=["emb"])
    ).eval()
    layer = cb.base_model.model.emb
    assert isinstance(layer, Embedding)
    peft_layer = lora.base_model.model.emb
    with torch.no_grad():
        peft_layer.lora_embedding_A["default"].normal_()  # PEFT's init has A = 0: make the delta non-zero
        layer.cblora_A["default"].copy_(peft_layer.lora_embedding_A["default"].reshape(-1))
        layer.cblora_B["default"].copy_(peft_layer.lora_embedding_B["default"].reshape(-1))
    expected = lora(TOKENS)
    assert not torch.allclose(expected, base(TOKENS))
    assert torch.equal(cb(TOKENS), expected)
    torch.testing.assert_close(layer.get_delta_weight("default"), peft_layer.get_delta_weight("default"))


def test_embedding_init_as_peft_starts_at_the_base_model_and_trains_a():
    torch.manual_seed(0)
    base = TinyEmbNet()
    model = get_peft_model(copy.deepcopy(base), CapaBoostLoraConfig(r=2, lora_dropout=0.5, target_modules=["emb"]))
    layer = model.base_model.model.emb
    assert (layer.cblora_A["default"] == 0).all() and (layer.cblora_B["default"] != 0).all()  # PEFT: A=0, B~N(0,1)
    assert torch.equal(model(TOKENS), base(TOKENS))
    model.train()
    model(TOKENS).sum().backward()  # lora_dropout does not touch token ids (as PEFT)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"base_model.model.emb.cblora_A.default", "base_model.model.emb.cblora_B.default"}
    assert layer.cblora_A["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("scaled", [False, True])
def test_embedding_forward_merge_unmerge_are_exact(scaled):
    model = make_emb(scaled=scaled).eval()
    layer = model.base_model.model.emb
    base = layer.get_base_layer()
    w0 = base.weight.detach().clone()
    expected_emb = F.embedding(TOKENS, w0 + reference_delta(layer).t(), padding_idx=0) * (3.0 if scaled else 1.0)
    torch.testing.assert_close(layer(TOKENS), expected_emb, atol=1e-6, rtol=1e-6)
    before = model(TOKENS)
    model.merge_adapter()
    torch.testing.assert_close(base.weight, w0 + reference_delta(layer).t(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(TOKENS), before, atol=1e-6, rtol=1e-6)
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=1e-6)
    merged = model.merge_and_unload()
    assert type(merged.emb) is (ScaledEmbedding if scaled else nn.Embedding)
    torch.testing.assert_close(merged(TOKENS), before, atol=1e-6, rtol=1e-6)


def test_embedding_rank_is_d_times_r_and_union_is_stored():
    model = make_emb()
    assert delta_ranks(model) == {"emb": 6}  # d*r = 2*3
    counts = parameter_counts(model)["modules"]["emb"]
    assert counts["dense"] == 3 * 30 + 16 * 3
    layer = model.base_model.model.emb
    assert counts["union"] == layer.cblora_A["default"].numel() + layer.cblora_B["default"].numel() < counts["dense"]


def test_embedding_save_and_reload_give_identical_outputs(tmp_path):
    model = make_emb().eval()
    expected = model(TOKENS)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(TinyEmbNet(), tmp_path).eval()
    assert isinstance(reloaded.base_model.model.emb, Embedding)
    assert torch.equal(reloaded(TOKENS), expected)


def test_embedding_export_as_lora_gives_peft_embedding_factors():
    model = make_emb().eval()
    expected = model(TOKENS)
    lora = export_as_lora(model).eval()
    assert lora.peft_config["default"].r == 6
    layer = lora.base_model.model.emb
    assert layer.lora_embedding_A["default"].shape == (6, 30) and layer.lora_embedding_B["default"].shape == (16, 6)
    torch.testing.assert_close(lora(TOKENS), expected, atol=1e-6, rtol=1e-6)


def test_embedding_with_max_norm_is_refused():
    net = TinyEmbNet()
    net.emb.max_norm = 1.0
    with pytest.raises(ValueError, match=r"'emb'.*max_norm=1.0.*exclude_modules"):
        get_peft_model(net, CapaBoostLoraConfig(r=2, target_modules=["emb"]))


class TinyConvNdNet(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
        self.dims = dims
        self.conv = conv(4, 6, kernel_size=3, stride=2, padding=1, bias=True)
        self.dilated = conv(6, 6, kernel_size=3, padding=2, dilation=2)
        self.grouped = conv(6, 6, kernel_size=1, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(F.relu(self.dilated(F.relu(self.conv(x)))))
        return self.head(x.mean(tuple(range(2, 2 + self.dims))))


CONV_CASES = [(1, Conv1d, F.conv1d, (2, 4, 11)), (3, Conv3d, F.conv3d, (2, 4, 5, 6, 7))]


def make_conv(dims, targets=("conv", "dilated"), seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(r=2, lora_alpha=4, num_copies=3, mask_density=0.5, mask_seed=7, init_lora_weights=False)
    cfg.update(kw)
    return get_peft_model(TinyConvNdNet(dims), CapaBoostLoraConfig(target_modules=list(targets), **cfg))


@pytest.mark.parametrize("dims,cls,conv_fn,shape", CONV_CASES)
def test_convnd_forward_is_the_sum_of_masked_copies_and_merge_is_exact(dims, cls, conv_fn, shape):
    model = make_conv(dims).eval()
    x = torch.randn(shape)
    for name in ("conv", "dilated"):
        layer = getattr(model.base_model.model, name)
        assert isinstance(layer, cls)
        base = layer.get_base_layer()
        xin = x if name == "conv" else torch.randn(2, 6, *shape[2:])
        kernel = base.weight + reference_delta(layer).reshape(base.weight.shape)
        expected = conv_fn(xin, kernel, base.bias, base.stride, base.padding, base.dilation)
        torch.testing.assert_close(layer(xin), expected, atol=1e-5, rtol=1e-5)
    before = model(x)
    w0 = model.base_model.model.conv.get_base_layer().weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.conv.get_base_layer().weight, w0, atol=1e-6, rtol=1e-6)
    assert delta_ranks(model) == {"conv": 6, "dilated": 6}  # d*r = 3*2
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims,cls,conv_fn,shape", CONV_CASES)
def test_convnd_save_reload_and_export(dims, cls, conv_fn, shape, tmp_path):
    model = make_conv(dims, targets=("conv",)).eval()
    x = torch.randn(shape)
    expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the same base weights
    reloaded = PeftModel.from_pretrained(TinyConvNdNet(dims), tmp_path).eval()
    assert torch.equal(reloaded(x), expected)
    lora = export_as_lora(model).eval()
    assert lora.peft_config["default"].r == 6
    assert lora.base_model.model.conv.lora_B["default"].weight.shape == (6, 6, *(1,) * dims)
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_convnd_refusals(dims):
    kind = f"Conv{dims}d"
    with pytest.raises(ValueError, match=rf"'grouped'.*grouped {kind} \(groups=2\) and r=3 is not divisible"):
        make_conv(dims, targets=("grouped",), r=3)
    with pytest.warns(UserWarning, match="merging it is not supported"):
        grouped = make_conv(dims, targets=("grouped",))  # r=2: supported, as PEFT's LoRA (tests/test_conv_lora.py)
    with pytest.raises(NotImplementedError, match=rf"cannot merge .*grouped {kind} \(groups=2\)"):
        grouped.merge_adapter()
    dilated = make_conv(dims, targets=("dilated",))
    with pytest.raises(ValueError, match=rf"{kind} has dilation=\(2,.*merge_and_unload"):
        export_as_lora(dilated)
    assert isinstance(dilated.base_model.model.dilated, (Conv1d, Conv3d))  # refused before unloading
    net = TinyConvNdNet(dims)
    net.conv.padding_mode = "circular"
    with pytest.raises(ValueError, match=rf"{kind} padding_mode='circular'"):
        get_peft_model(net, CapaBoostLoraConfig(r=2, target_modules=["conv"]))


def test_unsupported_layer_type_names_the_supported_ones():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"LayerNorm.*torch.nn.Embedding and torch.nn.Conv1d/Conv2d/Conv3d"):
        get_peft_model(net, CapaBoostLoraConfig(r=2, target_modules=["1"]))
