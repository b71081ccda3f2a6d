"""``capaboost`` CLI end to end on a tiny BERT: config files, help, errors, rank and export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capaboost.cli import build_parser, main
import helpers

COMMANDS = ["demo", "train", "sweep", "report", "rank", "export"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"bert": helpers.save_tiny_bert(root / "bert"), "cache": str(root / "cache"), "root": root}


def cli(env, tmp_path, *args, capsys=None):
    base = ["--model", env["bert"], "--threads", "1", "--no-progress", "--cache-dir", env["cache"], "--batch-size", "8"]
    return main(["train", *args, *base])


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_everywhere(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main(([command] if command else []) + ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: capaboost" in text
    if command == "train":
        for flag in ("--task", "--method", "--data-dir", "--model", "--d", "--density", "--r", "--bottleneck",
                     "--seed", "--epochs", "--max-steps", "--lr", "--batch-size", "--max-seq-len",
                     "--max-train-samples", "--max-eval-samples", "--protocol", "--output-dir", "--resume",
                     "--threads", "--config"):
            assert flag in text, flag


def test_console_script_entry_point_runs():
    script = Path(sys.executable).with_name("capaboost")  # installed from pyproject's [project.scripts]
    if not script.exists():
        pytest.skip("the capaboost console script is not installed in this environment")
    result = subprocess.run([str(script), "rank", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: capaboost rank" in result.stdout


def test_train_from_yaml_with_flags_overriding_it(env, tmp_path, capsys):
    data = helpers.write_glue("cola", tmp_path / "cola")
    config = tmp_path / "run.yaml"
    config.write_text(f"task: cola\nmethod: capaboost-lora\ndata-dir: {data}\nepochs: 3\nr: 4\nd: 3\ndensity: 0.4\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    assert cli(env, tmp_path, "--config", str(config), "--max-steps", "2") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert printed["test"] == metrics["test"] and set(metrics["test"]) == {"matthews_correlation"}
    assert metrics["steps"] == 2  # the flag beat the file's epochs
    assert (metrics["config"]["r"], metrics["config"]["d"], metrics["config"]["density"]) == (4, 3, 0.4)
    assert set(metrics["delta_ranks"].values()) == {12}  # d * r
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_train_from_toml(env, tmp_path):
    data = helpers.write_text(tmp_path / "reviews.jsonl", n=30)
    config = tmp_path / "run.toml"
    config.write_text(f'task = "text"\nmethod = "lora"\ndata_dir = "{data}"\nmax_steps = 1\ntext_column = "review"\n'
                      f'label_column = "sentiment"\noutput_dir = "{tmp_path / "out"}"\n')
    assert cli(env, tmp_path, "--config", str(config)) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["text_column"] == "review"


def _error(env, tmp_path, capsys, *args):
    code = cli(env, tmp_path, *args, "--output-dir", str(tmp_path / "out"), "--max-steps", "1")
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ")
    return err


def test_bad_glue_row_names_file_line_and_column(env, tmp_path, capsys):
    data = Path(helpers.write_glue("sst2", tmp_path / "sst2"))
    lines = (data / "train.tsv").read_text().splitlines()
    lines[4] = lines[4].split("\t")[0] + "\tmaybe"
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    err = _error(env, tmp_path, capsys, "--task", "sst2", "--method", "lora", "--data-dir", str(data))
    assert "train.tsv" in err and "line 5" in err and "'label'" in err and "'maybe'" in err


def test_missing_dev_file_is_named(env, tmp_path, capsys):
    data = Path(helpers.write_glue("rte", tmp_path / "rte"))
    (data / "dev.tsv").unlink()
    err = _error(env, tmp_path, capsys, "--task", "rte", "--method", "lora", "--data-dir", str(data))
    assert "dev.tsv" in err and "missing" in err


def test_text_file_missing_column_and_bad_label(env, tmp_path, capsys):
    data = helpers.write_text(tmp_path / "reviews.csv", n=20)
    err = _error(env, tmp_path, capsys, "--task", "text", "--method", "lora", "--data-dir", data,
                 "--text-column", "body", "--label-column", "sentiment")
    assert "reviews.csv" in err and "'body'" in err and "columns found" in err
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "x", "label": null}\n')
    err = _error(env, tmp_path, capsys, "--task", "text", "--method", "lora", "--data-dir", str(jsonl))
    assert "r.jsonl" in err and "line 3" in err and "'label'" in err


def test_malformed_squad_and_npz_are_named(env, tmp_path, capsys):
    squad = Path(helpers.write_squad(tmp_path / "sq"))
    doc = json.loads((squad / "train-v1.1.json").read_text())
    del doc["data"][0]["paragraphs"][1]["qas"][0]["question"]
    (squad / "train-v1.1.json").write_text(json.dumps(doc))
    err = _error(env, tmp_path, capsys, "--task", "squad", "--method", "lora", "--data-dir", str(squad))
    assert "train-v1.1.json" in err and "paragraphs[1].qas[0]" in err and "'question'" in err
    npz = tmp_path / "img.npz"
    import numpy as np

    np.savez(npz, x_train=np.zeros((4, 8, 8, 3), np.uint8))
    err = _error(env, tmp_path, capsys, "--task", "image", "--method", "lora", "--data-dir", str(npz))
    assert "img.npz" in err and "y_train" in err


def test_bad_options_exit_2_with_the_fix(env, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("task: cola\nlearning_rate: 0.1\n")
    assert cli(env, tmp_path, "--config", str(config)) == 2
    assert "unknown run option 'learning_rate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--method", "boft"])
    assert "invalid choice: 'boft'" in capsys.readouterr().err
    assert main(["rank", str(tmp_path)]) == 2
    assert "not a capaboost checkpoint" in capsys.readouterr().err


def test_rank_and_export_to_a_plain_lora_with_identical_outputs(env, tmp_path, capsys):
    import peft

    from capaboost.train.models import build_base_model
    from capaboost.train.trained import load_trained

    data = helpers.write_glue("sst2", tmp_path / "sst2")
    out = tmp_path / "run"
    assert cli(env, tmp_path, "--task", "sst2", "--method", "capaboost-lora", "--data-dir", data, "--r", "4",
               "--max-steps", "3", "--lr", "0.01", "--output-dir", str(out)) == 0
    capsys.readouterr()
    assert main(["rank", str(out), "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)
    assert set(ranks["ranks"].values()) == {8} and len(ranks["ranks"]) == 4
    assert 0.6 < ranks["parameter_counts"]["ratio"] < 0.9

    assert main(["export", str(out), "--to", "lora", "--out", str(tmp_path / "lora")]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    x = torch.tensor([[2, 5, 9, 17, 3]])
    capaboost_model, _ = load_trained(out)
    plain = peft.PeftModel.from_pretrained(build_base_model("seq_cls", env["bert"], 2), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, capaboost_model(input_ids=x).logits)
    assert main(["export", str(tmp_path / "lora"), "--to", "lora"]) == 2  # not a capaboost run folder
