"""``capaboost train`` under torchrun: global batch, resume across world sizes, rank-0 atomic saves, aliases.

Also a torchrun entry point: ``torchrun ... tests/test_runner_distributed.py train ...`` runs the CLI
with a disk failure injected into the main process's ``FAIL_SAVE_ENV``-th checkpoint write.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from capaboost.cli import build_parser, main
from capaboost.train.run_folder import checkpoint
from capaboost.train.run_config import make_config
from capaboost.train.run import FAIL_ENV
import helpers

FAIL_SAVE_ENV = "TEST_FAIL_CHECKPOINT_WRITE"  # fail the N-th checkpoint write, while writing optimizer.pt


def inject_save_failure(n: int, patch=setattr) -> None:
    """Make the n-th checkpoint write die half-way (trainable.pt written, optimizer.pt not)."""
    real, writes = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        name = Path(str(f)).name
        writes[0] += name == "trainable.pt"
        if name == "optimizer.pt" and writes[0] == n:
            raise OSError(f"injected: disk full while writing checkpoint {n}")
        return real(obj, f, *args, **kwargs)

    patch(torch, "save", save)


if __name__ == "__main__":  # torchrun entry point (see the module docstring)
    if os.environ.get(FAIL_SAVE_ENV):
        inject_save_failure(int(os.environ[FAIL_SAVE_ENV]))
    sys.exit(main(sys.argv[1:]))


from test_distributed import _torchrun  # noqa: E402  (not needed by the entry point above)



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny BERT with dropout off (dropout draws per process, so it alone would differ across world sizes)."""
    root = tmp_path_factory.mktemp("rd")
    bert = Path(helpers.save_tiny_bert(root / "bert"))
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    # 20 examples / global batch 8: 3 steps an epoch, the last one topped up with 4 repeated examples
    data = helpers.write_glue("sst2", root / "sst2", n_train=20, n_dev=12)
    return root, str(bert), data


def _args(setup, out: Path, *extra: str) -> list[str]:
    root, bert, data = setup
    # --lora-r/--num-copies: torchrun would reject --r/--d as ambiguous abbreviations of its own options
    return ["train", "--task", "sst2", "--method", "capaboost-lora", "--model", bert, "--data-dir", data,
            "--output-dir", str(out), "--lora-r", "4", "--num-copies", "2", "--batch-size", "8", "--epochs", "2",
            "--save-steps", "2", "--lr", "5e-3", "--threads", "1", "--no-progress", "--cache-dir",
            str(root / f"cache-{out.name}"), *extra]


@pytest.fixture(scope="module")
def whole(setup):
    """The uninterrupted reference run, 1 process."""
    out = setup[0] / "whole"
    assert main(_args(setup, out)) == 0
    return out


def _adapter_and_logits(out: Path, data: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The saved adapter tensors and the saved model's logits on the dev set."""
    from safetensors.torch import load_file

    from capaboost.train.run_config import RunConfig
    from capaboost.train.tasks import TASKS
    from capaboost.train.trained import load_trained

    model, _ = load_trained(out)
    cfg = RunConfig(task="sst2", data_dir=data, model=json.loads((out / "metrics.json").read_text())["config"]["model"],
                    cache_dir=str(out / "cache")).resolved()
    task = TASKS["sst2"](cfg)
    task.load()
    with torch.no_grad():
        batch = {k: v for k, v in task.collate(task.eval_splits["test"]).items() if k != "labels"}
        logits = model.eval()(**batch).logits
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), logits


def _assert_same_run(out: Path, ref: Path, data: str, atol: float) -> dict:
    """Same metrics, losses (relative 10 x atol), adapter tensors and dev-set logits (atol) as ``ref``."""
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert a["steps"] == b["steps"] == 6 and a["global_batch_size"] == b["global_batch_size"] == 8
    assert a["test"] == b["test"] and a["validation"] == b["validation"]  # accuracy: no prediction flipped
    assert [x["step"] for x in a["train_loss"]] == [x["step"] for x in b["train_loss"]]
    close = dict(rel=10 * atol, abs=10 * atol)
    assert [x["loss"] for x in a["train_loss"]] == pytest.approx([y["loss"] for y in b["train_loss"]], **close)
    (wa, la), (wb, lb) = _adapter_and_logits(out, data), _adapter_and_logits(ref, data)
    assert wa.keys() == wb.keys() and any(".cblora_B" in k for k in wa)
    assert all(float(wb[k].abs().max()) > 1e-3 for k in wb if ".cblora_B" in k)  # trained away from B = 0
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    logit_diff = float((la - lb).abs().max())
    print(f"{out.name}: max |adapter diff| {diff:.1e}, max |logit diff| {logit_diff:.1e}")
    assert diff <= atol and logit_diff <= atol, f"adapter tensors differ by {diff}, logits by {logit_diff}"
    return a


def _no_temporaries(out: Path) -> None:
    left = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".old")]
    assert not left, f"temporary files left in {out}: {left}"


def test_resume_across_world_sizes_through_the_cli(setup, whole, monkeypatch):
    """2 -> 1 and 1 -> 2 processes, resumed mid-epoch, end where the uninterrupted 1-process run ends.

    Tolerance, 1e-6 on adapter tensors (values ~0.2) and dev-set logits, 1e-5 relative on the logged
    losses, exact on the accuracies (no prediction may flip): the 2-process
    gradient is DDP's average of two 4-example means, the 1-process one a single 8-example mean, so
    float32 sums run in another order and differ in the last bits; AdamW can magnify that for
    near-zero gradients. Measured (docs/distributed.md): tensors within 2e-8, i.e. ~1 ulp, so the
    bound has a 50x margin, while a different data order or global batch moves them by ~1e-3.
    """
    start = time.time()
    root = setup[0]
    # 2 processes; the main process dies writing the 2nd checkpoint (step 3): both ranks must stop (no hang)
    two_one = root / "two_then_one"
    _torchrun(root / "two_then_one.log", "tests/test_runner_distributed.py", *_args(setup, two_one),
              succeed=False, env={FAIL_SAVE_ENV: "2"}, timeout=120)
    log = (root / "two_then_one.log").read_text()
    assert "injected: disk full while writing checkpoint 2" in log
    assert "the main process failed to write checkpoint" in log  # rank 1's error: it did not wait for ever
    saved = checkpoint.load_checkpoint(two_one)
    assert saved["progress"]["global_step"] == 2 and saved["progress"]["world_size"] == 2  # the previous one
    assert not (two_one / "metrics.json").exists()
    _no_temporaries(two_one)
    assert main(_args(setup, two_one, "--resume")) == 0  # 1 process continues mid-epoch 1
    m = _assert_same_run(two_one, whole, setup[2], atol=1e-6)
    assert m["world_size"] == 1 and m["per_device_batch_size"] == 8

    # 1 process, interrupted after step 5 (last checkpoint: step 4, mid-epoch 2); 2 processes finish it
    one_two = root / "one_then_two"
    monkeypatch.setenv(FAIL_ENV, "5")
    from capaboost.train.run import SimulatedInterruption

    with pytest.raises(SimulatedInterruption):
        main(_args(setup, one_two))
    monkeypatch.delenv(FAIL_ENV)
    assert checkpoint.load_checkpoint(one_two)["progress"]["global_step"] == 4
    _torchrun(root / "one_then_two.log", "-m", "capaboost.cli", *_args(setup, one_two, "--resume"), timeout=120)
    m = _assert_same_run(one_two, whole, setup[2], atol=1e-6)
    assert m["world_size"] == 2 and m["per_device_batch_size"] == 4 and m["global_batch_size"] == 8
    _no_temporaries(one_two)
    # only the main process logs to train.log: one start-up line per launch (2 into this folder)
    assert (one_two / "train.log").read_text().count(" run {") == 2
    print(f"resume across world sizes took {time.time() - start:.1f}s")


def test_crash_mid_save_keeps_the_previous_checkpoint_and_resume_completes(setup, whole, monkeypatch):
    out = setup[0] / "crash"
    inject_save_failure(3, monkeypatch.setattr)  # saves at steps 2, 3, 4, 6: dies writing step 4's
    with pytest.raises(OSError, match="injected: disk full"):
        main(_args(setup, out))
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(out)["progress"]["global_step"] == 3
    _no_temporaries(out)

    # a crash between the two renames (old copy moved aside, new one not yet in place)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".checkpoint."):
            raise OSError("injected: crash between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    for _ in range(2):  # the 2nd time from checkpoint.old itself: it must survive until a new copy is in place
        with pytest.raises(OSError, match="between the renames"):
            main(_args(setup, out, "--resume"))  # resumes at 3, dies saving step 4
        assert not (out / "checkpoint").exists() and (out / "checkpoint.old").is_dir()
        assert checkpoint.load_checkpoint(out)["progress"]["global_step"] == 3  # falls back to checkpoint.old
    monkeypatch.undo()
    assert main(_args(setup, out, "--resume")) == 0
    _assert_same_run(out, whole, setup[2], atol=0.0)  # one process throughout: bit for bit
    _no_temporaries(out)


def test_batch_not_divisible_by_world_size_is_a_clear_error(setup, monkeypatch, capsys):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 3))
    assert main(_args(setup, setup[0] / "bad")) == 2
    err = capsys.readouterr().err
    assert "--batch-size is the global batch" in err and "not divisible by world size 3" in err
    assert "e.g. 6 or 9" in err


def test_long_aliases_of_r_and_d_parse_here_and_under_torchrun():
    from torch.distributed.run import get_args_parser

    parser = build_parser()
    for argv, r, d in ((["--r", "8", "--d", "3"], 8, 3), (["--lora-r", "8", "--num-copies", "3"], 8, 3),
                       (["--rank", "16"], 16, None)):
        args = parser.parse_args(["train", *argv])
        assert args.r == r and getattr(args, "d", None) == d
    assert make_config({"lora-r": 4, "num_copies": 3}).r == 4  # config files take the long names too
    assert make_config({"lora-r": 4, "num_copies": 3}).d == 3

    # every flag of `capaboost train` passes through torchrun's own parser, except the legacy --r/--d
    torchrun = get_args_parser()
    flags = sorted({f for a in parser._subparsers._group_actions[0].choices["train"]._actions
                    for f in a.option_strings if f.startswith("--") and f != "--help"})
    assert {"--lora-r", "--rank", "--num-copies", "--r", "--d"} <= set(flags)
    rejected = []
    for flag in flags:
        try:
            ns = torchrun.parse_args(["--nproc_per_node", "2", "-m", "capaboost.cli", "train", flag, "1"])
            assert ns.training_script_args == ["train", flag, "1"]
        except SystemExit:
            rejected.append(flag)
    assert rejected == ["--d", "--r"]
