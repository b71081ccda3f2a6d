"""capaboost.compat: PEFT's prefix path on transformers releases that renamed past_key_values."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers as T
from peft import PrefixTuningConfig, get_peft_model

import capaboost  # noqa: F401  (installs the fix)
from capaboost import compat

IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
HEADS = {
    "SEQ_CLS": T.BertForSequenceClassification,
    "TOKEN_CLS": T.BertForTokenClassification,
    "QUESTION_ANS": T.BertForQuestionAnswering,
}


@pytest.mark.parametrize("task", sorted(HEADS))
def test_stock_prefix_tuning_runs_and_changes_the_output(task):
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32)  # fmt: skip
    base = HEADS[task](cfg).eval()
    plain = base(input_ids=IDS)[0]
    model = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=3)).eval()
    out = model(input_ids=IDS)[0]
    assert out.shape == plain.shape
    assert not torch.allclose(out, plain, atol=1e-4)  # the prefix reached the attention
    backbone = model.base_model.get_submodule(model.transformer_backbone_name)
    assert "forward" not in vars(backbone)  # the renamed forward is gone after the call


class _Renamed(nn.Module):
    def forward(self, input_ids=None, cache=None, **kwargs):
        return cache


class _Named(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        return past_key_values


def test_only_backbones_that_renamed_the_argument_are_touched():
    assert compat.needs_cache_rename(_Renamed())
    assert not compat.needs_cache_rename(_Named())
    assert not compat.needs_cache_rename(nn.Linear(2, 2))


def test_install_is_idempotent():
    from peft import peft_model

    before = peft_model.PeftModelForSequenceClassification._prefix_tuning_forward
    compat.install()
    assert peft_model.PeftModelForSequenceClassification._prefix_tuning_forward is before


def test_import_is_silent_with_torchao_installed():
    """torchao (locked, for --quantize int8) logs CUDA-kernel load failures on a CPU unless imported quietly."""
    import subprocess
    import sys

    pytest.importorskip("torchao", reason="torchao is in requirements.lock; absent only outside the lock")
    res = subprocess.run([sys.executable, "-c", "import capaboost"], capture_output=True, text=True, check=True)
    assert res.stderr == ""
