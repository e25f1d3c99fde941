"""The models Constitutional AI (Bai et al. 2022) talks to: a generator (answers, critiques,
revisions) and a feedback model (the judge of RLAIF), each a local model or an
OpenAI-compatible endpoint.

Nothing here is a second copy of what exists: local generation is
:func:`alignkit.cli.generate.answer` (the chat template, then :func:`alignkit.models.generate.
generate`), endpoint calls are :class:`alignkit.models.endpoint.Endpoint` (retries, backoff,
timeouts, bounded concurrency), and judging is :class:`alignkit.eval.compare.LocalJudge` /
:class:`~alignkit.eval.compare.EndpointJudge`, which turn an A/B question into P(A) from the
option tokens' probabilities. What this module adds:

- :class:`Sampling`, one set of generation settings for both kinds of generator;
- :class:`ChoiceJudge`, which also reports how each batch of questions was decided: from token
  probabilities, or (an endpoint that sends no log-probs) from the letter in the judge's text;
- :func:`load_backends`, which loads a local model once when it both generates and judges.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol

from alignkit.models.endpoint import Endpoint, ModelSource

Log = Callable[[str], None]


@dataclass(frozen=True)
class Sampling:
    """How a generator samples. ``temperature`` 0 is greedy; ``seed`` is given per call."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    system: str | None = None
    template: str = "auto"
    batch_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


class Generator(Protocol):
    """Answers a list of user prompts (one user turn each), stripped, in input order."""

    name: str

    def generate(self, prompts: list[str], *, seed: int) -> list[str]: ...

    def describe(self) -> str: ...


class LocalGenerator:
    """A local causal LM: :func:`alignkit.cli.generate.answer` under the runtime's autocast.
    All prompts of one call are one batch (so a call's samples depend only on its prompts and
    ``seed``)."""

    def __init__(self, model, tokenizer, name: str, sampling: Sampling, *, source: str = "",
                 runtime=None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.sampling, self.source, self.runtime = sampling, source, _runtime(runtime)

    def describe(self) -> str:
        return self.source or self.name

    def generate(self, prompts: list[str], *, seed: int) -> list[str]:
        from alignkit.cli.generate import answer
        if not prompts:
            return []
        s = self.sampling
        with self.runtime.autocast():
            results = answer(self.model, self.tokenizer, prompts, template=s.template,
                             system=s.system, max_new_tokens=s.max_new_tokens,
                             temperature=s.temperature, top_p=s.top_p,
                             batch_size=max(len(prompts), 1), seed=seed,
                             autocast_dtype=self.runtime.autocast_dtype)
        return [r.text.strip() for r in results]


class EndpointGenerator:
    """An OpenAI-compatible endpoint: ``[system?, user]`` messages through
    :meth:`Endpoint.chat_many`; ``seed`` is sent when sampling (temperature > 0)."""

    def __init__(self, endpoint: Endpoint, name: str, sampling: Sampling) -> None:
        self.endpoint, self.name, self.sampling = endpoint, name, sampling

    def describe(self) -> str:
        return self.endpoint.describe()

    def generate(self, prompts: list[str], *, seed: int) -> list[str]:
        s = self.sampling
        messages = [([{"role": "system", "content": s.system}] if s.system else [])
                    + [{"role": "user", "content": p}] for p in prompts]
        results = self.endpoint.chat_many(messages, max_tokens=s.max_new_tokens,
                                          temperature=s.temperature, top_p=s.top_p,
                                          seed=seed if s.temperature > 0 else None)
        return [r["text"].strip() for r in results]


# ---------------------------------------------------------------------------------------------
# Judging


class _WatchedEndpoint:
    """An :class:`Endpoint` that counts its replies with and without log-probs (the judge
    cannot tell "the server sent none" from "no option among the top tokens")."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.with_logprobs = self.without_logprobs = 0

    def describe(self) -> str:
        return self.endpoint.describe()

    def chat(self, messages: list[dict], **kw) -> dict:
        return self._count([self.endpoint.chat(messages, **kw)])[0]

    def chat_many(self, list_of_messages: list[list[dict]], **kw) -> list[dict]:
        return self._count(self.endpoint.chat_many(list_of_messages, **kw))

    def _count(self, results: list[dict]) -> list[dict]:
        for r in results:
            if r.get("top_logprobs"):
                self.with_logprobs += 1
            else:
                self.without_logprobs += 1
        return results


class ChoiceJudge:
    """A feedback model answering A/B questions with P(A), and saying how it decided.

    ``judge`` is a :class:`alignkit.eval.compare.LocalJudge` (P(A) from the next-token
    probabilities of the option tokens: always token probabilities) or an
    :class:`~alignkit.eval.compare.EndpointJudge` (its top log-probs where the server returns
    them, else the letter its text names, else ½). ``log`` hears, once per reason, when an
    endpoint's answers are read from the text.
    """

    def __init__(self, judge, *, watch: _WatchedEndpoint | None = None,
                 log: Log | None = None) -> None:
        self.judge, self.watch, self.log = judge, watch, log
        self.name = judge.name
        self._warned: set[str] = set()

    def describe(self) -> str:
        info = self.judge.info()
        return f"{self.name} ({info.get('source', 'local')})"

    def ask(self, questions: list[str]) -> tuple[list[float], dict]:
        """P(A) per question, and ``{"kind", "probabilities", "decided_by"}`` for this batch:
        ``probabilities`` is ``"token log-probs"`` when every answer came from option-token
        probabilities, else ``"text fallback"`` (an endpoint without log-probs: the letter in
        its text, ½ when it names none)."""
        counts = dict(getattr(self.judge, "counts", {}))
        before = self.watch.without_logprobs if self.watch is not None else 0
        probs = self.judge.prob_a(questions)
        if self.watch is None:
            return probs, {"kind": "local", "probabilities": "token log-probs",
                           "decided_by": {"logprobs": len(questions)}}
        decided = {k: v - counts.get(k, 0) for k, v in self.judge.counts.items()}
        no_logprobs = self.watch.without_logprobs - before
        fallback = decided.get("text", 0) + decided.get("undecided", 0) > 0
        how = {"kind": "endpoint",
               "probabilities": "text fallback" if fallback else "token log-probs",
               "decided_by": decided, "replies_without_logprobs": no_logprobs}
        if no_logprobs:
            self._warn("the endpoint returned no log-probs")
        elif fallback:
            self._warn("no option letter among the log-probs the endpoint returned")
        return probs, how

    def _warn(self, why: str) -> None:
        """One log line per reason, the first time it happens."""
        if why in self._warned or self.log is None:
            return
        self._warned.add(why)
        self.log(f"judge {self.name}: {why}; reading its choice from the text instead (a hard "
                 f"0/1, or ½ when it names none, not a probability); records say "
                 f"'text fallback'")


# ---------------------------------------------------------------------------------------------
# Loading


def _runtime(runtime):
    from alignkit.engine.device import resolve_runtime
    return runtime if runtime is not None else resolve_runtime("auto", "auto")


def describe_source(source: ModelSource) -> str:
    """An endpoint's URL without credentials, ``embedded``, or the local name."""
    from alignkit.eval.compare import describe_source as describe
    return describe(source)


def _load_local(source: str | None, runtime):
    from alignkit.config.schema import ModelConfig
    from alignkit.models.load import load_causal_lm
    return load_causal_lm(ModelConfig(name_or_path=source), device=runtime.device)


def make_generator(name: str, source: ModelSource, sampling: Sampling, *, runtime=None,
                   loaded=None) -> Generator:
    """A generator for a parsed model spec; ``loaded`` = ``(model, tokenizer)`` already
    loaded for a local source."""
    if isinstance(source, Endpoint):
        return EndpointGenerator(source, name, sampling)
    rt = _runtime(runtime)
    model, tokenizer = loaded if loaded is not None else _load_local(source, rt)
    return LocalGenerator(model, tokenizer, name, sampling, source=describe_source(source),
                          runtime=rt)


def make_judge(name: str, source: ModelSource, *, template: str = "auto", batch_size: int = 8,
               runtime=None, loaded=None, log: Log | None = None) -> ChoiceJudge:
    """A :class:`ChoiceJudge` for a parsed model spec (``loaded`` as for
    :func:`make_generator`)."""
    from alignkit.eval.compare import EndpointJudge, LocalJudge
    if isinstance(source, Endpoint):
        watch = _WatchedEndpoint(source)
        return ChoiceJudge(EndpointJudge(watch, name), watch=watch, log=log)  # type: ignore
    rt = _runtime(runtime)
    model, tokenizer = loaded if loaded is not None else _load_local(source, rt)
    return ChoiceJudge(LocalJudge(model, tokenizer, name, template=template,
                                  batch_size=batch_size, runtime=rt), log=log)


def load_backends(model: tuple[str, ModelSource], sampling: Sampling, *,
                  judge: tuple[str, ModelSource] | None = None, runtime=None,
                  log: Log | None = None) -> tuple[Generator, ChoiceJudge | None]:
    """The generator and (if asked) the judge; a local model named by both loads once.
    Missing local paths fail before anything loads."""
    from alignkit.eval.compare import check_models
    check_models([model])
    if judge is not None:
        check_models([judge], field_name="judge")
    rt = _runtime(runtime)
    loaded = None if isinstance(model[1], Endpoint) else _load_local(model[1], rt)
    generator = make_generator(*model, sampling, runtime=rt, loaded=loaded)
    if judge is None:
        return generator, None
    shared = (loaded if loaded is not None and not isinstance(judge[1], Endpoint)
              and judge[1] == model[1] else None)
    return generator, make_judge(*judge, template=sampling.template,
                                 batch_size=sampling.batch_size, runtime=rt, loaded=shared,
                                 log=log)
