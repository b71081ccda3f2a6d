"""PEFT's own LoRA test cases, run with CapaBoostLoraConfig in place of LoraConfig (issue 14).

The cases are the ``LoraConfig`` rows of ``TEST_CASES`` in PEFT's ``tests/test_custom_models.py``, copied with
their models into ``peft_custom_models.py`` (commit: ``peft_custom_models.PEFT_COMMIT``). Every row is classified
in ``EXPECTED`` and is either

- **supported**: with the row's kwargs, CapaBoostLoraConfig at d=1, s=1 gives PEFT LoRA's model (the LoRA factors
  copied into the packed parameters: outputs, ΔW and merged weights equal LoRA's within 1e-6, gradients 1e-5), and at the
  defaults d=2, s=0.5 it has the generic behaviours PEFT's test_custom_models checks: the adapter changes the output
  (init_lora_weights=False) and is a no-op at init (True), merge/unmerge/merge_and_unload/unload, disable_adapter,
  save_pretrained/from_pretrained (safetensors and pickle) and load_adapter, two adapters with set_adapter,
  delete_adapter, only adapter parameters trainable and updated, gradients reach the packed factors; or
- **refused**: CapaBoostLoraConfig(...) or get_peft_model raises the given exception type, and its message names
  the feature and a way out (both checked with a regex), at d=1, s=1 and at d=2, s=0.5; PEFT's LoraConfig takes the
  same row (so the refusal is CapaBoost's own).

``trainable_token_indices`` is PEFT's own TrainableTokensWrapper next to the CapaBoost layers; where the tests give
B random values (init_lora_weights=False) they also move those token rows off the embedding's values.

A row missing from ``EXPECTED`` (e.g. a new one copied from PEFT) fails ``test_every_peft_lora_row_is_classified``:
nothing is skipped silently. Known bugs are marked ``xfail(strict=True)`` in ``XFAIL`` so that they flip when fixed.
"""

from __future__ import annotations

import copy
import re
from operator import attrgetter

import pytest
import torch

import capaboost  # noqa: F401  (registers CapaBoostLoraConfig with PEFT; before peft, quiets torchao)
from capaboost import CapaBoostLoraConfig
from capaboost.lora import CapaBoostLoraLayer
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

import peft_custom_models as pcm

D1 = dict(num_copies=1, mask_density=1.0)  # must be PEFT LoRA
D2 = dict(num_copies=2, mask_density=0.5)  # the defaults: CapaBoost proper

SUPPORTED = "supported"

_LORA_WAY_OUT = r"use peft\.LoraConfig"
# (exception type, regex naming the feature, regex naming a way out); both must occur in the message
# DoRA runs on nn.Linear and transformers' Conv1D (CapaBoost-DoRA, tests/test_dora.py); Embedding and Conv DoRA refuse
DORA = (ValueError, r"use_dora=True \(DoRA\) to '(emb|conv1d|conv2d|conv3d)' of type torch\.nn\.",
        r"Exclude it with exclude_modules, or use peft\.LoraConfig\(use_dora=True\)")
KASA = (ValueError, r"kasa_config=.*KaSA is a PEFT LoRA variant", _LORA_WAY_OUT)
MICA = (ValueError, r"init_lora_weights='mica'.*MiCA", r"use True .* or False .*peft\.LoraConfig\(init_lora_weights=")
VELORA = (ValueError, r"velora_config=.*VeLoRA is a PEFT LoRA variant", _LORA_WAY_OUT)
LORA_BIAS = (ValueError, r"lora_bias=True: B has no bias of its own", r"use bias='cblora_only'")
MHA = (
    ValueError, r"cannot adapt 'mha' of type torch\.nn\.modules\.activation\.MultiheadAttention",
    r"Remove it from target_modules \(or exclude it with exclude_modules\)",
)
MONTECLORA = (ValueError, r"monteclora_config=.*MonteCLoRA is a PEFT LoRA variant", _LORA_WAY_OUT)
BDLORA = (ValueError, r"use_bdlora=.*BD-LoRA is a PEFT LoRA variant", _LORA_WAY_OUT)

EXPECTED = {
    "Vanilla MLP 1 LoRA": SUPPORTED,
    "Vanilla MLP 2 LoRA": SUPPORTED,
    "Vanilla MLP 3 LoRA": SUPPORTED,
    "Vanilla MLP 4 LoRA": SUPPORTED,
    "Vanilla MLP 5 LoRA": SUPPORTED,
    "Vanilla MLP 6 LoRA": SUPPORTED,
    "Vanilla MLP 7 LoRA with DoRA": SUPPORTED,
    "Vanilla MLP 8 LoRA with DoRA": SUPPORTED,
    "Vanilla MLP 1 LoRA with KaSA": KASA,
    "Vanilla MLP 1 LoRA with MiCA": MICA,
    "Vanilla MLP 9 LoRA with DoRA": SUPPORTED,
    "Vanilla MLP 10 LoRA with VeLoRA random": VELORA,
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": VELORA,
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": VELORA,
    "Embedding + transformers Conv1D 1 LoRA": SUPPORTED,
    "Embedding + transformers Conv1D 2 LoRA": SUPPORTED,
    "Embedding + transformers Conv1D 3 LoRA": SUPPORTED,
    "Embedding + transformers Conv1D 1 DoRA": SUPPORTED,
    "Embedding + transformers Conv1D 2 DoRA": DORA,
    "Embedding + transformers Conv1D 3 DoRA": DORA,
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens": SUPPORTED,
    "Conv1d LoRA": SUPPORTED,
    "Conv1d LoRA with DoRA": DORA,
    "Conv2d 1 LoRA": SUPPORTED,
    "Conv2d 2 LoRA": SUPPORTED,
    "Conv2d 1 LoRA with DoRA": DORA,
    "Conv2d 2 LoRA with DoRA": DORA,
    "Conv2d Groups LoRA": SUPPORTED,
    "Conv2d Groups2 LoRA": SUPPORTED,
    "Conv2d Groups LoRA with DoRA": DORA,
    "Conv2d Groups2 LoRA with DoRA": DORA,
    "Conv3d 1 LoRA": SUPPORTED,
    "Conv3d 2 LoRA": SUPPORTED,
    "Conv3d 1 LoRA with DoRA": DORA,
    "Conv3d 2 LoRA with DoRA": DORA,
    "Vanilla MLP 1 LoRA with lora_b bias": LORA_BIAS,
    "Conv2d 1 LoRA with lora_b bias": LORA_BIAS,
    "Conv3d 1 LoRA with lora_b bias": LORA_BIAS,
    "MHA 1 LoRA": MHA,
    "MHA 2 LoRA": MHA,
    "MLP 1 using nn.Parameter LoRA": SUPPORTED,
    "MLP 2 using nn.Parameter LoRA": SUPPORTED,
    "Vanilla MLP 1 LoRA with Monteclora": MONTECLORA,
    "BD-LoRA A only": BDLORA,
    "BD-LoRA B only": BDLORA,
    "BD-LoRA both A and B": BDLORA,
}

# grouped convs: PEFT's LoRA cannot merge them (nor build their ΔW), and CapaBoost refuses the same, by name
UNMERGEABLE = {"Conv2d Groups LoRA", "Conv2d Groups2 LoRA"}
MERGE_REFUSED = r"cannot merge .*grouped Conv2d \(groups=\d+\).*exclude the grouped conv with exclude_modules"

# supported rows that fail because of a bug in capaboost: {(test function name, row name): reason}
XFAIL: dict[tuple[str, str], str] = {}


def _rows(kind: str, test: str) -> list:
    params = []
    for name, model_id, config_cls, kwargs in pcm.LORA_TEST_CASES:
        expected = EXPECTED.get(name)
        if expected is None or (expected == SUPPORTED) != (kind == SUPPORTED):
            continue
        reason = XFAIL.get((test, name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(name, model_id, kwargs, expected, id=name, marks=marks))
    return params


def _inputs() -> dict:
    return pcm.prepare_inputs_for_testing()


def _cb_model(model_id: str, kwargs: dict, setting: dict = D2, **extra) -> PeftModel:
    config = CapaBoostLoraConfig(**{**kwargs, **setting, **extra})
    model = get_peft_model(pcm.build_model(model_id), config)
    if config.init_lora_weights is False:
        _perturb_tokens(model)
    return model


def _perturb_tokens(model: PeftModel) -> None:
    """trainable_token_indices rows start as the embedding's own rows (a no-op): as init_lora_weights=False does
    for B, give them other values, so that merge, disable, save and delete are tested on a non-trivial delta."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))


def _is_adapter_param(name: str) -> bool:
    """A parameter PEFT trains for the adapter: CapaBoost's packed factors, modules_to_save, trainable tokens."""
    return ("cblora_" in name or "lora_magnitude_vector" in name or ".modules_to_save." in name
            or "trainable_tokens_delta" in name)


def _layers(model: torch.nn.Module, cls: type) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, cls)}


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ the table


@pytest.mark.parametrize("row", pcm.LORA_TEST_CASES, ids=[row[0] for row in pcm.LORA_TEST_CASES])
def test_every_peft_lora_row_is_classified(row):
    name, _, config_cls, _ = row
    assert config_cls is LoraConfig
    assert name in EXPECTED, (
        f"PEFT LoRA test case {name!r} is neither supported nor refused here: add it to EXPECTED in "
        "tests/test_peft_cases.py (SUPPORTED, or the refusal it must raise), and fix capaboost if it does neither."
    )


def test_the_table_has_no_stale_rows():
    names = [row[0] for row in pcm.LORA_TEST_CASES]
    assert len(names) == len(set(names))
    assert sorted(set(EXPECTED) - set(names)) == []
    assert sorted({k[1] for k in XFAIL} - {n for n in names if EXPECTED.get(n) == SUPPORTED}) == []
    assert sorted({k[0] for k in XFAIL} - {n for n in globals() if n.startswith("test_")}) == []


# ------------------------------------------------------------------------------------------------ refused rows


@pytest.mark.parametrize("setting", [D1, D2], ids=["d1-s1", "d2-s0.5"])
@pytest.mark.parametrize("name, model_id, kwargs, expected", _rows("refused", "test_refused_with_a_clear_error"))
def test_refused_with_a_clear_error(name, model_id, kwargs, expected, setting):
    exc_type, feature, way_out = expected
    if setting is D2:  # the row is valid PEFT LoRA: the refusal is CapaBoost's own
        assert isinstance(get_peft_model(pcm.build_model(model_id), LoraConfig(**kwargs)), PeftModel)
    with pytest.raises(Exception) as info:
        get_peft_model(pcm.build_model(model_id), CapaBoostLoraConfig(**{**kwargs, **setting}))
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert re.search(feature, message), f"the message does not name the feature ({feature!r}): {message}"
    assert re.search(way_out, message), f"the message gives no way out ({way_out!r}): {message}"


# ------------------------------------------------------------------------------------------------ d=1, s=1: LoRA


def _lora_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    if "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _stored_a(layer: CapaBoostLoraLayer, a: torch.Tensor) -> torch.Tensor:
    """PEFT's lora_A weight as CapaBoost stores A: a grouped conv's G row blocks side by side (see lora.conv)."""
    groups = getattr(layer.get_base_layer(), "groups", 1)
    rows = a.shape[0] // groups
    return a.reshape(groups, rows, -1).transpose(0, 1).reshape(rows, -1)


def _copy_lora_into_capaboost(lora: PeftModel, cb: PeftModel) -> dict[str, tuple[LoraLayer, CapaBoostLoraLayer]]:
    """Give each CapaBoost layer its LoRA twin's factors; check that CapaBoost then reports exactly those factors."""
    lora_layers, cb_layers = _layers(lora, LoraLayer), _layers(cb, CapaBoostLoraLayer)
    assert sorted(lora_layers) == sorted(cb_layers) and lora_layers
    pairs = {}
    with torch.no_grad():
        for name, lora_layer in lora_layers.items():
            cb_layer = cb_layers[name]
            a, b = _lora_factors(lora_layer)
            pair = cb_layer.capaboost_pairs["default"]
            assert pair.A.numel_union == a.numel() and pair.B.numel_union == b.numel()  # d=1, s=1: dense
            cb_layer.cblora_A["default"].copy_(pair.A.pack(_stored_a(cb_layer, a)))
            cb_layer.cblora_B["default"].copy_(pair.B.pack(b.reshape(b.shape[0], -1)))
            if "default" in lora_layer.lora_magnitude_vector:  # DoRA rows: the magnitude too
                cb_layer.lora_magnitude_vector["default"].copy_(lora_layer.lora_magnitude_vector["default"].weight)
            a_cat, b_cat = cb_layer.lora_weights("default")  # what export_as_lora would write
            _exact(a_cat, a)
            _exact(b_cat, b)
            assert cb_layer.scaling["default"] == lora_layer.scaling["default"]
            pairs[name] = lora_layer, cb_layer
    return pairs


def _frozen_and_saved(model: PeftModel, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if prefix not in k and "lora_magnitude_vector" not in k}


@pytest.mark.parametrize("name, model_id, kwargs, expected", _rows(SUPPORTED, "test_d1_s1_is_peft_lora"))
def test_d1_s1_is_peft_lora(name, model_id, kwargs, expected):
    X = _inputs()
    lora = get_peft_model(pcm.build_model(model_id), LoraConfig(**kwargs, init_lora_weights=False))
    cb = _cb_model(model_id, kwargs, D1, init_lora_weights=False)
    pairs = _copy_lora_into_capaboost(lora, cb)
    _perturb_tokens(lora)
    cb_params = dict(cb.named_parameters())
    others = {n: p for n, p in lora.named_parameters() if p.requires_grad and "lora_" not in n}  # tokens, m_t_s
    with torch.no_grad():
        for n, p in others.items():
            cb_params[n].copy_(p)
    # the same frozen base and the same modules_to_save copies
    lora_rest, cb_rest = _frozen_and_saved(lora, "lora_"), _frozen_and_saved(cb, "cblora_")
    assert sorted(lora_rest) == sorted(cb_rest)
    for key in lora_rest:
        _exact(cb_rest[key], lora_rest[key])
    # the same trainable parameter count: d=1, s=1 stores dense LoRA factors
    assert cb.get_nb_trainable_parameters() == lora.get_nb_trainable_parameters()

    lora.eval(), cb.eval()
    out = lora(**X)
    _close(cb(**X), out)
    with lora.disable_adapter():
        out_base = lora(**X)
    assert not torch.allclose(out, out_base)  # the comparison is not vacuous

    # training mode (PEFT's dropouts draw the same numbers in the same order) and the gradients
    lora.train(), cb.train()
    torch.manual_seed(1)
    y_lora = lora(**X)
    torch.manual_seed(1)
    y_cb = cb(**X)
    _close(y_cb, y_lora)
    y_lora.sum().backward()
    y_cb.sum().backward()
    for lora_layer, cb_layer in pairs.values():
        a, b = _lora_factors(lora_layer)
        pair = cb_layer.capaboost_pairs["default"]
        _close(cb_layer.cblora_A["default"].grad, pair.A.pack(_stored_a(cb_layer, a.grad)), 1e-5)
        _close(cb_layer.cblora_B["default"].grad, pair.B.pack(b.grad.reshape(b.shape[0], -1)), 1e-5)
        if name in UNMERGEABLE:
            with pytest.raises(NotImplementedError, match=MERGE_REFUSED):
                cb_layer.get_delta_weight("default")
        else:
            _close(cb_layer.get_delta_weight("default"), lora_layer.get_delta_weight("default"))
        if "default" in lora_layer.lora_magnitude_vector:
            _close(cb_layer.lora_magnitude_vector["default"].grad,
                   lora_layer.lora_magnitude_vector["default"].weight.grad, 1e-5)
    for n, p in others.items():
        _close(cb_params[n].grad, p.grad, 1e-5)

    # merged: the same plain model
    lora.eval(), cb.eval()
    if name in UNMERGEABLE:
        with pytest.raises(NotImplementedError):
            lora.merge_and_unload()
        with pytest.raises(NotImplementedError, match=MERGE_REFUSED):
            cb.merge_and_unload()
        return
    merged_lora, merged_cb = lora.merge_and_unload(), cb.merge_and_unload()
    lora_sd, cb_sd = merged_lora.state_dict(), merged_cb.state_dict()
    assert sorted(lora_sd) == sorted(cb_sd)
    for key in lora_sd:
        _close(cb_sd[key], lora_sd[key])
    _close(merged_cb(**X), out, 1e-5)


# ------------------------------------------------------------------------------------------------ d=2, s=0.5


@pytest.mark.parametrize("name, model_id, kwargs, expected", _rows(SUPPORTED, "test_forward_merge_disable_unload"))
def test_forward_merge_disable_unload(name, model_id, kwargs, expected):
    X = _inputs()
    base = pcm.build_model(model_id).eval()
    out_base = base(**X)

    # B = 0 at init: the wrapped model is the base model
    _exact(_cb_model(model_id, kwargs).eval()(**X), out_base)

    model = _cb_model(model_id, kwargs, init_lora_weights=False).eval()
    layers = _layers(model, CapaBoostLoraLayer)
    assert layers and all(layer.capaboost_pairs["default"].spec.num_copies == 2 for layer in layers.values())
    out = model(**X)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, out_base)
    with model.disable_adapter():
        _exact(model(**X), out_base)
    _exact(model(**X), out)  # the context restores the adapter

    unloaded = copy.deepcopy(model).unload()  # never merged: the base weights as they were
    assert not _layers(unloaded, CapaBoostLoraLayer)
    _exact(unloaded(**X), out_base)

    if name in UNMERGEABLE:
        with pytest.raises(NotImplementedError, match=MERGE_REFUSED):
            model.merge_adapter()
        _exact(model(**X), out)  # nothing merged
        return
    weights = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()}
    model.merge_adapter()
    out_merged = model(**X)
    _close(out_merged, out, 1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()  # idempotent
    _exact(model(**X), out_merged)
    with model.disable_adapter():  # disabling a merged adapter unmerges it (as PEFT LoRA)
        _close(model(**X), out_base, 1e-5)
    model.merge_adapter()
    model.unmerge_adapter()
    _close(model(**X), out, 1e-5)
    for name, layer in layers.items():
        _close(layer.get_base_layer().weight, weights[name])


    model.merge_adapter()
    out_merged = model(**X)
    model.unmerge_adapter()
    merged = model.merge_and_unload(safe_merge=True)
    assert not _layers(merged, CapaBoostLoraLayer)
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
    _close(merged(**X), out_merged)


@pytest.mark.parametrize("name, model_id, kwargs, expected", _rows(SUPPORTED, "test_save_load_roundtrip"))
def test_save_load_roundtrip(name, model_id, kwargs, expected, tmp_path):
    X = _inputs()
    model = _cb_model(model_id, kwargs, init_lora_weights=False)
    model.train()  # one step, so that the saved values are trained ones
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(**X).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.eval()
    out = model(**X)
    state = model.state_dict()

    for safe in (True, False):
        path = tmp_path / ("safetensors" if safe else "pickle")
        model.save_pretrained(path, safe_serialization=safe)
        assert (path / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
        loaded = PeftModel.from_pretrained(pcm.build_model(model_id), path).eval()
        assert isinstance(loaded.peft_config["default"], CapaBoostLoraConfig)
        assert loaded.peft_config["default"].num_copies == 2
        _exact(loaded(**X), out)
        loaded_state = loaded.state_dict()
        assert sorted(loaded_state) == sorted(state)
        for key in state:
            _exact(loaded_state[key], state[key])
        # a second adapter from the same folder (PEFT's test_load_multiple_adapters)
        loaded.load_adapter(path, adapter_name="other")
        loaded.set_adapter("other")
        _exact(loaded(**X), out)


@pytest.mark.parametrize("name, model_id, kwargs, expected", _rows(SUPPORTED, "test_two_adapters_set_and_delete"))
def test_two_adapters_set_and_delete(name, model_id, kwargs, expected):
    X = _inputs()
    out_base = pcm.build_model(model_id).eval()(**X)
    model = _cb_model(model_id, kwargs, init_lora_weights=False).eval()
    out_default = model(**X)
    other = CapaBoostLoraConfig(**{**kwargs, **D2}, init_lora_weights=False,
                                mask_seed=1)
    model.add_adapter("other", other)
    assert model.active_adapters == ["default"]
    _exact(model(**X), out_default)  # adding does not activate
    model.set_adapter("other")
    assert model.active_adapters == ["other"]
    out_other = model(**X)
    assert not torch.allclose(out_other, out_default)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable), sorted(trainable)
    model.set_adapter("default")
    _exact(model(**X), out_default)

    model.set_adapter("other")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert model.active_adapters == ["default"]
    for module in model.modules():
        for attr in getattr(module, "adapter_layer_names", ()) + getattr(module, "other_param_names", ()):
            assert "other" not in attrgetter(attr)(module), (type(module).__name__, attr)
        if isinstance(module, ModulesToSaveWrapper):
            assert "other" not in module.modules_to_save
    assert not any(".other" in key for key in model.state_dict())
    _exact(model(**X), out_default)

    model.delete_adapter("default")  # the last one too
    assert "default" not in model.peft_config
    assert model.active_adapters == []
    assert all(not layer.cblora_A for layer in _layers(model, CapaBoostLoraLayer).values())
    _exact(model.base_model(**X), out_base)  # PeftModel.forward itself needs an adapter (KeyError, as with LoRA)


@pytest.mark.parametrize("name, model_id, kwargs, expected", _rows(SUPPORTED, "test_training_updates_only_the_adapter"))
def test_training_updates_only_the_adapter(name, model_id, kwargs, expected):
    X = _inputs()
    prefix = "cblora_"
    # gradients reach the packed factors, and nothing else needs them
    model = _cb_model(model_id, kwargs, init_lora_weights=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        assert p.requires_grad == _is_adapter_param(n), n
    assert any(prefix + "A" in n for n in trainable) and any(prefix + "B" in n for n in trainable)
    model.train()
    model(**X).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n

    # PEFT's test_only_params_are_updated: default init (B = 0), 3 SGD steps at lr 0.5
    model = _cb_model(model_id, kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(**X).sum().backward()
        optimizer.step()
    for n, p in model.named_parameters():
        if _is_adapter_param(n):
            # PEFT asserts not allclose(atol=rtol=1e-4); an embedding's B (A = 0 at init) moves by ~1e-4 in 3 steps
            # under LoRA and CapaBoost alike, which makes that threshold a coin toss: moved at all is the claim here
            assert not torch.equal(before[n], p), n
        else:
            _exact(p, before[n])
