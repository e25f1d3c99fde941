"""`alignkit compare`: metrics with known answers, win rates with known scores and judges
(both orders cancel position bias), rendering/escaping, and the CLI end to end on tiny models
and a stub OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from alignkit.cli.main import main
from alignkit.engine.device import Runtime
from alignkit.eval import compare as cmp
from alignkit.models.endpoint import Endpoint
from alignkit.models.tiny import tiny_model, tiny_tokenizer
from tests.models.test_endpoint import StubServer, completion

CPU = Runtime(torch.device("cpu"), None)

REFUSAL = "I can't help with that request."
LISTED = "1. Preheat the oven.\n2. Mix the flour."
HEDGED = "It depends on your goals; however, diversification generally helps."
PLAIN = "Paris is the capital of France."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ------------------------------------------------------------------ metrics


def test_answer_metrics_on_hand_made_answers(tok):
    refusal, listed, hedged, plain = (cmp.answer_metrics(t, tok)
                                      for t in (REFUSAL, LISTED, HEDGED, PLAIN))
    # The tiny tokenizer is byte-level: one token per UTF-8 byte, no special tokens added.
    assert refusal["tokens"] == len(REFUSAL.encode()) and plain["words"] == 6
    assert plain["chars"] == len(PLAIN)
    assert refusal["refusal"] and refusal["refusal_markers"] == ["cannot_assist"]
    assert not refusal["structure"] and not refusal["nuance"]
    assert listed["structure"] and "numbered" in listed["structure_markers"]
    assert not listed["refusal"] and not listed["nuance"]
    assert hedged["nuance"] and set(hedged["nuance_markers"]) == {"depends", "contrast", "hedge"}
    assert not hedged["refusal"] and not hedged["structure"]
    assert not (plain["refusal"] or plain["structure"] or plain["nuance"])


def test_aggregates_are_rates_and_means(tok):
    answers = {"a": [REFUSAL, LISTED, HEDGED, PLAIN], "b": [PLAIN, PLAIN, LISTED, LISTED]}
    result = cmp.build_result(["p1", "p2", "p3", "p4"], answers, tokenizer=tok)
    a, b = result.aggregates["a"], result.aggregates["b"]
    assert (a["refusal_rate"], a["structure_rate"], a["nuance_rate"]) == (0.25, 0.25, 0.25)
    assert (b["refusal_rate"], b["structure_rate"], b["nuance_rate"]) == (0.0, 0.5, 0.0)
    assert a["mean_tokens"] == sum(len(t.encode()) for t in answers["a"]) / 4
    assert a["mean_rm_score"] is None and result.win_rates == {}


# ------------------------------------------------------------------ reward-model win rates


def test_reward_win_rates_known_matrix_with_ties(tok):
    scores = {"a": [1.0, 2.0, 3.0, 0.0], "b": [0.0, 2.0, 4.0, -1.0], "c": [5.0] * 4}
    answers = {n: ["x"] * 4 for n in scores}
    result = cmp.build_result(["p"] * 4, answers, tokenizer=tok, rm_scores=scores)
    table = result.win_rates["reward_model"]
    # a vs b per prompt: win, tie (½), loss, win → (1 + .5 + 0 + 1) / 4 = .625; c beats both.
    assert table["matrix"] == [[None, 0.625, 0.0], [0.375, None, 0.0], [1.0, 1.0, None]]
    assert table["mean"] == {"a": 0.3125, "b": 0.1875, "c": 1.0}
    m = table["matrix"]
    assert all(m[i][j] + m[j][i] == 1.0 for i in range(3) for j in range(3) if i != j)
    assert result.metrics["b"][3]["rm_score"] == -1.0
    assert result.aggregates["b"]["mean_rm_score"] == pytest.approx(1.25)


def test_equal_scores_everywhere_give_one_half(tok):
    result = cmp.build_result(["p", "q"], {"a": ["x", "y"], "b": ["z", "w"]}, tokenizer=tok,
                              rm_scores={"a": [0.3, -1.0], "b": [0.3, -1.0]})
    assert result.win_rates["reward_model"]["matrix"] == [[None, 0.5], [0.5, None]]


def test_reward_scores_match_the_reward_stage(tmp_path):
    from alignkit.models.heads import reward_model_from_lm, save_reward_model
    from alignkit.stages.reward import score
    torch.manual_seed(0)
    rm = reward_model_from_lm(tiny_model(seed=0))
    rm_tok = tiny_tokenizer()
    save_reward_model(rm, rm_tok, tmp_path / "rm")
    prompts = ["Say hi.", "Count to three."]
    answers = {"a": ["Hi!", "1 2 3"], "b": [REFUSAL, "one, two, three"]}
    got = cmp.reward_scores(str(tmp_path / "rm"), prompts, answers, runtime=CPU)
    from alignkit.models.heads import load_reward_model
    from alignkit.config.schema import ModelConfig
    model, tokenizer = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "rm")),
                                         require_head=True)
    with torch.no_grad():
        want = score(model, tokenizer, [([{"role": "user", "content": p}], a)
                                        for p, a in zip(prompts * 2, answers["a"] + answers["b"])],
                     template="auto", max_length=512, batch_size=8)
    assert got["a"] + got["b"] == pytest.approx(want, abs=1e-5)
    cmp.check_reward_model(str(tmp_path / "rm"))
    from alignkit.errors import InputError
    with pytest.raises(InputError, match="not a reward model"):
        cmp.check_reward_model("tiny")


# ------------------------------------------------------------------ judges


def _answers_of(question: str) -> tuple[str, str]:
    found = re.search(r"\n\(A\) (.*)\n\n\(B\) (.*)\n\n", question, re.S)
    return found.group(1), found.group(2)


def test_judge_question_holds_prompt_and_labelled_answers():
    q = cmp.judge_question("What?", "first", "second")
    assert "What?" in q and _answers_of(q) == ("first", "second")
    assert q.endswith(cmp.JUDGE_QUESTION)


def test_judge_probabilities_are_combined_over_both_orders():
    class Scripted:
        name = "scripted"

        def __init__(self, probs):
            self.probs, self.asked = probs, []

        def prob_a(self, questions):
            self.asked += questions
            return self.probs

        def info(self):
            return {}

    judge = Scripted([0.9, 0.3])  # i first: P(A)=.9; j first: P(A)=.3 → ½(.9 + .7) = .8
    outcomes, details = cmp.judge_outcomes(judge, ["p"], [["ans i"], ["ans j"]])
    assert outcomes == {(0, 1): [pytest.approx(0.8)]}
    assert [_answers_of(q) for q in judge.asked] == [("ans i", "ans j"), ("ans j", "ans i")]
    assert cmp.win_matrix(2, outcomes)[1][0] == pytest.approx(0.2)


def _judge_server(choose, *, logprobs: bool, reject_logprobs: bool = False) -> StubServer:
    """A stub endpoint judge; ``choose(answer_a, answer_b)`` → P(A)."""
    def reply(body, headers, n):
        if reject_logprobs and body.get("logprobs"):
            return 400, {"error": {"message": "logprobs are not supported"}}, 0.0
        p_a = choose(*_answers_of(body["messages"][-1]["content"]))
        if logprobs and body.get("logprobs"):
            tops = [{"A": math.log(p_a), "B": math.log(1 - p_a), "The": math.log(1e-3)}] \
                if 0 < p_a < 1 else [{"A" if p_a else "B": 0.0}]
            return 200, completion("A" if p_a >= 0.5 else "B", top_logprobs=tops), 0.0
        return 200, completion("(A) is better." if p_a >= 0.5 else "Response B."), 0.0
    return StubServer(reply)


ANSWERS = {"good": ["a good answer", "good again", "still good"],
           "bad": ["a poor answer", "meh", "nope"], "other": ["x", "y", "z"]}


@pytest.mark.parametrize("logprobs", [False, True])
def test_endpoint_judge_that_always_says_a_gives_exactly_one_half(tok, logprobs):
    with _judge_server(lambda a, b: 1.0, logprobs=logprobs) as stub:
        judge = cmp.EndpointJudge(Endpoint(stub.url, "judge"), "judge")
        result = cmp.build_result(["p1", "p2", "p3"], ANSWERS, tokenizer=tok, judge=judge)
    table = result.win_rates["judge"]
    assert table["matrix"] == [[None, 0.5, 0.5], [0.5, None, 0.5], [0.5, 0.5, None]]
    assert len(stub.requests) == 2 * 3 * 3  # pairs × prompts × both orders
    assert all(r[2]["logprobs"] is True and r[2]["top_logprobs"] == 5 for r in stub.requests)
    assert table["judge"] == "judge" and table["undecided"] == 0
    assert table["logprobs" if logprobs else "text"] == 18


def test_endpoint_judge_uses_logprobs_and_both_orders(tok):
    # P(A) = .8 when A is the "good" answer, .2 when B is: P(good beats bad) = ½(.8 + .8).
    with _judge_server(lambda a, b: 0.8 if "good" in a else 0.2 if "good" in b else 0.5,
                       logprobs=True) as stub:
        judge = cmp.EndpointJudge(Endpoint(stub.url, "j"), "j")
        result = cmp.build_result(["p1", "p2", "p3"], ANSWERS, tokenizer=tok, judge=judge)
    m = result.win_rates["judge"]["matrix"]
    assert m[0][1] == pytest.approx(0.8) and m[1][0] == pytest.approx(0.2)
    assert m[1][2] == pytest.approx(0.5) and m[0][2] == pytest.approx(0.8)
    assert all(m[i][j] + m[j][i] == pytest.approx(1.0, abs=1e-12)
               for i in range(3) for j in range(3) if i != j)


def test_endpoint_judge_falls_back_to_text_when_logprobs_are_rejected(tok):
    with _judge_server(lambda a, b: 1.0 if "good" in a else 0.0, logprobs=True,
                       reject_logprobs=True) as stub:
        judge = cmp.EndpointJudge(Endpoint(stub.url, "j"), "j")
        result = cmp.build_result(["p1", "p2", "p3"], {k: ANSWERS[k] for k in ("bad", "good")},
                                  tokenizer=tok, judge=judge)
    assert result.win_rates["judge"]["matrix"] == [[None, 0.0], [1.0, None]]
    assert result.win_rates["judge"]["text"] == 6
    assert len(stub.requests) == 1 + 6  # one rejected logprobs request, then text only


def test_letter_choice_reads_the_options():
    assert cmp.letter_choice("(B) is more helpful.") == "B"
    assert cmp.letter_choice("A") == "A" and cmp.letter_choice(" B.") == "B"
    assert cmp.letter_choice("I prefer Response B over it.") == "B"
    assert cmp.letter_choice("both are fine") is None


class _Verdict(torch.nn.Module):
    """A fake trunk: hidden state h = +1 where answer (A) contains "good", −1 where (B) does,
    ``bias`` otherwise, at every position (shape (R, T, 1))."""

    def __init__(self, tokenizer, bias: float = 0.0, always: float | None = None) -> None:
        super().__init__()
        self.tokenizer, self.bias, self.always = tokenizer, bias, always

    def forward(self, input_ids, attention_mask, use_cache=False):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = self.tokenizer.decode([i for i, m in zip(ids, mask) if m])
            a, b = _answers_of(text)
            h = self.always if self.always is not None else \
                1.0 if "good" in a else -1.0 if "good" in b else self.bias
            rows.append([[h]] * len(ids))
        from types import SimpleNamespace
        return SimpleNamespace(last_hidden_state=torch.tensor(rows))


class _OptionHead(torch.nn.Module):
    """logits = 0 except logit["A"] = 3h, logit["B"] = −3h: P(A) = sigmoid(6h)."""

    def __init__(self, vocab: int, a_id: int, b_id: int) -> None:
        super().__init__()
        self.vocab, self.a_id, self.b_id = vocab, a_id, b_id

    def forward(self, h):  # (R, 1) → (R, V)
        logits = torch.zeros(h.shape[0], self.vocab)
        logits[:, self.a_id] = 3 * h[:, 0]
        logits[:, self.b_id] = -3 * h[:, 0]
        return logits


class _FakeLM(torch.nn.Module):
    def __init__(self, tokenizer, **verdict) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the judge a device
        self.decoder = _Verdict(tokenizer, **verdict)
        ids = tokenizer.convert_tokens_to_ids
        self.head = _OptionHead(len(tokenizer), ids("A"), ids("B"))

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def test_local_judge_that_always_says_a_gives_one_half(tok):
    judge = cmp.LocalJudge(_FakeLM(tok, always=1.0), tok, "fake", batch_size=4, runtime=CPU)
    result = cmp.build_result(["p1", "p2", "p3"], ANSWERS, tokenizer=tok, judge=judge)
    m = result.win_rates["judge"]["matrix"]
    assert all(m[i][j] == pytest.approx(0.5, abs=1e-12)
               for i in range(3) for j in range(3) if i != j)
    # the judge really was biased: P(A) = sigmoid(6) in both orders
    assert result.win_rates["judge"]["details"][0]["p_a_i_first"] == pytest.approx(
        1 / (1 + math.exp(-6)), abs=1e-6)


def test_local_judge_with_controlled_logits_prefers_good_answers(tok):
    judge = cmp.LocalJudge(_FakeLM(tok), tok, "fake", batch_size=3, runtime=CPU)
    assert judge.option_ids == {"A": [tok.convert_tokens_to_ids("A")],
                                "B": [tok.convert_tokens_to_ids("B")]}  # " A" is two bytes
    result = cmp.build_result(["p1", "p2", "p3"], ANSWERS, tokenizer=tok, judge=judge)
    m = result.win_rates["judge"]["matrix"]
    s6 = 1 / (1 + math.exp(-6))  # ½(sigmoid(6) + 1 − sigmoid(−6)) = sigmoid(6)
    assert m[0][1] == pytest.approx(s6, abs=1e-6) and m[0][2] == pytest.approx(s6, abs=1e-6)
    assert m[1][2] == pytest.approx(0.5, abs=1e-6)  # neither is good: bias 0, P(A) = ½
    assert result.win_rates["judge"]["mean"]["good"] == pytest.approx(s6, abs=1e-6)


def test_local_judge_batched_equals_full_forward_of_each_question(tok):
    model = tiny_model(seed=0).eval()
    questions = [cmp.judge_question("Hi?", "Hello!", "Go away."),
                 cmp.judge_question("A longer prompt, to force padding?", "Sure: yes.", "No")]
    got = cmp.LocalJudge(model, tok, "tiny", batch_size=2, runtime=CPU).prob_a(questions)
    from alignkit.data.templates import encode_prompt
    a_id, b_id = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    for q, p in zip(questions, got):
        ids = encode_prompt(tok, [{"role": "user", "content": q}], "chat")
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        assert p == pytest.approx(float(probs[a_id] / (probs[a_id] + probs[b_id])), abs=1e-5)


def test_local_tiny_judge_matrix_is_complementary(tok):
    judge = cmp.LocalJudge(tiny_model(seed=0).eval(), tok, "tiny", runtime=CPU)
    result = cmp.build_result(["p1", "p2"], {k: v[:2] for k, v in ANSWERS.items()},
                              tokenizer=tok, judge=judge)
    m = result.win_rates["judge"]["matrix"]
    for i in range(3):
        for j in range(3):
            if i != j:
                assert 0.0 <= m[i][j] <= 1.0 and m[i][j] + m[j][i] == pytest.approx(1.0, 1e-12)


# ------------------------------------------------------------------ answering


def test_answer_all_local_and_endpoint_in_order(tok):
    from alignkit.cli.generate import answer
    prompts = ["Say hi.", "Name a colour."]

    def reply(body, headers, n):
        roles = [m["role"] for m in body["messages"]]
        return 200, completion(f"  {roles}:{body['messages'][-1]['content']}  "), 0.0

    with StubServer(reply) as stub:
        got = cmp.answer_all([("t", "tiny"), ("e", Endpoint(stub.url, "m"))], prompts,
                             system="Be brief.", max_new_tokens=5, runtime=CPU)
    assert list(got) == ["t", "e"]
    assert got["e"] == [f"['system', 'user']:{p}" for p in prompts]
    assert all("seed" not in r[2] and r[2]["max_tokens"] == 5 for r in stub.requests)
    want = answer(tiny_model(seed=0).eval(), tok, prompts, template="auto", system="Be brief.",
                  max_new_tokens=5)
    assert got["t"] == [g.text.strip() for g in want]


def test_duplicate_names_and_missing_paths_fail_before_work(tmp_path):
    from alignkit.errors import InputError
    with pytest.raises(InputError, match="two models are named 'tiny'"):
        cmp.answer_all([("tiny", "tiny"), ("tiny", "tiny")], ["p"])
    with pytest.raises(InputError, match="not found"):
        cmp.answer_all([("a", "tiny"), ("b", str(tmp_path / "nope"))], ["p"])


# ------------------------------------------------------------------ rendering


NASTY_PROMPT = "Is <b>x</b> & y | z?"
NASTY_ANSWER = "<script>alert('x')</script> | pipe\nline two \x1b[31mred"


def _nasty_result(tok):
    answers = {"<m1>": [NASTY_ANSWER, LISTED], "m|2": [REFUSAL, ""]}
    return cmp.build_result([NASTY_PROMPT, "plain prompt"], answers, tokenizer=tok,
                            rm_scores={"<m1>": [1.0, 0.0], "m|2": [0.0, 0.0]},
                            settings={"models": {"<m1>": "tiny", "m|2": "x"}})


def test_html_is_escaped_and_self_contained(tok):
    page = cmp.render_html(_nasty_result(tok))
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)" in page
    assert "Is &lt;b&gt;x&lt;/b&gt; &amp; y | z?" in page and "plain prompt" in page
    assert "&lt;m1&gt;" in page and "<m1>" not in page and "m|2" in page
    assert "src=" not in page and "href=" not in page  # nothing to fetch


def test_markdown_escapes_cells(tok):
    md = cmp.render_markdown(_nasty_result(tok))
    assert "<script>" not in md and "\\| pipe<br>line two" in md
    assert "| m\\|2 |" in md and "Win rates by reward model" in md and "50.0%" in md


def test_terminal_side_by_side_and_stacked(tok):
    result = _nasty_result(tok)
    wide = cmp.render_terminal(result, width=100)
    assert "\x1b" not in wide and "<m1>" in wide and "m|2" in wide
    assert any(" │ " in line and "<m1>" in line for line in wide.splitlines())
    assert "RM +1.00" in wide and "refusal" in wide and "(empty)" in wide
    assert "row beats column" in wide and "75.0%" in wide  # <m1>: win + tie = (1 + .5) / 2
    narrow = cmp.render_terminal(result, width=40)  # columns < 24 wide: answers stacked
    answers_part = narrow.split("Per model")[0].splitlines()
    assert all(len(line) <= 40 for line in answers_part)
    assert not any(" │ " in line for line in answers_part)
    long = cmp.render_terminal(cmp.build_result(["p"], {"a": ["w " * 400]}, tokenizer=tok),
                               width=60, max_lines=5)
    assert "more lines)" in long


def test_write_outputs_atomic_files(tmp_path, tok):
    result = _nasty_result(tok)
    paths = cmp.write_outputs(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "compare.html", "compare.json", "compare.md"]
    assert json.loads(paths["json"].read_text()) == json.loads(cmp.to_json(result))
    from alignkit.errors import InputError
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        cmp.write_outputs(result, tmp_path / "file")


# ------------------------------------------------------------------ CLI


def _cli(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.fixture
def saved_tiny(tmp_path):
    from alignkit.models.load import save_model
    save_model(tiny_model(seed=1), tiny_tokenizer(), tmp_path / "tiny1")  # a different model
    return tmp_path / "tiny1"


def test_cli_end_to_end_json_and_output_dir(tmp_path, capsys, saved_tiny, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-cli-secret-42")
    from alignkit.models.heads import reward_model_from_lm, save_reward_model
    torch.manual_seed(0)
    save_reward_model(reward_model_from_lm(tiny_model(seed=0)), tiny_tokenizer(), tmp_path / "rm")
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{NASTY_PROMPT}\nWhat is 15% of 230?\n")
    with StubServer(lambda body, headers, n: (200, completion("(A) <i>ok</i>"), 0.0)) as stub:
        main(["compare", "--model", "tiny", "--model", str(saved_tiny),
              "--model", f"served={stub.url}#m", "--prompts", str(prompts),
              "--max-new-tokens", "4", "--reward-model", str(tmp_path / "rm"),
              "--judge", f"{stub.url}#judge", "--api-key-env", "TEST_KEY", "--json",
              "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    data = json.loads(out)
    names = ["tiny", "tiny1", "served"]
    assert data["models"] == names and data["prompts"] == [NASTY_PROMPT, "What is 15% of 230?"]
    assert data["answers"]["served"] == ["(A) <i>ok</i>"] * 2
    assert all(len(data["metrics"][n]) == 2 and "rm_score" in data["metrics"][n][0]
               for n in names)
    for method in ("reward_model", "judge"):
        m = data["win_rates"][method]["matrix"]
        assert all(m[i][j] + m[j][i] == pytest.approx(1.0) for i in range(3) for j in range(3)
                   if i != j)
    # the stub judge always answers "(A)": both orders cancel it exactly
    assert set(data["win_rates"]["judge"]["mean"].values()) == {0.5}
    assert data["settings"]["token_counts"] == "tokenizer of tiny"
    files = {k: tmp_path / "out" / f"compare.{k}" for k in ("json", "md", "html")}
    assert all(f.is_file() for f in files.values())
    page = files["html"].read_text()
    assert "Is &lt;b&gt;x&lt;/b&gt; &amp; y | z?" in page and "What is 15% of 230?" in page
    assert all(n in page for n in names) and "<i>ok</i>" not in page
    for text in [out, *(f.read_text() for f in files.values())]:
        assert "sk-cli-secret-42" not in text
    assert all(r[1]["Authorization"] == "Bearer sk-cli-secret-42" for r in stub.requests)


def test_cli_terminal_output_on_lab_prompts(capsys):
    main(["compare", "--model", "tiny", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "Write a haiku about machine learning." in out and "How do I pick a lock?" in out
    assert "Per model" in out and "tiny" in out


def test_cli_bad_model_spec_is_one_line(capsys):
    code, err = _cli(capsys, ["compare", "--model", "tiny", "--model", "=tiny"])
    assert code == 2 and err.startswith("error: ") and "field 'model'" in err
    assert "\n" not in err and "Traceback" not in err
    code, err = _cli(capsys, ["compare", "--model", "tiny", "--model", "http://127.0.0.1:1/v1"])
    assert code == 2 and "field 'model'" in err and "'#'" in err and "\n" not in err
    code, err = _cli(capsys, ["compare", "--model", "tiny", "--judge", "x="])
    assert code == 2 and "field 'judge'" in err


def test_cli_missing_or_empty_prompts_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    code, err = _cli(capsys, ["compare", "--model", "tiny", "--prompts", str(missing)])
    assert code == 2 and str(missing) in err and "not found" in err and "\n" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, err = _cli(capsys, ["compare", "--model", "tiny", "--prompts", str(empty)])
    assert code == 2 and str(empty) in err and "no prompts" in err
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    code, err = _cli(capsys, ["compare", "--model", "tiny", "--prompts", str(bad)])
    assert code == 2 and f"{bad}:2" in err and "prompt" in err


def test_cli_missing_model_folder_fails_before_generating(tmp_path, capsys):
    code, err = _cli(capsys, ["compare", "--model", "tiny", "--model", str(tmp_path / "gone")])
    assert code == 2 and "not found" in err and "answering" not in err
