"""Every method of the runner's table builds on a tiny BERT, trains its own parameters and reloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capaboost.train.errors import ConfigError
from capaboost.train.methods import METHODS, MethodContext, apply_method, count_parameters
from capaboost.train.models import build_base_model
from capaboost.train.run_config import RunConfig
from capaboost.train.run import train
from capaboost.train.trained import load_trained
import helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return helpers.save_tiny_bert(root / "bert"), helpers.write_glue("sst2", root / "sst2", n_train=16, n_dev=8), root


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    if isinstance(model, PeftModel):
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_its_own_parameters_and_reloads(setup, tmp_path, method):
    bert, data, _ = setup
    options = dict(task="sst2", method=method, data_dir=data, model=bert, r=8 if method not in ("vera", "randlora") else 16,
                   bottleneck=8, num_virtual_tokens=4, prefix_hidden=16, lr=1e-2, seed=0)
    metrics = train(RunConfig(**options, output_dir=str(tmp_path / "out"), max_steps=2, batch_size=8, threads=1,
                              progress=False, cache_dir=str(tmp_path / "cache")))
    assert metrics["steps"] == 2 and np.isfinite(metrics["train_loss"][-1]["loss"])
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]

    # The runner's initial model, rebuilt from the same seed, vs what it saved after two steps.
    from transformers import set_seed

    set_seed(0)
    cfg = RunConfig(**options, max_steps=2).resolved()
    init = apply_method(cfg, build_base_model("seq_cls", bert, 2), MethodContext("SEQ_CLS", (), 2))
    assert count_parameters(init)[0] == metrics["trainable_params"]
    before = _state(init)
    after = _state(load_trained(tmp_path / "out")[0])
    body = [k for k in before if "classifier" not in k and "pooler" not in k]
    changed = [k for k in body if k in after and not torch.equal(before[k], after[k])]
    assert changed, f"{method}: no non-head tensor changed in training"
    if method == "bitfit":
        assert all(k.endswith(".bias") for k in changed)
    if method == "full":
        assert any(k.endswith("query.weight") for k in changed)


def test_lora_rank_is_r_and_capaboost_rank_is_d_times_r(setup, tmp_path):
    bert, data, _ = setup
    ranks = {}
    for method in ("lora", "capaboost-lora"):
        m = train(RunConfig(task="sst2", method=method, data_dir=data, model=bert, r=4, max_steps=2, batch_size=8,
                            threads=1, progress=False, output_dir=str(tmp_path / method), cache_dir=str(tmp_path / "c")))
        ranks[method] = set(m["delta_ranks"].values())
    assert ranks == {"lora": {4}, "capaboost-lora": {8}}


def test_adalora_gets_the_schedule_length(setup):
    bert, _, _ = setup
    cfg = RunConfig(task="sst2", method="adalora", data_dir=".", model=bert).resolved()
    model = apply_method(cfg, build_base_model("seq_cls", bert, 2), MethodContext("SEQ_CLS", (), 40))
    config = model.peft_config["default"]
    assert (config.total_step, config.target_r, config.tinit, config.tfinal) == (40, 8, 4, 8)


def test_prefix_tuning_needs_a_text_task(setup):
    bert, _, _ = setup
    cfg = RunConfig(task="image", method="prefix", data_dir=".", model=bert).resolved()
    with pytest.raises(ConfigError, match="text tasks only"):
        apply_method(cfg, build_base_model("seq_cls", bert, 2), MethodContext(None, ("classifier",), 4))


def test_adapters_refuse_target_modules(setup):
    pytest.importorskip("capaboost.adapter")
    bert, _, _ = setup
    cfg = RunConfig(task="sst2", method="padapter", data_dir=".", model=bert, target_modules=["query"]).resolved()
    with pytest.raises(ConfigError, match="--adapter-placement"):
        apply_method(cfg, build_base_model("seq_cls", bert, 2), MethodContext("SEQ_CLS", (), 4))


def test_timm_vision_model_trains_with_capaboost_lora(tmp_path):
    pytest.importorskip("capaboost.timm_compat")
    data = helpers.write_images_npz(tmp_path / "img.npz", n_train=24, n_test=8)
    metrics = train(RunConfig(task="image", method="capaboost-lora", data_dir=data, model="timm:test_vit",
                              train_size=16, val_size=4, output_dir=str(tmp_path / "out"), max_steps=1, batch_size=8,
                              eval_batch_size=16, threads=1, progress=False))
    assert set(metrics["test"]) == {"accuracy"}
    assert metrics["delta_ranks"] and set(metrics["delta_ranks"].values()) == {16}  # fused qkv, d*r = 16
    assert metrics["trainable_params"] < metrics["total_params"] / 10


@pytest.mark.parametrize("method", ["capaboost-lora", "capaboost-padapter"])
def test_mask_options_reach_every_capaboost_config(setup, method):
    bert, _, _ = setup
    cfg = RunConfig(task="sst2", method=method, data_dir=".", model=bert, d=3, density=0.5, mask_mode="same",
                    mask_pattern="2:4", mask_seed=7).resolved()
    config = apply_method(cfg, build_base_model("seq_cls", bert, 2), MethodContext("SEQ_CLS", (), 4)).peft_config
    config = config["default"]
    assert (config.num_copies, config.mask_mode, config.mask_pattern, config.mask_seed) == (3, "same", "2:4", 7)
    plain = RunConfig(task="sst2", method="padapter", data_dir=".", model=bert, mask_pattern="2:4").resolved()
    config = apply_method(plain, build_base_model("seq_cls", bert, 2), MethodContext("SEQ_CLS", (), 4)).peft_config
    assert (config["default"].num_copies, config["default"].mask_density) == (1, 1.0)
