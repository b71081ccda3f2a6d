"""Sweeps: expansion, skipping finished runs, and the mean ± std report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capaboost.cli import main
from capaboost.train.errors import ConfigError
from capaboost.train.report.sweep import expand_sweep, markdown_table, run_sweep, summarize, write_report
import helpers


def test_expand_is_tasks_x_methods_x_grid_x_seeds():
    runs = expand_sweep({
        "output_dir": "sw", "base": {"epochs": 1},
        "tasks": [{"task": "cola", "data_dir": "c"}, {"task": "sst2", "data_dir": "s"}],
        "methods": ["capaboost-lora", {"method": "lora", "r": 16, "tag": "lora-r16"}],
        "grid": {"density": [0.3, 0.5]}, "seeds": [0, 1, 2],
    })
    assert len(runs) == 2 * 3 * 3  # the density grid does not apply to lora: it runs once, not twice
    tags = {r["tag"] for r in runs}
    assert tags == {"capaboost-lora-density0.3", "capaboost-lora-density0.5", "lora-r16"}
    one = next(r for r in runs if r["tag"] == "lora-r16" and r["seed"] == 2 and r["task"] == "sst2")
    assert one["output_dir"] == "sw/sst2/lora-r16/seed2"
    assert (one["r"], one["epochs"], one["data_dir"], one["method"]) == (16, 1, "s", "lora")


@pytest.mark.parametrize("spec, message", [
    ({"output_dir": "x", "base": {"task": "cola"}, "method": ["lora"]}, "unknown sweep keys"),
    ({"base": {"task": "cola"}}, "output_dir"),
    ({"output_dir": "x", "base": {"task": "cola", "learning_rate": 1}}, "unknown run option 'learning_rate'"),
    ({"output_dir": "x", "base": {"method": "lora"}}, "names no task"),
    ({"output_dir": "x", "base": {"task": "cola"}, "grid": {"r": 8}}, "non-empty list"),
    ({"output_dir": "x", "base": {"task": "cola", "overwrite": True}}, "remove overwrite/resume"),
])
def test_bad_sweep_files_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        expand_sweep(spec)


def _metrics(task, tag, seed, value, params, main_metric="accuracy"):
    return {"task": task, "method": tag, "tag": tag, "main_metric": main_metric, "test": {main_metric: value},
            "trainable_params": params, "config": {"seed": seed}, "rank": 16}


def test_report_gives_mean_and_sample_std_over_seeds(tmp_path):
    runs = [_metrics("sst2", "capaboost-lora", 0, 0.80, 1000), _metrics("sst2", "capaboost-lora", 1, 0.84, 1000),
            _metrics("sst2", "lora", 0, 0.70, 2000), _metrics("sst2", "lora", 1, 0.74, 2000),
            _metrics("cola", "lora", 0, 0.30, 2000, "matthews_correlation")]
    for i, m in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(m))
    summary = summarize(runs)
    mean, std = summary[("sst2", "capaboost-lora")]["metrics"]["accuracy"]
    assert mean == pytest.approx(82.0) and std == pytest.approx(2.8284271, rel=1e-6)  # sqrt(((80-82)^2*2)/1)
    table = markdown_table(summary)
    assert "| capaboost-lora | 1.0K | 16 | – | 82.0 ± 2.8 (n=2) | – |" in table
    assert "| lora | 2.0K | 16 | 30.0 ± 0.0 (n=1) | 72.0 ± 2.8 (n=2) | 51.0 |" in table
    text = write_report(tmp_path)
    assert table in text and (tmp_path / "report.md").read_text() == text
    assert (tmp_path / "report.png").stat().st_size > 1000


def _sweep_file(tmp_path, methods: str) -> Path:
    """A one-step sweep over ``methods`` x seeds 0, 1 on a tiny BERT and a 16-example SST-2."""
    bert = helpers.save_tiny_bert(tmp_path / "bert")
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=16, n_dev=8)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"output_dir: {tmp_path / 'sw'}\n"
        f"base: {{task: sst2, data_dir: {data}, model: {bert}, max_steps: 1, batch_size: 8, threads: 1,"
        f" progress: false, cache_dir: {tmp_path / 'cache'}}}\n"
        f"methods: [{methods}]\nseeds: [0, 1]\n"
    )
    return spec


def test_sweep_trains_then_skips_finished_runs_and_reports(tmp_path, capsys):
    spec = _sweep_file(tmp_path, "capaboost-lora, bitfit")
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("pending") == 4
    assert main(["sweep", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "| capaboost-lora |" in out and "| bitfit |" in out and "(n=2)" in out
    files = sorted((tmp_path / "sw").rglob("metrics.json"))
    assert len(files) == 4
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("done") == 4
    assert main(["sweep", str(spec)]) == 0  # nothing left to train
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert main(["report", str(tmp_path / "sw")]) == 0
    assert (tmp_path / "sw" / "report.png").is_file()
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_jobs_trains_runs_in_parallel_processes_in_order(tmp_path, capsys):
    spec = _sweep_file(tmp_path, "capaboost-lora")
    runs = run_sweep(spec, jobs=2)
    assert [r["status"] for r in runs] == ["trained", "trained"]
    assert [Path(r["output_dir"]).name for r in runs] == ["seed0", "seed1"]  # the sweep's order, not finishing order
    out = capsys.readouterr().out
    assert "[1/2] trained" in out and "[2/2] trained" in out  # one progress line per finished run
    assert [r["status"] for r in run_sweep(spec, jobs=2)] == ["done", "done"]
    with pytest.raises(ConfigError, match="--jobs"):
        run_sweep(spec, jobs=0)
