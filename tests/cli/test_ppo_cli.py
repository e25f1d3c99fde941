"""`alignkit ppo` end to end on the tiny model (flags and a config file); a bad reward is one line,
exit 2."""

from __future__ import annotations

import json

import pytest
import yaml

from alignkit.cli.main import main

FLAGS = ["--model", "tiny", "--rollout-prompts", "4", "--max-new-tokens", "8",
         "--batch-size", "4", "--ppo-epochs", "1", "--precision", "fp32", "--device", "cpu",
         "--set", "train.progress=false", "--set", "train.num_threads=1"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n"
                            for w in ("cats", "tea", "rain", "bread")))
    return path


def run_cli(capsys, args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_cli_runs(algo, prompts, tmp_path):
    out = tmp_path / algo
    extra = ["--group-size", "2", "--rollout-prompts", "2"] if algo == "grpo" else []
    main(["ppo", "--data", str(prompts), "--output", str(out), "--algo", algo,
          "--reward-fn", "alignkit.assets.rewards:positive_words", "--max-steps", "2",
          *FLAGS, *extra])
    assert (out / "DONE").is_file() and (out / "model.safetensors").is_file()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["algo"] == algo and cfg["rollout"]["max_new_tokens"] == 8
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "samples.jsonl").read_text().strip()


def test_config_file_and_flag_override(prompts, tmp_path):
    conf = tmp_path / "ppo.yaml"
    conf.write_text(yaml.safe_dump({"algo": "rloo", "kl_coef": 0.3, "rollout": {"group_size": 2},
                                    "reward_fn": "alignkit.assets.rewards:brevity"}))
    out = tmp_path / "run"
    main(["ppo", "--config", str(conf), "--data", str(prompts), "--output", str(out),
          "--kl-coef", "0.1", "--max-steps", "2", *FLAGS])
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["algo"] == "rloo" and cfg["kl_coef"] == 0.1 and cfg["rollout"]["group_size"] == 2


@pytest.mark.parametrize("args, message", [
    (["--reward-fn", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    (["--reward-fn", "alignkit.assets.rewards:nope"], "has no 'nope'"),
    (["--reward-fn", "justaname"], "must look like module:function"),
    ([], "ppo needs a reward"),
])
def test_bad_reward_is_one_line(args, message, prompts, tmp_path, capsys):
    code, err = run_cli(capsys, ["ppo", "--data", str(prompts), "--output",
                                 str(tmp_path / "run"), *args, *FLAGS])
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
