"""``capaboost train --quantize`` and ``--scale-by-density``: honoured by the LoRA methods, refused elsewhere."""

from __future__ import annotations

import contextlib
import json
import random

import pytest

import helpers
from capaboost.cli import main
from test_causal_lm_data import WORDS, tiny_tokenizer

pytest.importorskip("bitsandbytes", reason="bitsandbytes is in requirements.lock; absent only outside the lock")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny LLaMA (nn.Linear projections, unlike GPT-2's Conv1D) and a copy task."""
    root = tmp_path_factory.mktemp("quant")
    model_dir = root / "model"
    tiny_tokenizer().save_pretrained(model_dir)
    helpers.tiny_llama(vocab_size=32, bos_token_id=0, eos_token_id=1).save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    for name, n in (("train.jsonl", 16), ("dev.jsonl", 6)):
        rows = [json.dumps({"prompt": " ".join(p), "response": " " + " ".join(p[::-1])})
                for p in (rng.sample(WORDS, 2) for _ in range(n))]  # fmt: skip
        (data / name).write_text("\n".join(rows) + "\n")
    return root, model_dir, data


def _run(setup, name: str, *extra: str) -> dict:
    root, model_dir, data = setup
    out = root / name
    args = ["train", "--task", "causal-lm", "--model", str(model_dir), "--data-dir", str(data), "--output-dir",
            str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "0.01", "--max-seq-len", "16",
            "--eval-batch-size", "4", "--no-progress", "--lora-r", "2", "--target-modules", "q_proj,v_proj",
            "--cache-dir", str(root / "cache"), *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_quantize_4bit_trains_the_same_adapter_on_a_4bit_base(setup):
    plain = _run(setup, "float", "--method", "capaboost-lora")
    nf4 = _run(setup, "nf4", "--method", "capaboost-lora", "--quantize", "4bit")
    assert nf4["config"]["quantize"] == "4bit"
    assert nf4["trainable_params"] == plain["trainable_params"]  # the adapter is the same size
    assert nf4["total_params"] < plain["total_params"]  # 4-bit storage packs two weights per element
    assert nf4["test"]["loss"] != plain["test"]["loss"]  # the base really was quantized


@pytest.mark.parametrize("flag", [["--quantize", "8bit"], ["--quantize", "int8"]])
def test_quantize_8bit_kinds_train_peft_lora_too(setup, flag):
    metrics = _run(setup, f"lora-{flag[1]}", "--method", "lora", *flag)
    assert metrics["config"]["quantize"] == flag[1] and metrics["steps"] == 3


def test_scale_by_density_reaches_the_adapter_config(setup):
    _run(setup, "sbd", "--method", "capaboost-lora", "--scale-by-density")
    root = setup[0]
    assert json.loads((root / "sbd" / "adapter" / "adapter_config.json").read_text())["scale_by_density"] is True


@pytest.mark.parametrize("extra, flag", [
    (["--method", "padapter", "--quantize", "4bit"], "--quantize"),
    (["--method", "lora", "--scale-by-density"], "--scale-by-density"),
    (["--method", "capaboost-lora", "--quantize", "2bit"], "quantize"),
])  # fmt: skip
def test_flags_outside_their_methods_are_refused(setup, capsys, extra, flag):
    root, model_dir, data = setup
    args = ["train", "--task", "causal-lm", "--model", str(model_dir), "--data-dir", str(data),
            "--output-dir", str(root / "refused"), *extra]  # fmt: skip
    with pytest.raises(SystemExit) if "2bit" in extra else contextlib.nullcontext():  # argparse's choices exit
        assert main(args) == 2
    assert flag in capsys.readouterr().err
    assert not (root / "refused").exists()
