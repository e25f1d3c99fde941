"""Supervised Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI
Feedback", §3): answer → critique → revision, repeated for N rounds.

For each prompt x the generator answers (y₀). Then, in round r = 1 … N, a principle cᵣ is
drawn from the constitution; the model is shown x and the current reply yᵣ₋₁ with cᵣ's
critique request and writes a critique; shown that critique with cᵣ's revision request, it
writes the revision yᵣ. Few-shot examples from the constitution (worked critiques and
revisions) may precede each request. The outputs:

- ``revisions.jsonl``: every intermediate (prompt, initial answer, per round the principle,
  requests, critique and revision) — appended one prompt at a time, so a rerun resumes;
- ``sft.jsonl``: ``{"prompt", "completion"}`` = (x, final revision), for ``alignkit sft``;
- ``preferences.jsonl``: ``{"prompt", "chosen", "rejected"}`` = (x, final revision, y₀), for
  ``alignkit reward`` / ``alignkit dpo``;
- ``summary.json``: counts and the settings.

Where we depart from the paper: every request is one self-contained user turn (the exchange
quoted as "User: … / Assistant: …"), not a growing dialogue, so any chat model or endpoint
takes it and round r critiques only the latest revision. A revision that comes back empty
counts as "no change" (the reply it was to revise stays current). A critique or revision is
cut where the model goes on with the prompt's pattern (a line starting "User:", "Revision
request:", "###" …: :func:`cut_continuation`, what stop sequences would do in a chat API). A
pair whose sides are equal or empty is left out of the preference set, and an empty final
reply out of the SFT set (both counted in the summary), as alignkit's data loaders would
refuse them.

Resumption: prompts are processed in fixed chunks of ``batch_size`` (chunk k holds prompts
k·B … k·B + B − 1 of the prompt list) with seeds derived from (seed, chunk, step), so a chunk
gives the same samples whenever it runs. Finished records are appended and flushed as each
chunk completes; on a rerun, finished prompts are skipped (a chunk that was cut short is
generated again in full and only its missing records are written), a torn last line is cut
off, and the final files are rewritten from the whole log through a temporary file and
``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from alignkit.stages.cai.backends import Generator, Log
from alignkit.stages.cai.constitution import (Constitution, Example, Principle,
                                              sample_principles)
from alignkit.errors import InputError
from alignkit.io import atomic_write_text as write_text
from alignkit.assets import PROMPTS_DIR

DEFAULT_PROMPTS = (PROMPTS_DIR / "red_team_v1.jsonl", PROMPTS_DIR / "helpful_v1.jsonl")

CRITIQUE_TASK = ("Below is an exchange between a user and an AI assistant, followed by a "
                 "critique request about the assistant's reply. Write the critique only.")
REVISION_TASK = ("Below is an exchange between a user and an AI assistant, a critique of the "
                 "assistant's reply, and a revision request. Write only the revised reply: "
                 "what the assistant should have said to the user.")


# ---------------------------------------------------------------------------------------------
# Prompt assembly


def few_shot_examples(constitution: Constitution, n: int | None = None
                      ) -> list[tuple[Example, Principle]]:
    """The first ``n`` examples of the constitution (all for None), each with its principle."""
    examples = constitution.examples if n is None else constitution.examples[:max(n, 0)]
    return [(e, constitution.principle(e.principle)) for e in examples]


def _exchange(prompt: str, response: str) -> str:
    return f"User: {prompt}\n\nAssistant: {response}"


def _critique_block(prompt: str, response: str, principle: Principle,
                    critique: str | None = None) -> str:
    block = f"{_exchange(prompt, response)}\n\nCritique request: {principle.critique}\n\nCritique:"
    return block if critique is None else f"{block} {critique}"


def _revision_block(prompt: str, response: str, principle: Principle, critique: str,
                    revision: str | None = None) -> str:
    block = (f"{_critique_block(prompt, response, principle, critique)}\n\n"
             f"Revision request: {principle.revision}\n\nRevision:")
    return block if revision is None else f"{block} {revision}"


# Where a critique or a revision ends: the model, having seen the few-shot blocks, often goes on
# writing the next part of the pattern (a new "User:" turn, the revision request, a new example)
# instead of stopping. Everything from the first such marker at the start of a line is cut.
CONTINUATION_MARKERS = ("User:", "Assistant:", "Critique request:", "Critique:",
                        "Revision request:", "Revision:", "###", "Your turn")
_MARKERS_LOWER = tuple(m.lower() for m in CONTINUATION_MARKERS)  # matched case-insensitively


def cut_continuation(text: str, label: str = "") -> str:
    """``text`` up to the first line that starts one of :data:`CONTINUATION_MARKERS` (in any
    case: the generator going on with the prompt's pattern), stripped. ``label`` (the request's own
    heading, "Critique:" or "Revision:"), repeated at the very start, is dropped first; any
    other marker on the first line leaves nothing (e.g. a "revision" that opens a new "User:"
    turn)."""
    text = text.strip()
    if label and text.startswith(label):
        text = text[len(label):]
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().lower().startswith(_MARKERS_LOWER):
            return "\n".join(lines[:i]).strip()
    return text.strip()


def _assemble(task: str, examples: list[str], block: str) -> str:
    """The task, then ``### Example i`` blocks and ``### Your turn`` (no headings without
    examples)."""
    if not examples:
        return f"{task}\n\n{block}"
    shown = "".join(f"### Example {i}\n\n{text}\n\n" for i, text in enumerate(examples, 1))
    return f"{task}\n\n{shown}### Your turn\n\n{block}"


def critique_prompt(prompt: str, response: str, principle: Principle,
                    examples: Sequence[tuple[Example, Principle]] = ()) -> str:
    """The user turn that asks for a critique of ``response`` under ``principle``."""
    shown = [_critique_block(e.prompt, e.response, p, e.critique) for e, p in examples]
    return _assemble(CRITIQUE_TASK, shown, _critique_block(prompt, response, principle))


def revision_prompt(prompt: str, response: str, principle: Principle, critique: str,
                    examples: Sequence[tuple[Example, Principle]] = ()) -> str:
    """The user turn that asks for a revision of ``response`` given ``critique``."""
    shown = [_revision_block(e.prompt, e.response, p, e.critique, e.revision)
             for e, p in examples]
    return _assemble(REVISION_TASK, shown,
                     _revision_block(prompt, response, principle, critique))


# ---------------------------------------------------------------------------------------------
# Prompts, seeds, and the resumable record log (shared with alignkit.stages.cai.feedback)


def load_prompts(paths: Sequence[str | os.PathLike] | None = None, *,
                 max_prompts: int | None = None) -> list:
    """:class:`alignkit.eval.tax.PromptItem` s of the files (default: the shipped red-team and
    helpful sets), ids unique across files; the first ``max_prompts`` are kept."""
    from alignkit.eval.tax import load_prompt_set
    if max_prompts is not None and max_prompts < 1:
        raise InputError("must be at least 1", field="max_prompts")
    items, seen = [], {}
    for path in paths or DEFAULT_PROMPTS:
        for item in load_prompt_set(path):
            if item.id in seen:
                raise InputError(f"duplicate id '{item.id}' (also in {seen[item.id]}); ids "
                                 f"must be unique across prompt files", path=str(path),
                                 field="id")
            seen[item.id] = str(path)
            items.append(item)
    return items[:max_prompts]


def derived_seed(seed: int, chunk: int, step: str) -> int:
    """A 31-bit seed for one generation call, from the run's seed, the chunk and the step."""
    digest = hashlib.sha256(f"{seed}:{chunk}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def fingerprint(settings: dict) -> str:
    """A short hash of what decides a run's outputs; records of another run are refused."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class RecordLog:
    """An append-only JSONL file of finished records, one per prompt (key ``id``), each
    stamped with the run's fingerprint (key ``run``)."""

    def __init__(self, path: Path, run: str) -> None:
        self.path, self.run = Path(path), run

    def load(self, prompts: dict[str, str]) -> dict[str, dict]:
        """Finished records by id. A torn last line (a run killed mid-write) is cut off; any
        other bad line, a record of another run, or one whose prompt differs from
        ``prompts[id]`` is an InputError."""
        if not self.path.exists():
            return {}
        self._repair_tail()
        finished: dict[str, dict] = {}
        text = self.path.read_text(encoding="utf-8")
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                record = self._parse(line, n)
                self._check(record, n, prompts)
                finished[str(record["id"])] = record
        return finished

    def _repair_tail(self) -> None:
        raw = self.path.read_bytes()
        if not raw or raw.endswith(b"\n"):
            return
        cut = raw.rfind(b"\n") + 1
        try:
            complete = isinstance(json.loads(raw[cut:]), dict)
        except ValueError:
            complete = False
        with open(self.path, "r+b") as f:
            if complete:  # written whole, newline lost: keep it
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(cut)

    def _parse(self, line: str, n: int) -> dict:
        try:
            record = json.loads(line)
        except ValueError as e:
            raise InputError(f"malformed JSON in the record log ({e}); remove the line or "
                             f"pass --overwrite", path=str(self.path), line=n) from None
        if not isinstance(record, dict) or "id" not in record:
            raise InputError("not a record of this command (no 'id')", path=str(self.path),
                             line=n, field="id")
        return record

    def _check(self, record: dict, n: int, prompts: dict[str, str]) -> None:
        where = {"path": str(self.path), "line": n}
        if record.get("run") != self.run:
            raise InputError("written by a run with other settings (model, constitution, "
                             "seed, sampling, rounds or batch size); pass --overwrite to start "
                             "again, or choose another output folder", field="run", **where)
        expected = prompts.get(str(record["id"]))
        if expected is not None and record.get("prompt") != expected:
            raise InputError(f"prompt id '{record['id']}' held another prompt in this run; "
                             f"pass --overwrite or choose another output folder",
                             field="prompt", **where)

    def append(self, records: list[dict]) -> None:
        """Append and flush to disk (fsync): what returns is kept whatever happens next."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """All of ``rows`` or nothing: a temporary sibling renamed into place."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare_output(out_dir: Path, names: Sequence[str], overwrite: bool) -> None:
    """Create ``out_dir``; with ``overwrite``, delete the files this command writes first."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("exists and is not a folder", path=str(out_dir), field="output")
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in names:
            (out_dir / name).unlink(missing_ok=True)


Work = Callable[[list, int], list[dict]]


def run_chunks(items: list, batch_size: int, log_file: RecordLog, work: Work,
               log: Log | None = None) -> tuple[dict[str, dict], int]:
    """Run ``work(chunk, k)`` on every chunk with an unfinished prompt; returns all finished
    records by id and how many were made now."""
    if batch_size < 1:
        raise InputError("must be at least 1", field="batch_size")
    finished = log_file.load({it.id: it.prompt for it in items})
    resumed = sum(it.id in finished for it in items)
    if resumed and log is not None:
        log(f"resuming: {resumed} of {len(items)} prompts already done in {log_file.path}")
    made = 0
    for k, start in enumerate(range(0, len(items), batch_size)):
        chunk = items[start:start + batch_size]
        if all(it.id in finished for it in chunk):
            continue
        new = [r for r in work(chunk, k) if r["id"] not in finished]
        log_file.append(new)
        finished.update({r["id"]: r for r in new})
        made += len(new)
        if log is not None:
            log(f"{sum(it.id in finished for it in items)}/{len(items)} prompts done")
    return finished, made


# ---------------------------------------------------------------------------------------------
# Critique → revision


@dataclass(frozen=True)
class ReviseSettings:
    """``rounds`` critique → revision rounds; the first ``few_shot`` examples (None: all);
    ``seed`` for principles and sampling; ``batch_size`` prompts per chunk."""

    rounds: int = 1
    few_shot: int | None = None
    seed: int = 0
    batch_size: int = 8

    def check(self) -> None:
        if self.rounds < 1:
            raise InputError("must be at least 1", field="rounds")
        if self.few_shot is not None and self.few_shot < 0:
            raise InputError("must be 0 or more", field="few_shot")


def revise_chunk(generator: Generator, chunk: list, k: int, constitution: Constitution,
                 settings: ReviseSettings) -> list[dict]:
    """The records of one chunk of prompts (``chunk[i].id``, ``.prompt``, ``.category``)."""
    examples = few_shot_examples(constitution, settings.few_shot)
    prompts = [it.prompt for it in chunk]
    current = generator.generate(prompts, seed=derived_seed(settings.seed, k, "initial"))
    records = [{"id": it.id, "prompt": it.prompt, "category": it.category, "initial": answer,
                "rounds": []} for it, answer in zip(chunk, current)]
    for r in range(1, settings.rounds + 1):
        principles = [sample_principles(constitution, 1, seed=settings.seed,
                                        key=f"{it.id}:round-{r}")[0] for it in chunk]
        asks = [critique_prompt(x, y, c, examples) for x, y, c in zip(prompts, current,
                                                                       principles)]
        critiques = generator.generate(asks, seed=derived_seed(settings.seed, k, f"critique-{r}"))
        critiques = [cut_continuation(c, "Critique:") for c in critiques]
        asks = [revision_prompt(x, y, c, crit, examples)
                for x, y, c, crit in zip(prompts, current, principles, critiques)]
        revisions = generator.generate(asks, seed=derived_seed(settings.seed, k, f"revision-{r}"))
        revisions = [cut_continuation(v, "Revision:") for v in revisions]
        for i, rec in enumerate(records):
            rec["rounds"].append({"round": r, "principle": principles[i].name,
                                  "critique_request": principles[i].critique,
                                  "critique": critiques[i],
                                  "revision_request": principles[i].revision,
                                  "revision": revisions[i]})
            current[i] = revisions[i] or current[i]  # an empty revision: no change
    for rec, final in zip(records, current):
        rec["final"] = final
    return records


def training_rows(records: list[dict]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(SFT rows, preference rows, counts of what was left out and why)."""
    sft, pairs = [], []
    left_out = {"empty_final": 0, "unchanged": 0, "empty_initial": 0}
    for rec in records:
        final, initial = rec["final"].strip(), rec["initial"].strip()
        if not final:
            left_out["empty_final"] += 1
            continue
        sft.append({"prompt": rec["prompt"], "completion": final})
        if not initial:
            left_out["empty_initial"] += 1
        elif final == initial:
            left_out["unchanged"] += 1
        else:
            pairs.append({"prompt": rec["prompt"], "chosen": final, "rejected": initial})
    return sft, pairs, left_out


REVISE_FILES = ("revisions.jsonl", "sft.jsonl", "preferences.jsonl", "summary.json")


def run_revise(generator: Generator, items: list, constitution: Constitution,
               out_dir: str | os.PathLike, *, settings: ReviseSettings = ReviseSettings(),
               sampling: dict | None = None, overwrite: bool = False,
               log: Log | None = None) -> dict:
    """Critique and revise every prompt of ``items`` (resuming ``out_dir``), then write the
    SFT and preference sets; returns the summary (also written to ``summary.json``).
    ``sampling`` (the generator's settings, for the fingerprint and the summary)."""
    settings.check()
    if not items:
        raise InputError("no prompts", field="prompts")
    few = len(few_shot_examples(constitution, settings.few_shot))
    run_settings = {"command": "cai revise", "generator": generator.describe(),
                    "constitution": constitution.name,
                    "constitution_fingerprint": constitution.fingerprint(),
                    **asdict(settings), "few_shot": few, "sampling": sampling or {},
                    "cut_at": list(CONTINUATION_MARKERS)}
    out = Path(out_dir)
    prepare_output(out, REVISE_FILES, overwrite)
    run = fingerprint(run_settings)
    log_file = RecordLog(out / "revisions.jsonl", run)

    def work(chunk: list, k: int) -> list[dict]:
        return [rec | {"run": run} for rec in revise_chunk(generator, chunk, k, constitution,
                                                           settings)]

    finished, made = run_chunks(items, settings.batch_size, log_file, work, log)
    records = [finished[it.id] for it in items]
    sft, pairs, left_out = training_rows(records)
    paths = {"records": out / "revisions.jsonl", "sft": out / "sft.jsonl",
             "preferences": out / "preferences.jsonl", "summary": out / "summary.json"}
    write_jsonl(paths["sft"], sft)
    write_jsonl(paths["preferences"], pairs)
    summary = {"outputs": {k: str(v) for k, v in paths.items()}, "prompts": len(items),
               "generated": made, "resumed": len(items) - made, "sft_examples": len(sft),
               "preference_pairs": len(pairs), "left_out": left_out, "run": run,
               "settings": run_settings}
    write_text(paths["summary"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
