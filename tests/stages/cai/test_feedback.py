"""RLAIF: option-token probabilities from a model with known logits, order averaging that
cancels position bias, averaging over principles, soft labels the preference loader reads,
resumption, endpoint judges against alignkit's own server (log-probs and the text fallback),
and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.stages.cai import feedback as fb
from alignkit.stages.cai.backends import ChoiceJudge, make_judge
from alignkit.stages.cai.constitution import Constitution, Principle
from alignkit.cli.main import main
from alignkit.data import load_preferences
from alignkit.engine.device import Runtime
from alignkit.errors import InputError
from alignkit.eval.compare import LocalJudge
from alignkit.eval.tax import PromptItem
from alignkit.models.endpoint import Endpoint
from alignkit.models.serve import ServeLimits, make_server
from alignkit.models.tiny import tiny_model, tiny_tokenizer
from tests.stages.cai import FakeGenerator, ScriptedLM, sigmoid

CPU = Runtime(torch.device("cpu"), None)

KIND = Principle("kind", "c", "r", "Choose the kinder response.")
TRUE = Principle("true", "c", "r", "Choose the more truthful response.")
RULES = Constitution("test", (KIND, TRUE))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _judge(tok, rule) -> ChoiceJudge:
    return ChoiceJudge(LocalJudge(ScriptedLM(tok, rule), tok, "scripted", batch_size=4,
                                  runtime=CPU))


def _good_rule(text: str) -> float:
    """h = +2 when (A) is the GOOD answer, −2 when (B) is, under the kindness question only;
    the truthfulness question leaves the judge indifferent (h = 0)."""
    if "kinder" not in text:
        return 0.0
    return 2.0 if "(A) GOOD" in text else -2.0 if "(B) GOOD" in text else 0.0


def test_order_averaging_is_exact():
    assert fb.order_averaged(0.8, 0.8) == 0.5 and fb.order_averaged(0.3, 0.3) == 0.5
    assert fb.order_averaged(0.9, 0.2) == pytest.approx(0.85, abs=1e-15)
    assert fb.as_pair(("x", "y"), 0.25) == {"chosen": "y", "rejected": "x", "label": 0.75}
    assert fb.as_pair(("x", "y"), 0.5)["chosen"] == "x"


def test_choice_question_is_exact():
    assert fb.choice_question("Hi?", "one", "two", KIND) == (
        "Consider this request to an AI assistant and two possible responses.\n\n"
        "Request:\nHi?\n\n(A) one\n\n(B) two\n\nChoose the kinder response. Answer with A or B.")


def test_option_probabilities_from_known_logits_and_the_mean_over_principles(tok):
    judge = _judge(tok, _good_rule)
    verdict = fb.judge_pair(judge, "Hi?", ("GOOD answer", "BAD answer"), [KIND, TRUE])
    kind, true = verdict["judgements"]
    # kindness: P(A) = sigmoid(2) with GOOD first and sigmoid(−2) swapped:
    # P(y0 better) = ½ + ½ (sigmoid(2) − sigmoid(−2)) = sigmoid(2)
    assert kind["p_a_first"] == pytest.approx(sigmoid(2.0), abs=1e-6)
    assert kind["p_a_swapped"] == pytest.approx(sigmoid(-2.0), abs=1e-6)
    assert kind["p_first_better"] == pytest.approx(sigmoid(2.0), abs=1e-6)
    assert true["p_a_first"] == pytest.approx(0.5, abs=1e-7)  # logits equal: indifferent
    assert verdict["p_first_better"] == pytest.approx((sigmoid(2.0) + 0.5) / 2, abs=1e-6)
    assert verdict["judge"] == {"name": "scripted", "kind": "local",
                                "probabilities": "token log-probs",
                                "decided_by": {"logprobs": 4}}
    pair = fb.as_pair(("GOOD answer", "BAD answer"), verdict["p_first_better"])
    assert pair["chosen"] == "GOOD answer" and 0.5 < pair["label"] < 1


def test_a_judge_that_always_prefers_a_gives_exactly_one_half(tok):
    judge = _judge(tok, lambda text: 3.0)  # position bias: P(A) = sigmoid(3) in both orders
    verdict = fb.judge_pair(judge, "Hi?", ("GOOD answer", "BAD answer"), [KIND, TRUE])
    assert verdict["judgements"][0]["p_a_first"] == pytest.approx(sigmoid(3.0), abs=1e-6)
    assert verdict["p_first_better"] == 0.5  # exactly
    assert fb.as_pair(("GOOD answer", "BAD answer"), verdict["p_first_better"])["label"] == 0.5


# ------------------------------------------------------------------ runs


def _items(n: int) -> list[PromptItem]:
    return [PromptItem(f"p{i}", f"Prompt number {i}?", "test") for i in range(n)]


def _sorted_rule(text: str) -> float:
    """Prefers the answer that sorts first, whichever position it is in (h = ±2)."""
    a = text.split("(A) ", 1)[1].split("\n\n", 1)[0]
    b = text.split("(B) ", 1)[1].split("\n\n", 1)[0]
    return 2.0 if a < b else -2.0


def _run(tmp_path, tok, gen, name: str, n: int = 5, **kw) -> dict:
    settings = fb.FeedbackSettings(principles=2, seed=1, batch_size=2)
    return fb.run_feedback(gen, _judge(tok, _sorted_rule), _items(n), RULES, tmp_path / name,
                           settings=settings, **kw)


def test_run_writes_soft_labels_that_the_preference_loader_reads(tmp_path, tok):
    summary = _run(tmp_path, tok, FakeGenerator(), "out", n=3)
    pairs, report = load_preferences(summary["outputs"]["preferences"])
    assert report.kept == 3 == summary["preference_pairs"]
    for pair in pairs:
        assert pair.label == pytest.approx(sigmoid(2.0), abs=1e-6)
        assert pair.chosen < pair.rejected
    record = json.loads((tmp_path / "out" / "feedback.jsonl").read_text().splitlines()[0])
    assert len(record["answers"]) == 2 and len(record["judgements"]) == 2
    assert {j["principle"] for j in record["judgements"]} == {"kind", "true"}
    assert summary["probabilities"] == {"token log-probs": 3}


def test_identical_answers_are_not_judged_and_left_out(tmp_path, tok):
    class Same(FakeGenerator):
        def generate(self, prompts, *, seed):
            return super().generate(prompts, seed=0)

    summary = _run(tmp_path, tok, Same(), "out", n=2)
    assert summary["preference_pairs"] == 0 and summary["left_out"]["identical"] == 2
    record = json.loads((tmp_path / "out" / "feedback.jsonl").read_text().splitlines()[0])
    assert record["skipped"] == "identical answers" and "judgements" not in record


def test_interrupted_feedback_resumes_to_the_same_output(tmp_path, tok):
    _run(tmp_path, tok, FakeGenerator(), "whole")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tok, FakeGenerator(fail_after=3), "cut")  # chunk 0 done, then cut
    rerun = FakeGenerator()
    assert _run(tmp_path, tok, rerun, "cut")["generated"] == 3
    assert len(rerun.calls) == 4  # two answers for each of the two chunks left
    for name in ("feedback.jsonl", "preferences.jsonl"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_sampling_must_be_on(tmp_path, tok):
    with pytest.raises(InputError, match="temperature above 0"):
        _run(tmp_path, tok, FakeGenerator(), "out", sampling={"temperature": 0.0})


# ------------------------------------------------------------------ endpoint judges


def test_endpoint_judge_uses_served_log_probs_and_matches_the_local_judge(tok):
    model = ScriptedLM(tok, lambda text: 1.0)  # logit A = ½, B = −½, others −10
    questions = [fb.choice_question("Hi?", "one", "two", KIND)]
    local = _judge(tok, lambda text: 1.0).ask(questions)[0][0]
    with make_server(model, tok, port=0, model_name="scripted", runtime=CPU) as server:
        judge = make_judge("scripted", Endpoint(server.url, "scripted", retries=0))
        probs, how = judge.ask(questions)
    assert probs[0] == pytest.approx(sigmoid(1.0), abs=1e-6)
    assert probs[0] == pytest.approx(local, abs=1e-6)
    assert how["probabilities"] == "token log-probs" and how["replies_without_logprobs"] == 0
    assert how["decided_by"] == {"logprobs": 1, "text": 0, "undecided": 0}


def test_endpoint_without_log_probs_is_flagged_as_text_fallback(tok):
    model = ScriptedLM(tok, lambda text: 1.0)
    logs: list[str] = []
    limits = ServeLimits(max_top_logprobs=0)  # this server refuses top_logprobs (HTTP 400)
    with make_server(model, tok, port=0, model_name="m", runtime=CPU, limits=limits) as server:
        judge = make_judge("m", Endpoint(server.url, "m", retries=0), log=logs.append)
        verdict = fb.judge_pair(judge, "Hi?", ("one", "two"), [KIND])
    assert verdict["judge"]["probabilities"] == "text fallback"
    assert verdict["judge"]["replies_without_logprobs"] == 2
    assert verdict["p_first_better"] == 0.5
    assert len(logs) == 1 and "returned no log-probs" in logs[0]


# ------------------------------------------------------------------ CLI


def _prompts(tmp_path, n: int = 3):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n"
                            for i in range(n)))
    return path


def test_cli_feedback_end_to_end_on_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    main(["cai", "feedback", "--model", "tiny", "--prompts", str(_prompts(tmp_path)),
          "--principles", "2", "--max-new-tokens", "6", "--batch-size", "2",
          "--precision", "fp32", "--output", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 3 and summary["probabilities"] == {"token log-probs": 3}
    assert summary["settings"]["judge"] == "tiny (local)"
    pairs, report = load_preferences(summary["outputs"]["preferences"])
    assert report.kept == summary["preference_pairs"] == 3
    assert all(0.5 <= p.label <= 1.0 for p in pairs)
    records = [json.loads(x) for x in (out / "feedback.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == [p.label for p in pairs]


def test_cli_feedback_over_http_against_alignkit_serve(tmp_path, capsys):
    with make_server(tiny_model(seed=0), tiny_tokenizer(), port=0, model_name="tiny",
                     runtime=CPU) as server:
        main(["cai", "feedback", "--model", f"{server.url}#tiny", "--principles", "1",
              "--prompts", str(_prompts(tmp_path, 2)), "--max-new-tokens", "4",
              "--output", str(tmp_path / "run"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 2 and summary["settings"]["generator"] == f"{server.url}#tiny"
    records = [json.loads(x) for x in (tmp_path / "run" / "feedback.jsonl").read_text()
               .splitlines()]
    for r in records:
        assert r["judge"]["kind"] == "endpoint" and r["judge"]["replies_without_logprobs"] == 0
        assert r["judge"]["probabilities"] in ("token log-probs", "text fallback")


def test_cli_feedback_needs_sampling(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cai", "feedback", "--model", "tiny", "--temperature", "0", "-o",
              str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "temperature" in err and "\n" not in err
