"""Every bad input: one line on stderr naming file, line and field; exit 2; no traceback;
nothing left behind that looks like a finished run."""

import json
import subprocess

import pytest

from alignkit.cli.main import main
from tests.conftest import PYTHON, ROOT, cli_env

GOOD = json.dumps({"instruction": "Say hi.", "response": "Hi!"})


def run_cli(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def sft_args(data, out, *extra):
    return ["sft", "--model", "tiny", "--data", str(data), "--output", str(out),
            "--max-steps", "1", "--batch-size", "1", *extra]


CASES = {
    "malformed_json": (GOOD + "\n" + '{"instruction": "x", "response": \n', "malformed JSON", ":2"),
    "missing_field": (GOOD + "\n" + json.dumps({"instruction": "x"}) + "\n", ":2", "response"),
    "empty_field": (GOOD + "\n" + GOOD + "\n" + json.dumps({"instruction": "x", "response": "  "}) + "\n",
                    ":3", "response"),
    "wrong_type": (GOOD + "\n" + json.dumps({"instruction": "x", "response": 5}) + "\n", ":2",
                   "response"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_data_gives_one_line(tmp_path, capsys, name):
    text, *expected = CASES[name]
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    # empty fields are a counted skip by default (real data sets have a few); strict mode errors
    code, err = run_cli(capsys, sft_args(data, tmp_path / "out", "--set", "data.on_empty=error"))
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert str(data) in err
    for piece in expected:
        assert piece in err
    assert not (tmp_path / "out" / "DONE").exists()


def test_non_utf8_file(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD.encode() + b"\n" + b'{"instruction": "caf\xe9", "response": "x"}\n')
    code, err = run_cli(capsys, sft_args(data, tmp_path / "out"))
    assert code == 2 and str(data) in err and ":2" in err and "UTF-8" in err and "\n" not in err


def test_unknown_config_key_and_wrong_type(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rate: 0.1\n")
    code, err = run_cli(capsys, ["sft", "--config", str(cfg)])
    assert code == 2 and err == f"error: {cfg}: unknown key 'train.learning_rate'"
    cfg.write_text("train:\n  batch_size: lots\n")
    code, err = run_cli(capsys, ["sft", "--config", str(cfg)])
    assert code == 2 and "train.batch_size" in err and "\n" not in err


def test_missing_model_path(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(GOOD + "\n")
    code, err = run_cli(capsys, ["sft", "--model", str(tmp_path / "no-such-model"), "--data",
                                 str(data), "--output", str(tmp_path / "o")])
    assert code == 2 and "no-such-model" in err and "not found" in err and "\n" not in err


def test_missing_data_file(tmp_path, capsys):
    code, err = run_cli(capsys, sft_args(tmp_path / "absent.jsonl", tmp_path / "o"))
    assert code == 2 and "absent.jsonl" in err and "\n" not in err


def test_help_documents_every_option():
    out = subprocess.run([PYTHON, "-m", "alignkit.cli.main", "sft", "--help"], env=cli_env()
                         | {"COLUMNS": "200"}, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for flag in ["--config", "--model", "--data", "--output", "--max-steps", "--epochs",
                 "--batch-size", "--lr", "--seed", "--lora", "--no-lora", "--template", "--set"]:
        assert flag in out.stdout


def test_empty_field_is_a_counted_skip_by_default(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [json.dumps({"instruction": f"Say {i}.", "response": str(i)}) for i in range(4)]
    rows.insert(2, json.dumps({"instruction": "x", "response": ""}))
    data.write_text("\n".join(rows) + "\n")
    main(sft_args(data, tmp_path / "out", "--set", "data.eval_fraction=0",
                  "--set", "train.progress=false"))
    out = capsys.readouterr().out
    assert f"skipped 1 records with an empty field" in out and f"{data}:3" in out
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["train"]["kept"] == 4 and len(report["skipped_empty"]) == 1
