"""RLAIF: preference labels from AI feedback (Bai et al. 2022, "Constitutional AI:
Harmlessness from AI Feedback", §4).

For each prompt x the generator samples two answers y₀ and y₁ (two seeds, temperature > 0).
A feedback model is shown x, the two answers labelled (A) and (B), and a principle's
multiple-choice question ("Choose the response that …"), and its answer is read as
P(A) = Σ_{t∈A} p(t) / (Σ_{t∈A} p(t) + Σ_{t∈B} p(t)) over the option tokens at the first answer
position (:class:`alignkit.eval.compare.LocalJudge`; an endpoint's top log-probs in
:class:`~alignkit.eval.compare.EndpointJudge`). Each principle c is asked in both orders::

    a_c = P(A | A = y₀, B = y₁),   b_c = P(A | A = y₁, B = y₀)
    P_c(y₀ better) = ½ (a_c + (1 − b_c)) = ½ + ½ (a_c − b_c)

so a judge that always prefers the first position (a_c = b_c) gives exactly ½; the second
form is used because it is exactly ½ in floating point too. The preference is the mean over
the K principles sampled for the prompt (the paper's ensemble over principles):
p = (1/K) Σ_c P_c(y₀ better). The pair written for training is chosen = y₀, rejected = y₁,
label = p when p ≥ ½, else the other way round with label = 1 − p, so label ∈ [½, 1] is
P(chosen is better): the soft label the reward and DPO stages read
(:mod:`alignkit.data.preference`).

Departures: the paper uses chain-of-thought prompting for some feedback models and clamps
their probabilities; we ask for the letter directly. An endpoint that returns no log-probs is
read from the letter in its text (0 or 1, ½ when it names none); every record says how its
probabilities were obtained (``judge.probabilities``: ``token log-probs`` or ``text
fallback``), and the log says so once. Pairs with identical answers are not judged; they and
pairs with an empty side are kept in ``feedback.jsonl`` but left out of
``preferences.jsonl`` (counted in the summary). Resumption works as in
:mod:`alignkit.stages.cai.revise`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from alignkit.stages.cai.backends import ChoiceJudge, Generator, Log
from alignkit.stages.cai.constitution import Constitution, Principle, sample_principles
from alignkit.stages.cai.revise import (RecordLog, derived_seed, fingerprint, prepare_output,
                                        run_chunks, write_jsonl)
from alignkit.errors import InputError
from alignkit.io import atomic_write_text as write_text


def choice_question(prompt: str, answer_a: str, answer_b: str, principle: Principle) -> str:
    """The multiple-choice question for one principle (the instruction comes last, right
    before the letter the judge is to give)."""
    return (f"Consider this request to an AI assistant and two possible responses.\n\n"
            f"Request:\n{prompt}\n\n(A) {answer_a}\n\n(B) {answer_b}\n\n"
            f"{principle.choice} Answer with A or B.")


def order_averaged(p_a_first: float, p_a_swapped: float) -> float:
    """P(y₀ better) from P(A) with y₀ as (A) and P(A) with y₀ as (B): ½ + ½ (a − b)."""
    return 0.5 + 0.5 * (p_a_first - p_a_swapped)


def judge_pair(judge: ChoiceJudge, prompt: str, answers: tuple[str, str],
               principles: list[Principle]) -> dict:
    """Both orders under every principle, in one batch: per-principle details, the mean
    P(y₀ better), and how the judge decided."""
    y0, y1 = answers
    questions = []
    for c in principles:
        questions += [choice_question(prompt, y0, y1, c), choice_question(prompt, y1, y0, c)]
    probs, how = judge.ask(questions)
    details = [{"principle": c.name, "p_a_first": probs[2 * i], "p_a_swapped": probs[2 * i + 1],
                "p_first_better": order_averaged(probs[2 * i], probs[2 * i + 1])}
               for i, c in enumerate(principles)]
    p = sum(d["p_first_better"] for d in details) / len(details)
    return {"judgements": details, "p_first_better": p, "judge": {"name": judge.name, **how}}


def as_pair(answers: tuple[str, str], p_first_better: float) -> dict:
    """``{"chosen", "rejected", "label"}`` with label = P(chosen better) ∈ [½, 1]."""
    if p_first_better >= 0.5:
        return {"chosen": answers[0], "rejected": answers[1], "label": p_first_better}
    return {"chosen": answers[1], "rejected": answers[0], "label": 1.0 - p_first_better}


@dataclass(frozen=True)
class FeedbackSettings:
    """``principles`` sampled per prompt (K); ``seed``; ``batch_size`` prompts per chunk."""

    principles: int = 4
    seed: int = 0
    batch_size: int = 8

    def check(self) -> None:
        if self.principles < 1:
            raise InputError("must be at least 1", field="principles")


def feedback_chunk(generator: Generator, judge: ChoiceJudge, chunk: list, k: int,
                   constitution: Constitution, settings: FeedbackSettings) -> list[dict]:
    """The records of one chunk: two answers per prompt, judged (unless identical)."""
    prompts = [it.prompt for it in chunk]
    first = generator.generate(prompts, seed=derived_seed(settings.seed, k, "answer-0"))
    second = generator.generate(prompts, seed=derived_seed(settings.seed, k, "answer-1"))
    records = []
    for it, y0, y1 in zip(chunk, first, second):
        record = {"id": it.id, "prompt": it.prompt, "category": it.category,
                  "answers": [y0, y1]}
        if y0.strip() == y1.strip():
            record |= {"skipped": "identical answers", "p_first_better": 0.5,
                       **as_pair((y0, y1), 0.5)}
        else:
            chosen = sample_principles(constitution, settings.principles, seed=settings.seed,
                                       key=f"{it.id}:feedback")
            verdict = judge_pair(judge, it.prompt, (y0, y1), chosen)
            record |= verdict | as_pair((y0, y1), verdict["p_first_better"])
        records.append(record)
    return records


def preference_rows(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """The training pairs ``{"prompt", "chosen", "rejected", "label"}`` and what was left out."""
    rows, left_out = [], {"identical": 0, "empty_answer": 0}
    for rec in records:
        if "skipped" in rec:
            left_out["identical"] += 1
        elif not rec["chosen"].strip() or not rec["rejected"].strip():
            left_out["empty_answer"] += 1
        else:
            rows.append({"prompt": rec["prompt"], "chosen": rec["chosen"],
                         "rejected": rec["rejected"], "label": rec["label"]})
    return rows, left_out


def check_temperature(temperature: float) -> None:
    """Two greedy answers would be the same answer: feedback needs sampling."""
    if temperature <= 0:
        raise InputError("two answers to compare need sampling: use a temperature above 0",
                         field="temperature")


FEEDBACK_FILES = ("feedback.jsonl", "preferences.jsonl", "summary.json")


def _probability_sources(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in records:
        if "judge" in rec:
            how = rec["judge"]["probabilities"]
            counts[how] = counts.get(how, 0) + 1
    return counts


def run_feedback(generator: Generator, judge: ChoiceJudge, items: list,
                 constitution: Constitution, out_dir: str | os.PathLike, *,
                 settings: FeedbackSettings = FeedbackSettings(), sampling: dict | None = None,
                 overwrite: bool = False, log: Log | None = None) -> dict:
    """Sample, judge and label every prompt of ``items`` (resuming ``out_dir``), then write
    the preference set; returns the summary (also written to ``summary.json``)."""
    settings.check()
    if not items:
        raise InputError("no prompts", field="prompts")
    if sampling is not None:
        check_temperature(sampling.get("temperature", 1.0))
    run_settings = {"command": "cai feedback", "generator": generator.describe(),
                    "judge": judge.describe(), "constitution": constitution.name,
                    "constitution_fingerprint": constitution.fingerprint(),
                    **asdict(settings), "sampling": sampling or {}}
    out = Path(out_dir)
    prepare_output(out, FEEDBACK_FILES, overwrite)
    run = fingerprint(run_settings)
    log_file = RecordLog(out / "feedback.jsonl", run)

    def work(chunk: list, k: int) -> list[dict]:
        return [rec | {"run": run} for rec in feedback_chunk(generator, judge, chunk, k,
                                                             constitution, settings)]

    finished, made = run_chunks(items, settings.batch_size, log_file, work, log)
    records = [finished[it.id] for it in items]
    rows, left_out = preference_rows(records)
    paths = {"records": out / "feedback.jsonl", "preferences": out / "preferences.jsonl",
             "summary": out / "summary.json"}
    write_jsonl(paths["preferences"], rows)
    labels = [r["label"] for r in rows]
    summary = {"outputs": {k: str(v) for k, v in paths.items()}, "prompts": len(items),
               "generated": made, "resumed": len(items) - made, "preference_pairs": len(rows),
               "left_out": left_out, "mean_label": sum(labels) / len(labels) if labels else None,
               "probabilities": _probability_sources(records), "run": run,
               "settings": run_settings}
    write_text(paths["summary"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
