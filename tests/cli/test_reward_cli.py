"""`alignkit reward` and `alignkit score` end to end on the tiny model; bad input is one line,
exit 2, and leaves no output behind."""

from __future__ import annotations

import json

import pytest
import yaml

from alignkit.cli.main import main
from alignkit.config.schema import ModelConfig
from alignkit.models.heads import load_reward_model
from alignkit.stages import reward as stage
from tests.stages.test_reward import pair_records, ranked_records, write_jsonl

TRAIN_FLAGS = ["--model", "tiny", "--batch-size", "8", "--lr", "3e-3", "--template", "plain",
               "--max-length", "64", "--precision", "fp32", "--set", "train.progress=false",
               "--set", "train.warmup_steps=0", "--set", "train.num_threads=1",
               "--set", "train.schedule=constant", "--set", "data.eval_fraction=0.25"]


def run_cli(capsys, args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip()


def test_train_then_score(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records())
    rm = tmp_path / "rm"
    main(["reward", "--data", str(data), "--output", str(rm), "--max-steps", "15", *TRAIN_FLAGS])
    assert (rm / "DONE").is_file()

    records = [
        {"id": "a", "prompt": "Question 90: green light?", "response": "quiet river thank you"},
        {"id": "b", "prompt": "Question 90: green light?", "response": "quiet river stone over"},
        {"id": "c", "messages": [{"role": "user", "content": "Question 91?"},
                                 {"role": "assistant", "content": "music thank you"}]},
        {"id": "d", "prompt": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Question 92?"}],
         "response": "table paper cloud apple"},
    ]
    src, dst = write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out" / "scored.jsonl"
    main(["score", "--model", str(rm), "--data", str(src), "--output", str(dst),
          "--template", "plain", "--batch-size", "3", "--precision", "fp32"])
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "score"} for r in rows] == records
    assert list(dst.parent.iterdir()) == [dst]  # the temporary file was renamed, none left
    scores = {r["id"]: r["score"] for r in rows}
    assert scores["a"] > scores["b"] and scores["c"] > scores["d"]
    # The command scores exactly what the library function scores.
    model, tokenizer = load_reward_model(ModelConfig(name_or_path=str(rm)))
    items = [(p, r) for _, p, r in stage.read_score_records(str(src))]
    direct = stage.score(model, tokenizer, items, template="plain", max_length=512,
                         batch_size=1)
    assert [r["score"] for r in rows] == pytest.approx(direct, abs=1e-5)


def test_ranked_loss_flag_reaches_the_config(tmp_path):
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_records(8))
    out = tmp_path / "pl"
    main(["reward", "--data", str(data), "--output", str(out), "--max-steps", "1",
          "--ranked-loss", "plackett_luce", *TRAIN_FLAGS[:2], "--batch-size", "2",
          *TRAIN_FLAGS[4:]])
    assert yaml.safe_load((out / "config.yaml").read_text())["ranked_loss"] == "plackett_luce"
    assert (out / "DONE").is_file()


def test_score_bad_record_is_one_line_exit_2(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi?", "response": "Hello."},
                                              {"prompt": "Hi?", "answer": "Hello."}])
    dst = tmp_path / "out.jsonl"
    code, err = run_cli(capsys, ["score", "--model", "tiny", "--data", str(src),
                                 "--output", str(dst)])
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{src}:2: field 'response': missing" in err
    assert not dst.exists()


def test_score_refuses_a_model_without_a_reward_head(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
    code, err = run_cli(capsys, ["score", "--model", "tiny", "--data", str(src),
                                 "--output", str(tmp_path / "o.jsonl")])
    assert code == 2 and len(err.splitlines()) == 1 and "not a reward model" in err


def test_reward_without_data_is_one_line_exit_2(tmp_path, capsys):
    code, err = run_cli(capsys, ["reward", "--model", "tiny", "--output", str(tmp_path / "r")])
    assert code == 2 and len(err.splitlines()) == 1 and "--data" in err
