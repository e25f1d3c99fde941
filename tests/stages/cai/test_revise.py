"""Supervised CAI: exact prompt assembly, the critique → revision loop, resumption after an
interruption (same output as an uninterrupted run), the HTTP backend against alignkit's own
server, and the CLI end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.stages.cai import revise as rv
from alignkit.stages.cai.backends import EndpointGenerator, LocalGenerator, Sampling
from alignkit.stages.cai.constitution import Constitution, Example, Principle
from alignkit.cli.main import main
from alignkit.data import load_preferences, load_sft
from alignkit.engine.device import Runtime
from alignkit.errors import InputError
from alignkit.eval.tax import PromptItem
from alignkit.models.endpoint import Endpoint, EndpointError
from tests.stages.cai import FakeGenerator

CPU = Runtime(torch.device("cpu"), None)

KIND = Principle("kind", "Is the reply unkind?", "Make it kind.")
TRUE = Principle("true", "Is anything false?", "Fix what is false.")
EXAMPLE = Example("true", "Capital of France?", "Lyon.", "Lyon is wrong.", "Paris.")
RULES = Constitution("test", (KIND, TRUE), (EXAMPLE,))


def _items(n: int) -> list[PromptItem]:
    return [PromptItem(f"p{i}", f"Prompt number {i}?", "test") for i in range(n)]


# ------------------------------------------------------------------ prompt assembly


def test_critique_prompt_without_examples_is_exact():
    assert rv.critique_prompt("Hi?", "Go away.", KIND) == (
        "Below is an exchange between a user and an AI assistant, followed by a critique "
        "request about the assistant's reply. Write the critique only.\n\n"
        "User: Hi?\n\nAssistant: Go away.\n\n"
        "Critique request: Is the reply unkind?\n\nCritique:")


def test_revision_prompt_with_one_example_is_exact():
    examples = rv.few_shot_examples(RULES, 1)
    assert examples == [(EXAMPLE, TRUE)]
    assert rv.revision_prompt("Hi?", "Go away.", KIND, "It is rude.", examples) == (
        "Below is an exchange between a user and an AI assistant, a critique of the "
        "assistant's reply, and a revision request. Write only the revised reply: what the "
        "assistant should have said to the user.\n\n"
        "### Example 1\n\n"
        "User: Capital of France?\n\nAssistant: Lyon.\n\n"
        "Critique request: Is anything false?\n\nCritique: Lyon is wrong.\n\n"
        "Revision request: Fix what is false.\n\nRevision: Paris.\n\n"
        "### Your turn\n\n"
        "User: Hi?\n\nAssistant: Go away.\n\n"
        "Critique request: Is the reply unkind?\n\nCritique: It is rude.\n\n"
        "Revision request: Make it kind.\n\nRevision:")


def test_critique_prompt_with_an_example_uses_the_examples_own_principle():
    text = rv.critique_prompt("Hi?", "Go away.", KIND, rv.few_shot_examples(RULES))
    assert text.endswith("### Example 1\n\nUser: Capital of France?\n\nAssistant: Lyon.\n\n"
                         "Critique request: Is anything false?\n\nCritique: Lyon is wrong.\n\n"
                         "### Your turn\n\nUser: Hi?\n\nAssistant: Go away.\n\n"
                         "Critique request: Is the reply unkind?\n\nCritique:")
    assert rv.few_shot_examples(RULES, 0) == []


def test_rounds_critique_the_latest_revision_and_keep_every_step():
    gen = FakeGenerator()
    settings = rv.ReviseSettings(rounds=2, few_shot=0, seed=3, batch_size=2)
    records = rv.revise_chunk(gen, _items(2), 0, RULES, settings)
    assert len(gen.calls) == 1 + 2 * 2  # initial, then critique and revision per round
    rec = records[0]
    one, two = rec["rounds"]
    principle = RULES.principle(two["principle"])
    # round 2's critique request shows round 1's revision as the assistant's reply
    assert gen.calls[3][0][0] == rv.critique_prompt("Prompt number 0?", one["revision"],
                                                    principle)
    assert gen.calls[4][0][0] == rv.revision_prompt("Prompt number 0?", one["revision"],
                                                    principle, two["critique"])
    assert rec["initial"] == FakeGenerator.reply("Prompt number 0?", gen.calls[0][1], 0)
    assert rec["final"] == two["revision"]
    assert [r["round"] for r in rec["rounds"]] == [1, 2]
    assert one["critique_request"] == RULES.principle(one["principle"]).critique
    assert set(rec) == {"id", "prompt", "category", "initial", "rounds", "final"}


def test_an_empty_revision_keeps_the_reply_it_was_to_revise():
    class Blank(FakeGenerator):
        def generate(self, prompts, *, seed):
            out = super().generate(prompts, seed=seed)
            return [""] * len(out) if len(self.calls) == 3 else out

    rec = rv.revise_chunk(Blank(), _items(1), 0, RULES, rv.ReviseSettings(few_shot=0))[0]
    assert rec["rounds"][0]["revision"] == "" and rec["final"] == rec["initial"]
    sft, pairs, left = rv.training_rows([rec])
    assert len(sft) == 1 and pairs == [] and left["unchanged"] == 1


@pytest.mark.parametrize("text, label, expected", [
    ("Fine as it is.", "Critique:", "Fine as it is."),
    ("Critique: too vague.\nIt should say why.", "Critique:", "too vague.\nIt should say why."),
    ("Too vague.\n\nRevision request: Rewrite it.\n\nRevision: ...", "Critique:", "Too vague."),
    ("I can't help with that.\n\nUser: why not?\nAssistant: Because.", "Revision:",
     "I can't help with that."),
    ("  A reply.\n### Example 3\n\nUser: x", "Revision:", "A reply."),
    ("Fair point.\n\nYour turn\n\nYour turn", "Critique:", "Fair point."),  # heading sans ###
    ("No.\nuser: How can I ...\nassistant: ...", "Revision:", "No."),  # any case
    ("User: I'm glad you asked.\nMore.", "Revision:", ""),  # a new turn from the first line
    ("The user: is not a marker mid-line.", "Revision:", "The user: is not a marker mid-line."),
])
def test_generations_are_cut_where_the_model_goes_on_with_the_pattern(text, label, expected):
    assert rv.cut_continuation(text, label) == expected


def test_critiques_and_revisions_are_cut_before_use_and_a_cut_to_nothing_changes_nothing():
    class Rambler(FakeGenerator):
        def generate(self, prompts, *, seed):
            out = super().generate(prompts, seed=seed)
            n = len(self.calls)
            if n == 2:  # critiques: go on into a revision request
                return [f"{o}\n\nRevision request: more" for o in out]
            if n == 3:  # revisions: a new user turn straight away
                return ["User: and another thing"] * len(out)
            return out

    gen = Rambler()
    rec = rv.revise_chunk(gen, _items(1), 0, RULES, rv.ReviseSettings(few_shot=0))[0]
    critique = rec["rounds"][0]["critique"]
    assert "Revision request" not in critique and critique
    assert critique in gen.calls[2][0][0]  # the revision request quotes the cut critique
    assert rec["rounds"][0]["revision"] == "" and rec["final"] == rec["initial"]


# ------------------------------------------------------------------ resumption


def _run(tmp_path, gen, name: str, n: int = 5, batch_size: int = 2, **kw) -> dict:
    settings = rv.ReviseSettings(rounds=2, few_shot=1, seed=7, batch_size=batch_size)
    return rv.run_revise(gen, _items(n), RULES, tmp_path / name, settings=settings, **kw)


def _outputs(folder) -> tuple[str, str, dict]:
    records = [json.loads(x) for x in (folder / "revisions.jsonl").read_text().splitlines()]
    return ((folder / "sft.jsonl").read_text(), (folder / "preferences.jsonl").read_text(),
            {r["id"]: r for r in records})


def test_interrupted_run_resumes_without_duplicates_and_matches_an_uninterrupted_one(tmp_path):
    whole = _run(tmp_path, FakeGenerator(), "whole")
    calls_per_chunk = 1 + 2 * 2
    # interrupted in the middle of the second chunk (prompts p2, p3): p0, p1 are kept
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, FakeGenerator(fail_after=calls_per_chunk + 2), "cut")
    kept = [json.loads(x)["id"] for x in (tmp_path / "cut" / "revisions.jsonl").read_text()
            .splitlines()]
    assert kept == ["p0", "p1"] and not (tmp_path / "cut" / "sft.jsonl").exists()
    rerun = FakeGenerator()
    summary = _run(tmp_path, rerun, "cut")
    assert summary["generated"] == 3 and summary["resumed"] == 2
    assert len(rerun.calls) == 2 * calls_per_chunk  # chunks 2 and 3 only
    assert all("Prompt number 0?" not in p for prompts, _ in rerun.calls for p in prompts)
    lines = (tmp_path / "cut" / "revisions.jsonl").read_text().splitlines()
    assert len(lines) == 5 and len({json.loads(x)["id"] for x in lines}) == 5
    assert _outputs(tmp_path / "cut") == _outputs(tmp_path / "whole")
    assert whole["sft_examples"] == 5 and whole["preference_pairs"] == 5


def test_a_chunk_cut_short_is_regenerated_whole_and_only_its_missing_records_written(tmp_path):
    _run(tmp_path, FakeGenerator(), "whole")
    _run(tmp_path, FakeGenerator(), "cut")
    log = tmp_path / "cut" / "revisions.jsonl"
    lines = log.read_text().splitlines()
    # drop p3 and leave half of p4's line: the last chunk (p4) and p3 are missing, p2 is kept
    log.write_text("\n".join(lines[:3]) + "\n" + lines[4][:40])
    summary = _run(tmp_path, FakeGenerator(), "cut")
    assert summary["generated"] == 2
    ids = [json.loads(x)["id"] for x in log.read_text().splitlines()]
    assert sorted(ids) == ["p0", "p1", "p2", "p3", "p4"] and len(ids) == 5
    assert _outputs(tmp_path / "cut") == _outputs(tmp_path / "whole")


def test_a_log_from_other_settings_or_prompts_is_refused(tmp_path):
    _run(tmp_path, FakeGenerator(), "out", n=2)
    settings = rv.ReviseSettings(rounds=1, few_shot=1, seed=7, batch_size=2)
    with pytest.raises(InputError) as e:
        rv.run_revise(FakeGenerator(), _items(2), RULES, tmp_path / "out", settings=settings)
    assert "other settings" in str(e.value) and "revisions.jsonl:1" in str(e.value)
    changed = [PromptItem("p0", "Another prompt?", "test")]
    with pytest.raises(InputError, match="held another prompt"):
        rv.run_revise(FakeGenerator(), changed, RULES, tmp_path / "out",
                      settings=rv.ReviseSettings(rounds=2, few_shot=1, seed=7, batch_size=2))
    summary = rv.run_revise(FakeGenerator(), _items(2), RULES, tmp_path / "out",
                            settings=settings, overwrite=True)
    assert summary["generated"] == 2


def test_training_files_load_with_alignkits_loaders(tmp_path):
    summary = _run(tmp_path, FakeGenerator(), "out", n=3)
    sft = load_sft(summary["outputs"]["sft"])
    pairs, report = load_preferences(summary["outputs"]["preferences"])
    assert len(sft) == 3 and report.kept == 3
    records = _outputs(tmp_path / "out")[2]
    assert sft[0].messages[-1]["content"] == records["p0"]["final"]
    assert pairs[0].chosen == records["p0"]["final"]
    assert pairs[0].rejected == records["p0"]["initial"] and pairs[0].label is None


# ------------------------------------------------------------------ HTTP backend


@pytest.fixture(scope="module")
def tiny():
    from alignkit.models.tiny import tiny_model, tiny_tokenizer
    return tiny_model(seed=0).eval(), tiny_tokenizer()


def test_revise_through_alignkit_serve_equals_revise_with_the_local_model(tmp_path, tiny):
    from alignkit.models.serve import make_server
    model, tok = tiny
    sampling = Sampling(max_new_tokens=6, temperature=1.0, batch_size=1)
    settings = rv.ReviseSettings(rounds=1, few_shot=0, seed=5, batch_size=1)
    local = LocalGenerator(model, tok, "tiny", sampling, runtime=CPU)
    rv.run_revise(local, _items(2), RULES, tmp_path / "local", settings=settings)
    with make_server(model, tok, port=0, model_name="tiny", runtime=CPU) as server:
        remote = EndpointGenerator(Endpoint(server.url, "tiny", retries=0), "tiny", sampling)
        rv.run_revise(remote, _items(2), RULES, tmp_path / "http", settings=settings)
    local_out, http_out = _outputs(tmp_path / "local"), _outputs(tmp_path / "http")
    strip = [{k: v for k, v in r.items() if k != "run"} for r in http_out[2].values()]
    assert strip == [{k: v for k, v in r.items() if k != "run"}
                     for r in local_out[2].values()]
    assert local_out[:2] == http_out[:2]


def test_an_endpoint_that_times_out_stops_the_run_and_keeps_what_was_done(tmp_path, tiny):
    import time

    from alignkit.models.serve import make_server
    model, tok = tiny
    sampling = Sampling(max_new_tokens=4, temperature=1.0, batch_size=1)
    settings = rv.ReviseSettings(rounds=1, few_shot=0, seed=5, batch_size=1)
    slow_from = 3  # requests 0-2 are the first prompt's: answer, critique, revision

    def hook(n):
        if n >= slow_from:
            time.sleep(1.0)

    with make_server(model, tok, port=0, model_name="tiny", runtime=CPU, hook=hook) as server:
        remote = EndpointGenerator(Endpoint(server.url, "tiny", retries=0, timeout=0.3),
                                   "tiny", sampling)
        with pytest.raises(EndpointError, match="timed out"):
            rv.run_revise(remote, _items(2), RULES, tmp_path / "out", settings=settings)
    lines = (tmp_path / "out" / "revisions.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["p0"]


# ------------------------------------------------------------------ CLI


def test_cli_revise_end_to_end_on_tiny_then_resumes(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n"
                               for i in range(3)))
    out = tmp_path / "run"
    args = ["cai", "revise", "--model", "tiny", "--prompts", str(prompts), "--few-shot", "0",
            "--max-new-tokens", "6", "--temperature", "1", "--batch-size", "2",
            "--precision", "fp32", "--output", str(out), "--json"]
    main(args)
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 3 and summary["generated"] == 3
    assert summary["settings"]["generator"] == "tiny" and summary["settings"]["few_shot"] == 0
    assert len(load_sft(summary["outputs"]["sft"])) == summary["sft_examples"] == 3
    pairs, _ = load_preferences(summary["outputs"]["preferences"])
    assert len(pairs) == summary["preference_pairs"] >= 1
    record = json.loads((out / "revisions.jsonl").read_text().splitlines()[0])
    assert record["rounds"][0]["principle"] and "critique" in record["rounds"][0]
    main(args)  # everything is done: nothing is generated again
    again = json.loads(capsys.readouterr().out)
    assert again["generated"] == 0 and again["resumed"] == 3


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - name: a\n    critique: c\n")
    with pytest.raises(SystemExit) as e:
        main(["cai", "revise", "--model", "tiny", "--constitution", str(bad), "-o",
              str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert f"{bad}:2: field 'principles[0].revision': missing" in err
    with pytest.raises(SystemExit):
        main(["cai", "revise", "--model", "tiny", "--rounds", "0", "-o", str(tmp_path / "o")])
    assert "rounds" in capsys.readouterr().err
