import json
import subprocess
import sys

import pytest

from conftest import tiny_model
from mlsae.cli import COMMANDS, main
from mlsae.config import CacheConfig, field_docs


def test_every_field_has_a_one_line_docstring():
    import dataclasses

    for cls, _, _ in COMMANDS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in docs and "\n" not in docs[f.name], f"{cls.__name__}.{f.name} lacks a one-line docstring"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "mlsae.cli", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--model" in out.stdout or "run" in out.stdout


def test_cache_command_on_a_local_model_saves_config(tmp_path, capsys):
    model = tiny_model("gpt2", n_layers=2)
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("some text to cache " * 40)
    code = main(["cache", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--ctx", "32",
                 "--tokens", "100", "--out", str(tmp_path / "c"), "--device", "cpu"])
    assert code == 0
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["tokens"] == 100 and saved["ctx"] == 32 and set(saved) == {f for f in CacheConfig.__dataclass_fields__}
    assert "wrote 100 tokens x 2 layers" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path, capsys):
    code = main(["cache", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "missing.gguf does not exist" in err


def test_train_eval_compare_analyze_report_from_the_command_line(tmp_path, capsys):
    import pyarrow.parquet as pq

    model = tiny_model("gpt2", n_layers=2)
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("the command line trains, evaluates and compares two runs. " * 60)
    common = ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--ctx", "32", "--tokens", "256",
              "--tokens-per-step", "64", "--micro-batch-tokens", "64", "--expansion-factor", "2", "-k", "4",
              "--lr", "0.003", "--device", "cpu"]
    assert main(["train", *common, "--arch", "mlsae", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "--arch", "per-layer", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 2  # refuses to overwrite a run
    assert "already holds a run" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--data", str(tmp_path / "t.txt"),
                 "--tokens", "100", "--downstream-tokens", "30", "--device", "cpu", "--out", str(tmp_path / "e")]) == 0
    table = pq.read_table(tmp_path / "e" / "compare.parquet")
    assert table.column_names[:3] == ["layer", "fvu[a]", "fvu[b]"] and table.num_rows == 3
    assert (tmp_path / "e" / "a" / "eval.parquet").is_file() and (tmp_path / "e" / "b" / "eval.parquet").is_file()
    assert main(["analyze", str(tmp_path / "a"), "--data", str(tmp_path / "t.txt"), "--tokens", "100", "--device", "cpu"]) == 0
    assert "variance ratio" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "report" / "index.html").is_file()
