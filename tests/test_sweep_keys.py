"""Sweep run folders follow the options: distinct settings never share a folder, stale results are never reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capaboost.cli import main
from capaboost.train.errors import ConfigError
from capaboost.train.run_config import make_config
from capaboost.train.report.sweep import expand_sweep, run_sweep


def test_entries_that_differ_only_in_an_option_get_their_own_folders():
    runs = expand_sweep({"output_dir": "sw", "base": {"task": "sst2", "data_dir": "d"},
                         "methods": ["lora", {"method": "lora", "r": 16},
                                     {"method": "lora", "target_modules": ["query", "key"]}]})
    dirs = [r["output_dir"] for r in runs]
    assert dirs == ["sw/sst2/lora/seed0", "sw/sst2/lora-r16/seed0", "sw/sst2/lora-target_modulesquery+key/seed0"]


def test_two_different_runs_in_one_folder_are_refused_and_duplicates_run_once():
    with pytest.raises(ConfigError, match=r"share 'sw/sst2/x/seed0' but differ in \['r'\]"):
        expand_sweep({"output_dir": "sw", "base": {"task": "sst2"},
                      "methods": [{"method": "lora", "tag": "x"}, {"method": "lora", "r": 16, "tag": "x"}]})
    assert len(expand_sweep({"output_dir": "sw", "base": {"task": "sst2"}, "methods": ["lora", "lora"]})) == 1


def test_shared_options_go_only_to_runs_that_read_them():
    runs = expand_sweep({"output_dir": "sw", "base": {"task": "sst2", "d": 3, "lr": "1e-3"},
                         "methods": ["capaboost-lora", "lora"], "grid": {"density": [0.3, 0.5]}})
    assert sorted(r["tag"] for r in runs) == ["capaboost-lora-density0.3", "capaboost-lora-density0.5", "lora"]
    plain = next(r for r in runs if r["tag"] == "lora")
    assert "d" not in plain and "density" not in plain
    with pytest.raises(ConfigError, match="--d does nothing for method 'lora'"):  # said explicitly: an error
        expand_sweep({"output_dir": "sw", "base": {"task": "sst2"}, "methods": [{"method": "lora", "d": 3}]})


def _spec(tmp_path: Path, epochs: int) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"output_dir: {tmp_path / 'sw'}\nbase: {{task: sst2, data_dir: {tmp_path / 'data'}, "
                    f"model: {tmp_path / 'model'}, epochs: {epochs}}}\nmethods: [lora]\n")
    return spec


def _finish(options: dict) -> Path:
    """A finished run of ``options`` as the runner leaves it (metrics.json with the resolved config)."""
    out = Path(options["output_dir"])
    out.mkdir(parents=True)
    config = make_config({**options, "resume": True}).resolved().to_dict()
    metrics = {"task": "sst2", "method": "lora", "tag": options["tag"], "main_metric": "accuracy",
               "test": {"accuracy": 0.75}, "trainable_params": 10, "config": config, "rank": 8}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


def test_an_edited_base_never_reuses_or_reports_the_old_result(tmp_path, capsys):
    spec = _spec(tmp_path, epochs=1)
    from capaboost.train.run_config import read_config_file

    out = _finish(expand_sweep(read_config_file(spec))[0])
    assert [r["status"] for r in run_sweep(spec, dry_run=True)] == ["done"]
    assert main(["sweep", str(spec)]) == 0 and "75.0" in capsys.readouterr().out  # up to date: reported

    spec = _spec(tmp_path, epochs=2)  # the user edits base:
    runs = run_sweep(spec, dry_run=True)
    assert [r["status"] for r in runs] == ["stale"] and "epochs: 1 there, 2 now" in runs[0]["error"]
    before = (out / "metrics.json").read_text()
    assert main(["sweep", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 1 there, 2 now" in printed and "75.0" not in printed  # not reported as the new config's
    assert (out / "metrics.json").read_text() == before  # and not deleted either


def test_a_changed_default_makes_a_run_stale_only_where_its_method_reads_the_option(tmp_path):
    """scale_by_density became True by default. A lora run recorded with the old False never read it: still done.
    A capaboost-lora run recorded before the option existed (no key) ran with the paper's scaling: it matches an
    explicit False and is stale for the new default."""
    from capaboost.train.report.sweep import stale_options
    from capaboost.train.run_config import read_config_file

    spec = _spec(tmp_path, epochs=1)
    out = _finish(expand_sweep(read_config_file(spec))[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["scale_by_density"] is True
    metrics["config"]["scale_by_density"] = False
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert [r["status"] for r in run_sweep(spec, dry_run=True)] == ["done"]

    options = {"task": "sst2", "data_dir": str(tmp_path / "data"), "model": str(tmp_path / "model"),
               "method": "capaboost-lora", "output_dir": str(tmp_path / "cb"), "tag": "cb"}
    cb = _finish(options)
    metrics = json.loads((cb / "metrics.json").read_text())
    del metrics["config"]["scale_by_density"]
    (cb / "metrics.json").write_text(json.dumps(metrics))
    assert stale_options(cb, options) == {"scale_by_density": (False, True)}
    assert stale_options(cb, {**options, "scale_by_density": False}) == {}


def test_the_report_groups_seeds_across_a_changed_default_the_method_never_reads(tmp_path):
    from capaboost.train.report.sweep import options_key

    (tmp_path / "d").mkdir()
    lora = make_config({"task": "sst2", "method": "lora", "data_dir": str(tmp_path / "d")}).resolved().to_dict()
    assert options_key({**lora, "scale_by_density": False}) == options_key({**lora, "scale_by_density": True})
    cb = make_config({"task": "sst2", "method": "capaboost-lora", "data_dir": str(tmp_path / "d")}).resolved().to_dict()
    legacy = {k: v for k, v in cb.items() if k != "scale_by_density"}  # recorded before the option existed
    assert options_key(legacy) == options_key({**cb, "scale_by_density": False}) != options_key(cb)
