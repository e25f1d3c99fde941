"""Aggregate analysis of a preference file: what a reward model or DPO will learn from it.

Reports, for the pairs :func:`~alignkit.data.preference.load_preferences` keeps (a ranked list
counts as its K(K-1)/2 pairs, as reward training sees it):

- counts and drops from the loader's report (empty sides, identical sides, prompt mismatches);
- **length bias**: the fraction of pairs whose chosen response is longer, in characters and in
  tokens, with ties counted separately (fractions are over all pairs, so longer + shorter +
  ties = 1); a preference set where chosen is longer far more often than not teaches
  "longer is better" (verbosity);
- mean / median lengths of chosen and rejected (characters, words, tokens);
- token-length percentiles of prompts and completions as training tokenises them (the same
  template and end-of-turn token, :func:`~alignkit.data.preference.encode_completion`), and how
  many pairs ``max_length`` would truncate (prompt + longer completion > max_length, the rule
  of :func:`~alignkit.data.preference.tokenize_preferences`);
- duplicate prompts (whole prompt and first user turn), length ties, sides equal up to case
  and whitespace;
- the fraction of chosen and of rejected responses with structure, nuance and refusal markers
  (:mod:`alignkit.eval.text`);
- a template audit of the first pair: decoded prompt + chosen with special tokens shown, the
  BOS count, a doubled leading BOS, whether it ends with EOS.

:func:`write_outputs` writes ``analysis.json``, ``analysis.md`` and two PNG plots.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.data.preference import (PreferencePair, PreferenceReport, encode_completion,
                                      load_preferences, pairs_from_ranked)
from alignkit.eval.plots import pyplot, save_figure
from alignkit.eval.text import TextFeatures, text_features

PERCENTILES = (50, 90, 95, 99)
FEATURES = ("structure", "nuance", "refusal")
PLOT_FILES = {"lengths": "length_hist.png", "features": "feature_rates.png"}


@dataclass
class Analysis:
    """``summary`` is JSON-ready; ``lengths`` holds the per-pair series behind the plots
    (``chosen_chars``, ``rejected_chars`` and, with a tokenizer, ``prompt_tokens``,
    ``chosen_tokens``, ``rejected_tokens``)."""

    summary: dict
    lengths: dict[str, list[int]] = field(default_factory=dict)


def analyze_file(path: str, tokenizer=None, *, template: str = "auto", max_length: int = 512,
                 fmt: str = "auto") -> Analysis:
    """Load ``path`` (any preference format) and :func:`analyze_pairs` it."""
    items, report = load_preferences(path, fmt=fmt)
    pairs = [p for it in items
             for p in ([it] if isinstance(it, PreferencePair) else pairs_from_ranked(it))]
    analysis = analyze_pairs(pairs, tokenizer, template=template, max_length=max_length,
                             report=report)
    analysis.summary = {"path": str(path), **analysis.summary}
    return analysis


def analyze_pairs(pairs: list[PreferencePair], tokenizer=None, *, template: str = "auto",
                  max_length: int = 512, report: PreferenceReport | None = None) -> Analysis:
    """The analysis of ``pairs`` (token sections only with a ``tokenizer``)."""
    chosen = [text_features(p.chosen) for p in pairs]
    rejected = [text_features(p.rejected) for p in pairs]
    lengths = {"chosen_chars": [f.chars for f in chosen],
               "rejected_chars": [f.chars for f in rejected]}
    summary: dict = {"records": _records(report, len(pairs)), "pairs": len(pairs)}
    summary["length_bias"] = {"chars": length_bias(lengths["chosen_chars"],
                                                   lengths["rejected_chars"])}
    summary["lengths"] = {
        "chars": _side_stats(lengths["chosen_chars"], lengths["rejected_chars"]),
        "words": _side_stats([f.words for f in chosen], [f.words for f in rejected])}
    if tokenizer is not None:
        from alignkit.data.templates import resolve_template
        tmpl = resolve_template(template, tokenizer)
        tokens = _token_lengths(pairs, tokenizer, tmpl)
        lengths |= tokens
        summary["template"] = tmpl
        summary["length_bias"]["tokens"] = length_bias(tokens["chosen_tokens"],
                                                       tokens["rejected_tokens"])
        summary["lengths"]["tokens"] = _side_stats(tokens["chosen_tokens"],
                                                   tokens["rejected_tokens"])
        summary["token_percentiles"] = {k.removesuffix("_tokens"): percentiles(v)
                                        for k, v in tokens.items()}
        summary["truncation"] = truncation_count(tokens, max_length)
        summary["template_audit"] = template_audit(pairs[0], tokenizer, tmpl) if pairs else None
    summary["duplicates"] = duplicates(pairs)
    summary["features"] = feature_rates(chosen, rejected)
    return Analysis(summary, lengths)


def _records(report: PreferenceReport | None, pairs: int) -> dict:
    if report is None:
        return {"total": pairs, "kept": pairs, "dropped": {}, "summary": f"{pairs} pairs"}
    return {"total": report.total, "kept": report.kept, "dropped": dict(report.dropped),
            "prompt_mismatch": report.prompt_mismatch, "summary": report.summary()}


# ---------------------------------------------------------------- metrics


def length_bias(chosen: list[int], rejected: list[int]) -> dict:
    """Counts and fractions of pairs where chosen is longer, shorter, or as long (a tie).

    Fractions are over all pairs (None when there are none), so they sum to 1.
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen lengths but {len(rejected)} rejected")
    longer = sum(c > r for c, r in zip(chosen, rejected))
    shorter = sum(c < r for c, r in zip(chosen, rejected))
    ties = len(chosen) - longer - shorter
    n = len(chosen)
    frac = (lambda k: k / n) if n else (lambda k: None)
    return {"chosen_longer": longer, "chosen_shorter": shorter, "ties": ties,
            "frac_chosen_longer": frac(longer), "frac_chosen_shorter": frac(shorter),
            "frac_ties": frac(ties)}


def _side_stats(chosen: list[int], rejected: list[int]) -> dict:
    def stats(xs: list[int]) -> dict:
        if not xs:
            return {"mean": None, "median": None}
        return {"mean": statistics.fmean(xs), "median": statistics.median(xs)}
    return {"chosen": stats(chosen), "rejected": stats(rejected)}


def percentiles(values: list[int]) -> dict:
    """min, mean, the :data:`PERCENTILES` (linear interpolation) and max; {} when empty."""
    if not values:
        return {}
    import numpy as np
    arr = np.asarray(values, dtype=float)
    out = {"min": int(arr.min()), "mean": float(arr.mean())}
    out |= {f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}
    return out | {"max": int(arr.max())}


def _token_lengths(pairs: list[PreferencePair], tokenizer, template: str) -> dict[str, list[int]]:
    """Tokens of each prompt (with the template's generation prompt) and each completion (up
    to and including its end-of-turn token), exactly as preference training encodes them."""
    out: dict[str, list[int]] = {"prompt_tokens": [], "chosen_tokens": [],
                                 "rejected_tokens": []}
    for p in pairs:
        prompt_ids, chosen_ids = encode_completion(tokenizer, p.prompt, p.chosen, template,
                                                   source=p.source)
        _, rejected_ids = encode_completion(tokenizer, p.prompt, p.rejected, template,
                                            source=p.source)
        out["prompt_tokens"].append(len(prompt_ids))
        out["chosen_tokens"].append(len(chosen_ids))
        out["rejected_tokens"].append(len(rejected_ids))
    return out


def truncation_count(tokens: dict[str, list[int]], max_length: int) -> dict:
    """Pairs whose prompt + longer completion exceeds ``max_length`` (training truncates or
    drops them), and how many of those have a prompt alone that long."""
    totals = [p + max(c, r) for p, c, r in zip(tokens["prompt_tokens"], tokens["chosen_tokens"],
                                                tokens["rejected_tokens"])]
    over = sum(t > max_length for t in totals)
    return {"max_length": max_length, "pairs_over": over,
            "frac_over": over / len(totals) if totals else None,
            "prompt_alone_over": sum(p > max_length for p in tokens["prompt_tokens"]),
            "total_tokens": percentiles(totals)}


def _first_user_turn(p: PreferencePair) -> str:
    return next((m["content"] for m in p.prompt if m["role"] == "user"), "")


def duplicates(pairs: list[PreferencePair]) -> dict:
    """Repeated prompts (the whole prompt, and the first user turn alone), length ties are in
    :func:`length_bias`; sides equal up to case and whitespace (the loader drops exact ones)."""
    def repeats(keys: list) -> dict:
        counts = Counter(keys)
        dup = {k: n for k, n in counts.items() if n > 1}
        return {"distinct_repeated": len(dup), "pairs_in_repeats": sum(dup.values()),
                "max_repeats": max(dup.values(), default=1 if keys else 0)}

    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    return {"prompt": repeats([tuple((m["role"], m["content"]) for m in p.prompt)
                               for p in pairs]),
            "first_user_turn": repeats([_first_user_turn(p).strip() for p in pairs]),
            "near_identical_sides": sum(norm(p.chosen) == norm(p.rejected) for p in pairs)}


def feature_rates(chosen: list[TextFeatures], rejected: list[TextFeatures]) -> dict:
    """For each of structure, nuance, refusal: fraction of chosen and of rejected responses
    with it, and per-pattern counts (which rule fired)."""
    out = {}
    for name in FEATURES:
        side = {}
        for label, feats in (("chosen", chosen), ("rejected", rejected)):
            hits = [getattr(f, name) for f in feats]
            markers = Counter(m for f in feats for m in getattr(f, f"{name}_markers"))
            side[label] = {"count": sum(hits),
                           "frac": sum(hits) / len(hits) if hits else None,
                           "markers": dict(sorted(markers.items()))}
        out[name] = side
    return out


def template_audit(pair: PreferencePair, tokenizer, template: str) -> dict:
    """One tokenised sample (prompt + chosen) decoded with special tokens shown, and the checks
    that catch the classic template bugs: a doubled leading BOS (the tokenizer adding BOS to
    text that already has one), no EOS at the end (the model never learns to stop)."""
    prompt_ids, completion_ids = encode_completion(tokenizer, pair.prompt, pair.chosen,
                                                   template, source=pair.source)
    ids = prompt_ids + completion_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"template": template, "source": pair.source,
            "prompt_tokens": len(prompt_ids), "completion_tokens": len(completion_ids),
            "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "bos_count": ids.count(bos) if bos is not None else 0,
            "starts_with_bos": bos is not None and bool(ids) and ids[0] == bos,
            "double_leading_bos": bos is not None and ids[:2] == [bos, bos],
            "ends_with_eos": eos is not None and bool(ids) and ids[-1] == eos,
            "prompt_text": tokenizer.decode(prompt_ids, skip_special_tokens=False),
            "completion_text": tokenizer.decode(completion_ids, skip_special_tokens=False)}


# ---------------------------------------------------------------- outputs


def write_outputs(analysis: Analysis, out_dir: str | Path) -> dict[str, Path]:
    """``analysis.json``, ``analysis.md`` and the plots into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "analysis.json", "markdown": out / "analysis.md"}
    paths |= {k: out / v for k, v in PLOT_FILES.items()}
    plot_lengths(analysis, paths["lengths"])
    plot_feature_rates(analysis.summary, paths["features"])
    paths["json"].write_text(json.dumps(analysis.summary, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    paths["markdown"].write_text(render_markdown(analysis.summary), encoding="utf-8")
    return paths


def plot_lengths(analysis: Analysis, path: Path) -> None:
    """Histograms of chosen vs rejected length: characters, and tokens where measured."""
    plt = pyplot()
    units = [u for u in ("chars", "tokens") if f"chosen_{u}" in analysis.lengths]
    fig, axes = plt.subplots(1, len(units), figsize=(6 * len(units), 4), squeeze=False)
    for ax, unit in zip(axes[0], units):
        c, r = analysis.lengths[f"chosen_{unit}"], analysis.lengths[f"rejected_{unit}"]
        both = c + r
        bins = 40 if both and max(both) > 0 else 1
        ax.hist([c, r], bins=bins, label=["chosen", "rejected"], alpha=0.7)
        ax.set_xlabel(f"response length ({unit})")
        ax.set_ylabel("responses")
        ax.legend()
    fig.suptitle("Response length: chosen vs rejected")
    fig.tight_layout()
    save_figure(fig, path)


def plot_feature_rates(summary: dict, path: Path) -> None:
    """Grouped bars: fraction of chosen and of rejected with structure / nuance / refusal."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(FEATURES))
    for offset, side in ((-0.2, "chosen"), (0.2, "rejected")):
        ys = [summary["features"][f][side]["frac"] or 0.0 for f in FEATURES]
        ax.bar([x + offset for x in xs], ys, width=0.4, label=side)
    ax.set_xticks(list(xs), FEATURES)
    ax.set_ylabel("fraction of responses")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Text features: chosen vs rejected")
    fig.tight_layout()
    save_figure(fig, path)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def render_markdown(s: dict) -> str:
    """A human-readable report of a summary from :func:`analyze_pairs`."""
    lines = [f"# Preference data analysis: {s.get('path', '')}".rstrip(": "), "",
             f"- records: {s['records']['summary']}", f"- pairs analysed: {s['pairs']}"]
    if "template" in s:
        lines.append(f"- template: {s['template']}")
    lines += ["", "## Length bias (chosen vs rejected)", "",
              "| unit | chosen longer | chosen shorter | ties |", "| --- | ---: | ---: | ---: |"]
    for unit, b in s["length_bias"].items():
        lines.append(f"| {unit} | {b['chosen_longer']} ({_pct(b['frac_chosen_longer'])}) | "
                     f"{b['chosen_shorter']} ({_pct(b['frac_chosen_shorter'])}) | "
                     f"{b['ties']} ({_pct(b['frac_ties'])}) |")
    lines += ["", "| unit | chosen mean | chosen median | rejected mean | rejected median |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for unit, st in s["lengths"].items():
        c, r = st["chosen"], st["rejected"]
        lines.append(f"| {unit} | {_num(c['mean'])} | {_num(c['median'])} | "
                     f"{_num(r['mean'])} | {_num(r['median'])} |")
    if "token_percentiles" in s:
        lines += _token_section(s)
    d = s["duplicates"]
    lines += ["", "## Duplicates and ties", "",
              f"- repeated prompts: {d['prompt']['distinct_repeated']} prompts in "
              f"{d['prompt']['pairs_in_repeats']} pairs (max {d['prompt']['max_repeats']}x)",
              f"- repeated first user turns: {d['first_user_turn']['distinct_repeated']} in "
              f"{d['first_user_turn']['pairs_in_repeats']} pairs "
              f"(max {d['first_user_turn']['max_repeats']}x)",
              f"- sides equal up to case/whitespace: {d['near_identical_sides']}",
              f"- dropped by the loader: {s['records']['dropped'] or 'none'}"]
    lines += ["", "## Text features (fraction of responses)", "",
              "| feature | chosen | rejected |", "| --- | ---: | ---: |"]
    for name, f in s["features"].items():
        lines.append(f"| {name} | {_pct(f['chosen']['frac'])} | {_pct(f['rejected']['frac'])} |")
    if s.get("template_audit"):
        lines += _audit_section(s["template_audit"])
    return "\n".join(lines) + "\n"


def _token_section(s: dict) -> list[str]:
    keys = ["min", "mean", *(f"p{q}" for q in PERCENTILES), "max"]
    lines = ["", "## Token lengths (template applied)", "", "| part | " + " | ".join(keys) + " |",
             "| --- |" + " ---: |" * len(keys)]
    rows = dict(s["token_percentiles"]) | {"prompt+longer": s["truncation"]["total_tokens"]}
    for part, p in rows.items():
        lines.append(f"| {part} | " + " | ".join(_num(p.get(k)) for k in keys) + " |")
    t = s["truncation"]
    lines += ["", f"- max_length {t['max_length']}: {t['pairs_over']} pairs "
                  f"({_pct(t['frac_over'])}) would be truncated; {t['prompt_alone_over']} "
                  f"have a prompt alone over the limit"]
    return lines


def _audit_section(a: dict) -> list[str]:
    return ["", "## Template audit (first pair, prompt + chosen)", "",
            f"- template {a['template']}; BOS {a['bos_token']!r} x{a['bos_count']} "
            f"(starts with BOS: {a['starts_with_bos']}, doubled: {a['double_leading_bos']}); "
            f"ends with EOS {a['eos_token']!r}: {a['ends_with_eos']}"
            + (" (this chat template opens every turn with the BOS token, so one per message "
               "is expected)" if a["template"] == "chat" and a["bos_count"] > 1 else ""), "",
            "````text", a["prompt_text"] + a["completion_text"], "````"]
