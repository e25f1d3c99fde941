"""`alignkit demo --quick`: the built-in pipeline end to end on the tiny model — every stage
finished, the report with each stage's section and the side-by-side answers, a rerun that
redoes nothing; and the shipped pipeline file is the one in configs/."""

import json
from pathlib import Path

from alignkit.cli.demo import DEMO_PIPELINE
from alignkit.cli.main import main
from alignkit.data.prompts import LAB_PROMPTS
from alignkit.pipeline.plan import load_plan

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("sft", "reward", "dpo", "ppo", "cai", "cai_sft", "eval_dpo", "eval_ppo", "eval_cai",
          "compare", "report")


def test_configs_demo_is_the_shipped_pipeline():
    assert (ROOT / "configs" / "demo.yaml").read_text() == DEMO_PIPELINE.read_text()
    plan = load_plan(DEMO_PIPELINE)
    assert [s.name for s in plan.stages] == list(STAGES)
    assert plan.stage("sft").config.model.name_or_path is None  # the embedded model
    assert plan.stage("sft").config.data.template == "inst"
    assert plan.stage("ppo").config.reward_model == str(plan.output / "reward")
    assert list(plan.stage("compare").inputs["models"]) == ["base", "sft", "dpo", "ppo", "cai"]


def test_quick_demo_end_to_end_and_rerun_skips_finished_work(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--output", str(out)])
    printed = capsys.readouterr().out
    report = out / "report" / "report.html"
    assert f"report: {report}" in printed and "How do I pick a lock?" in printed
    assert all((out / name / "DONE").is_file() for name in STAGES)
    timings = [json.loads(x) for x in (out / "timings.jsonl").read_text().splitlines()]
    assert [t["stage"] for t in timings] == list(STAGES)

    html = report.read_text()
    for name, kind in [("sft", "sft"), ("reward", "reward"), ("dpo", "dpo"), ("ppo", "ppo"),
                       ("cai", "cai"), ("cai_sft", "sft"), ("eval_dpo", "eval"),
                       ("eval_ppo", "eval"), ("eval_cai", "eval"), ("compare", "compare")]:
        assert f"{name} — {kind}" in html
    assert "reward–KL frontier" in html and "Refusal rate, harmful prompts" in html
    compare = json.loads((out / "compare" / "compare.json").read_text())
    assert compare["models"] == ["base", "sft", "dpo", "ppo", "cai"]
    assert compare["prompts"] == list(LAB_PROMPTS)
    for prompt in LAB_PROMPTS:  # the side-by-side tables are in the report
        assert f"Prompt {LAB_PROMPTS.index(prompt) + 1}: {prompt}" in html
    assert html.count("data:image/png;base64") >= 5  # curves of the training stages, PPO's points

    before = (out / "compare" / "compare.json").read_text()
    main(["demo", "--quick", "--output", str(out)])
    again = capsys.readouterr().out
    assert again.count("already done, skipped") == len(STAGES)
    assert (out / "compare" / "compare.json").read_text() == before
