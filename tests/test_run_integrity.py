"""Run folders and their files: export targets, the run lock, resume identity, damaged files, stale temporaries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capaboost.cli import main
from capaboost.train.run import FAIL_ENV, SimulatedInterruption
import helpers

T = ["--max-train-samples", "64", "--max-eval-samples", "64", "--max-steps", "8", "--batch-size", "8",
     "--max-seq-len", "32"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    env = {"bert": helpers.save_tiny_bert(root / "bert"), "cache": str(root / "cache"), "root": root,
           "data": helpers.write_glue("sst2", root / "sst2")}
    assert train(env, root / "finished", "--save-steps", "4") == 0
    os.environ[FAIL_ENV] = "5"  # dies after step 5; the checkpoint is from step 4
    try:
        with pytest.raises(SimulatedInterruption):
            train(env, root / "cut", "--save-steps", "4")
    finally:
        del os.environ[FAIL_ENV]
    return env


def train(env, out, *extra, data=None):
    return main(["train", "--task", "sst2", "--method", "capaboost-lora", "--data-dir", str(data or env["data"]),
                 "--model", env["bert"], "--cache-dir", env["cache"], "--threads", "1", "--no-progress",
                 "--output-dir", str(out), *T, *extra])


def copy_run(env, name, tmp_path) -> Path:
    return Path(shutil.copytree(env["root"] / name, tmp_path / name))


def error_line(capsys) -> str:
    """The one ``error:`` line the CLI printed (warnings from libraries may precede it), never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def run_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ---------- export targets


def test_export_never_replaces_the_run_and_refuses_non_empty_targets(env, tmp_path, capsys):
    run = copy_run(env, "finished", tmp_path)
    before = run_files(run)
    for out in (run, run / "adapter", run / "checkpoint", tmp_path, run / "adapter" / "x"):
        assert main(["export", str(run), "--to", "lora", "--out", str(out), "--overwrite"]) == 2, out
        assert "is or holds the run being exported" in error_line(capsys)
    assert main(["export", str(run / "adapter"), "--to", "lora", "--out", str(run)]) == 2
    error_line(capsys)
    assert run_files(run) == before  # metrics, checkpoint, adapter and log all still there, unchanged

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--to", "lora", "--out", str(mine)]) == 2
    line = error_line(capsys)
    assert "not empty" in line and "--overwrite" in line
    assert main(["export", str(run), "--to", "lora", "--out", str(mine), "--overwrite"]) == 2  # not an export
    assert "no adapter_config.json" in error_line(capsys)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert main(["export", str(run), "--to", "lora", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in error_line(capsys)

    assert main(["export", str(run), "--to", "lora"]) == 0  # the default, run/adapter-lora
    assert (run / "adapter-lora" / "adapter_config.json").is_file()
    assert main(["export", str(run), "--to", "lora"]) == 2
    assert "not empty" in error_line(capsys)
    assert main(["export", str(run), "--to", "lora", "--overwrite"]) == 0
    assert json.loads((run / "adapter-lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


# ---------- the run lock


HOLDER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.write(fd, b'%d\\n' % os.getpid())\n"
    "print('locked', flush=True)\n"
    "time.sleep(300)\n"
)


def test_a_second_run_on_a_locked_folder_fails_at_once_and_a_dead_holder_does_not_block(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".capaboost.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(env, out) == 2
        line = error_line(capsys)
        assert str(out) in line and f"pid {holder.pid}" in line and "another --output-dir" in line
        assert not (out / "metrics.json").exists() and not (out / "train.log").exists()
    finally:
        holder.kill()  # dies holding the lock: the kernel releases it, the file stays behind
        holder.wait()
    assert (out / ".capaboost.lock").exists()
    assert train(env, out) == 0
    assert (out / "metrics.json").is_file() and not (out / ".capaboost.lock").exists()


def test_the_run_holds_its_folder_lock_while_it_trains(env, tmp_path, monkeypatch):
    from capaboost.train.run import loop
    from capaboost.train.run_folder.lock import RunLockedError, folder_lock

    probed = []
    train_loop = loop.train_loop

    def probing(self):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            with folder_lock(self.out):
                pass
        probed.append(self.out)
        train_loop(self)

    monkeypatch.setattr(loop, "train_loop", probing)
    assert train(env, tmp_path / "out") == 0
    assert probed == [tmp_path / "out"]


# ---------- resume identity


def test_resume_of_a_finished_run_with_other_options_is_refused(env, tmp_path, capsys):
    run = copy_run(env, "finished", tmp_path)
    before = run_files(run)
    assert main(["train", "--task", "sst2", "--method", "lora", "--data-dir", env["data"], "--model", env["bert"],
                 "--cache-dir", env["cache"], "--no-progress", "--output-dir", str(run), *T, "--resume"]) == 2
    line = error_line(capsys)
    assert "'method'" in line and "capaboost-lora" in line and "--overwrite" in line and "another --output-dir" in line
    assert train(env, run, "--resume", "--d", "3") == 2
    assert "'d'" in error_line(capsys)
    assert run_files(run) == before
    assert train(env, run, "--resume") == 0  # the same options: the finished run's metrics


def test_resume_and_overwrite_together_are_refused(env, tmp_path, capsys):
    run = copy_run(env, "finished", tmp_path)
    assert train(env, run, "--resume", "--overwrite") == 2
    assert "--resume" in error_line(capsys)
    assert (run / "metrics.json").is_file() and (run / "adapter").is_dir()


def test_resume_notices_changed_data_files_but_not_a_touched_copy(env, tmp_path, capsys):
    data = Path(helpers.write_glue("sst2", tmp_path / "sst2"))
    os.environ[FAIL_ENV] = "5"
    try:
        with pytest.raises(SimulatedInterruption):
            train(env, tmp_path / "cut", "--save-steps", "4", data=data)
    finally:
        del os.environ[FAIL_ENV]
    train_tsv = data / "train.tsv"
    original = train_tsv.read_bytes()
    lines = train_tsv.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # same size, other content
    train_tsv.write_text("\n".join(lines) + "\n")
    assert train(env, tmp_path / "cut", "--save-steps", "4", "--resume", data=data) == 2
    line = error_line(capsys)
    assert "train.tsv (changed)" in line and "--overwrite" in line
    train_tsv.write_bytes(original)  # restored, with a new mtime: the bytes decide
    assert train(env, tmp_path / "cut", "--save-steps", "4", "--resume", data=data) == 0
    (data / "dev.tsv").write_text((data / "dev.tsv").read_text() + "extra\t1\n")
    assert train(env, tmp_path / "cut", "--save-steps", "4", "--resume", data=data) == 2  # finished, now checked
    assert "dev.tsv (changed)" in error_line(capsys)


# ---------- damaged files


def _truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, says", [
    ("trainable.pt", _truncate, "trainable.pt is"),
    ("optimizer.pt", _flip_last_byte, "optimizer.pt is damaged"),
    ("scheduler.pt", Path.unlink, "scheduler.pt is missing"),
    ("progress.json", _truncate, "progress.json cannot be read"),
])
def test_a_damaged_checkpoint_is_named_on_resume(env, tmp_path, capsys, name, damage, says):
    run = copy_run(env, "cut", tmp_path)
    damage(run / "checkpoint" / name)
    assert train(env, run, "--save-steps", "4", "--resume") == 2
    line = error_line(capsys)
    assert says in line and str(run / "checkpoint") in line and "--overwrite" in line


@pytest.mark.parametrize("name, damage, says", [
    ("adapter_model.safetensors", _truncate, "is truncated or corrupt"),
    ("adapter_model.safetensors", _flip_last_byte, "is damaged"),
    ("adapter_model.safetensors", Path.unlink, "is missing"),
    ("adapter_config.json", _truncate, "cannot be read"),
    ("capaboost_run.json", _truncate, "cannot be read"),
])
@pytest.mark.parametrize("command", ["rank", "export"])
def test_a_damaged_adapter_is_named_by_rank_and_export(env, tmp_path, capsys, name, damage, says, command):
    run = copy_run(env, "finished", tmp_path)
    if damage is _truncate and name == "adapter_model.safetensors":  # an adapter saved before the checksums
        info = json.loads((run / "adapter" / "capaboost_run.json").read_text())
        info.pop("sha256", None)
        (run / "adapter" / "capaboost_run.json").write_text(json.dumps(info))
    damage(run / "adapter" / name)
    args = ["--to", "lora", "--out", str(tmp_path / "lora")] if command == "export" else []
    assert main([command, str(run), *args]) == 2
    line = error_line(capsys)
    assert f"{run / 'adapter' / name} {says}" in line and "--overwrite" in line
    assert not (tmp_path / "lora").exists()


def test_a_corrupt_metrics_json_is_named_on_resume(env, tmp_path, capsys):
    run = copy_run(env, "finished", tmp_path)
    _truncate(run / "metrics.json")
    assert train(env, run, "--resume") == 2
    assert f"{run / 'metrics.json'} cannot be read" in error_line(capsys)


def test_an_output_dir_that_is_a_file_is_named(env, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert train(env, out) == 2
        line = error_line(capsys)
        assert "--output-dir" in line and str(tmp_path / "file") in line
    assert (tmp_path / "file").read_text() == "mine"


# ---------- the mask fingerprint


def test_an_adapter_config_without_mask_fingerprint_is_refused(tmp_path, capsys):
    import capaboost
    from peft import PeftModel, get_peft_model

    def base():
        return helpers.tiny_bert(vocab_size=50, num_hidden_layers=1, num_attention_heads=2)

    for d, mode in ((1, "diff"), (2, "same")):  # the union's size does not betray an edited seed here
        cfg = capaboost.CapaBoostLoraConfig(r=4, target_modules=["query", "value"], num_copies=d, mask_density=0.5,
                                            mask_mode=mode, mask_seed=0, task_type="SEQ_CLS")
        folder = tmp_path / f"d{d}-{mode}"
        get_peft_model(base(), cfg).save_pretrained(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        del config["mask_fingerprint"]
        config["mask_seed"] = 7
        (folder / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="adapter_config.json .*no mask_fingerprint"):
            PeftModel.from_pretrained(base(), str(folder))


def test_rank_names_the_config_that_lost_its_fingerprint(env, tmp_path, capsys):
    run = copy_run(env, "finished", tmp_path)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    del config["mask_fingerprint"]
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert main(["rank", str(run)]) == 2
    line = error_line(capsys)
    assert str(run / "adapter" / "adapter_config.json") in line and "mask_fingerprint" in line


# ---------- stale temporaries


def test_a_killed_runs_temporaries_are_removed_on_the_next_start(env, tmp_path):
    run = copy_run(env, "cut", tmp_path)
    stale = [run / ".adapter.k1l2.tmp", run / ".checkpoint.x9y8.tmp"]
    for folder in stale:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    (run / ".metrics.json.ab12.tmp").write_text("{")
    (run / ".notes.tmp").write_text("not ours")
    assert train(env, run, "--save-steps", "4", "--resume") == 0
    assert not any(p.exists() for p in (*stale, run / ".metrics.json.ab12.tmp"))
    assert (run / ".notes.tmp").read_text() == "not ours"
    assert sorted(p.name for p in run.iterdir()) == [".notes.tmp", "adapter", "checkpoint", "metrics.json", "run.json",
                                                     "train.log"]
