"""DDP on 2 CPU processes (gloo) vs 1 process; checkpoints across world sizes; mask agreement; batch errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddp_worker
from capaboost import checkpoint, parameter_counts
from capaboost.distributed import (
    atomic_save,
    load_checkpoint,
    masks_fingerprint,
    per_rank_batch_size,
    save_checkpoint,
    shard_batch,
    verify_masks_identical,
)

ROOT = Path(__file__).resolve().parents[1]



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(log: Path, *args: str, timeout: int = 240, succeed: bool = True, env: dict | None = None) -> None:
    """Run a 2-process torchrun with its output in ``log`` (ranks watchdog themselves: ddp_worker.WATCHDOG_S).

    ``succeed=False`` expects the launch to fail (it must still end before ``timeout``: no rank may hang).
    """
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed: the multi-process tests need it (it ships with torch)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s:\n{log.read_text()[-4000:]}")
    if succeed:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log.read_text()[-5000:]}"
    else:
        assert proc.returncode != 0, f"{' '.join(cmd)} was expected to fail:\n{log.read_text()[-5000:]}"


def _assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_two_ranks_match_one_process_and_resume_across_world_sizes(tmp_path):
    start = time.time()
    one = ddp_worker.train(tmp_path / "ckpt_w1")  # 1 process, same global batch; checkpoint at CKPT_STEP
    _torchrun(tmp_path / "torchrun.log", "tests/ddp_worker.py", str(tmp_path), str(tmp_path / "ckpt_w1"))
    resumed_in_one = ddp_worker.train(resume=tmp_path / "ckpt_w2")  # 2-rank checkpoint, resumed by 1 process
    two = torch.load(tmp_path / "weights_w2.pt")
    print(f"DDP equivalence + resume test took {time.time() - start:.1f}s")

    initial = {n: p.detach() for n, p in ddp_worker.build_model().named_parameters() if p.requires_grad}
    assert any(not torch.allclose(initial[n], one[n]) for n in one), "training did not move the weights"
    _assert_same(two["final"], one)  # 2 ranks x 2 examples == 1 process x 4 examples
    _assert_same(two["resumed"], one)  # 1-process checkpoint resumed on 2 ranks
    _assert_same(resumed_in_one, one)  # 2-rank checkpoint resumed in 1 process
    # one format with the runner's checkpoint: a folder of parts, progress.json and their checksums
    assert json.loads((tmp_path / "ckpt_w2" / "progress.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "ckpt_w2").iterdir()) == [
        "extra.pt", "optimizer.pt", "progress.json", "sha256.json", "trainable.pt"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary checkpoint files left over"

    # DDP syncs only tensors of the model: the packed values and the frozen base, never masks.
    structure = json.loads((tmp_path / "structure.json").read_text())
    assert structure["world_size"] == 2
    base = {n for n, _ in ddp_worker.tiny_bert().named_parameters()}
    for name in structure["parameters"]:
        core = name.replace("base_model.model.", "").replace(".base_layer", "")
        core = core.replace(".original_module", "").replace(".modules_to_save.default", "")
        assert ".cblora_" in name or core in base, f"DDP would sync {name}, which is neither packed nor base"
    assert not any("mask" in n for n in structure["parameters"] + structure["buffers"])
    trainable = structure["trainable"]
    assert all(".cblora_" in n or "modules_to_save" in n for n in trainable)
    model = ddp_worker.build_model()
    packed = sum(p.numel() for n, p in model.named_parameters() if ".cblora_" in n)
    assert packed == parameter_counts(model)["union"] < parameter_counts(model)["dense"]
    # DDP's reducer all-reduces the trainable values only (packed union + classifier head), in float32
    assert structure["reduced_tensors"] == len(trainable)
    assert structure["reduced_bytes"] == 4 * sum(trainable.values())

    # causal-LM evaluation sharded over 2 ranks == 1 process (sums all-reduced, uneven shards)
    single = ddp_worker.causal_lm_metrics()
    assert single.keys() == structure["causal_lm_metrics"].keys() == {"loss", "perplexity", "exact_match"}
    for key, value in single.items():
        assert structure["causal_lm_metrics"][key] == pytest.approx(value, rel=1e-6), key

    # a rank with other masks is refused on every rank, naming the ranks
    for rank in (0, 1):
        message = (tmp_path / f"mismatch_rank{rank}.txt").read_text()
        assert "masks differ across ranks" in message and "ranks [0]" in message and "ranks [1]" in message


def test_fsdp_on_cpu_gloo_matches_ddp(tmp_path):
    """FSDP2 (fully_shard) and FSDP1 (use_orig_params) shard the packed values and train like DDP."""
    _torchrun(tmp_path / "fsdp.log", "tests/ddp_fsdp.py", str(tmp_path / "fsdp.json"))
    report = json.loads((tmp_path / "fsdp.json").read_text())
    for wrap in ("fsdp2", "fsdp1"):
        assert report[wrap]["ok"], report[wrap]
        assert report[wrap]["max_abs_diff"] < 1e-6
    held, total = report["fsdp2"]["sharding"]
    assert 0 < held < total  # each rank holds only its shard of the packed values


def test_verify_masks_is_a_noop_without_process_group():
    model = ddp_worker.build_model()
    assert verify_masks_identical(model) == masks_fingerprint(model)
    assert masks_fingerprint(model) == masks_fingerprint(ddp_worker.build_model())
    assert masks_fingerprint(model) != masks_fingerprint(ddp_worker.build_model(mask_seed=1))


def test_masks_are_neither_parameters_nor_buffers():
    model = ddp_worker.build_model()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(t.dtype != torch.bool for t in tensors.values())
    masks = [f.masks for m in model.modules() for pair in getattr(m, "capaboost_pairs", {}).values()
             for f in (pair.A, pair.B)]
    assert masks and not any(any(m is t for t in tensors.values()) for m in masks)
    assert not any("mask" in k for k in model.state_dict())


def test_per_rank_batch_size_and_errors():
    assert per_rank_batch_size(32, 2) == 16
    assert per_rank_batch_size(32, 2, grad_accum_steps=4) == 4
    assert per_rank_batch_size(8) == 8  # no process group: world size 1
    with pytest.raises(ValueError, match=r"global batch size 10 is not divisible by world size 3 .*e\.g\. 9 or 12"):
        per_rank_batch_size(10, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        per_rank_batch_size(6, 2, grad_accum_steps=2)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        per_rank_batch_size(8, 0)


def test_shard_batch_slices_contiguously():
    batch = {"x": torch.arange(6), "y": torch.arange(6) * 10, "meta": "kept"}
    part = shard_batch(batch, rank=1, world_size=3)
    assert part["x"].tolist() == [2, 3] and part["y"].tolist() == [20, 30] and part["meta"] == "kept"
    assert torch.equal(torch.cat([shard_batch(batch, r, 2)["x"] for r in range(2)]), batch["x"])
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch(batch, rank=0, world_size=4)
    with pytest.raises(ValueError, match="disagree on the batch dimension"):
        shard_batch({"x": torch.zeros(4), "y": torch.zeros(2)}, 0, 2)


def test_atomic_save_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "ckpt"
    atomic_save(lambda p: (p.mkdir(), (p / "a.txt").write_text("1")), target)
    atomic_save(lambda p: (p.mkdir(), (p / "b.txt").write_text("2")), target)  # replaces a directory
    assert sorted(x.name for x in target.iterdir()) == ["b.txt"]

    def broken(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(broken, tmp_path / "file.pt")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]  # no partial file, no temporary


def test_load_checkpoint_refuses_other_masks_and_other_files(tmp_path):
    model = ddp_worker.build_model()
    save_checkpoint(tmp_path / "c", model, step=2)
    assert load_checkpoint(tmp_path / "c", ddp_worker.build_model())["step"] == 2
    with pytest.raises(ValueError, match="was trained with masks"):
        load_checkpoint(tmp_path / "c", ddp_worker.build_model(mask_seed=3))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is a file, not a capaboost training checkpoint folder"):
        load_checkpoint(tmp_path / "other.pt", model)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing", model)
    runner_style = tmp_path / "runner"  # a checkpoint folder without this module's progress keys
    checkpoint.save_checkpoint(runner_style, lambda: {"trainable": {}}, {"global_step": 1})
    with pytest.raises(ValueError, match="not a capaboost training checkpoint"):
        load_checkpoint(runner_style, model)


def test_checkpoint_folder_survives_a_crash_mid_replace_and_refuses_a_torn_part(tmp_path):
    model = ddp_worker.build_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    save_checkpoint(tmp_path / "c", model, opt, step=3)
    (tmp_path / "c").rename(tmp_path / "c.old")  # what a crash between the two renames leaves
    assert load_checkpoint(tmp_path / "c", ddp_worker.build_model(), opt)["step"] == 3
    (tmp_path / "c.old" / "trainable.pt").write_bytes(b"torn")
    with pytest.raises(ValueError, match="trainable.pt"):
        load_checkpoint(tmp_path / "c", ddp_worker.build_model())
