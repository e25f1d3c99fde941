"""``alignkit report RUN``: one self-contained HTML page and a markdown summary of a run folder.

A run folder is either one stage's folder (it holds ``config.yaml``) or a folder of stage
folders (a pipeline). Per stage the report shows: whether it finished, its headline figures from
``DONE`` (last training metrics, held-out metrics, throughput, peak memory, wall time), its
curves (:mod:`alignkit.eval.plots`), its data report and its exact config. Folders written by
``alignkit analyze`` (``analysis.json``), ``alignkit compare`` (``compare.json``: the side-by-side
table and win-rate bars) and ``alignkit eval`` (``eval.json``: the alignment-tax table) are
included; two or more eval results with a KL and a reward score add the reward–KL frontier.

The HTML inlines every image as a base64 ``data:`` URI, so the one file can be mailed or
archived; the markdown links the PNGs next to it. Both are written through temporary files.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from alignkit.errors import InputError
from alignkit.io import atomic_write_text
from alignkit.eval.plots import plot_run, run_stage

# Headline figures per stage: (key in DONE's "train" or "eval" record, label).
HEADLINES = {
    "sft": [("loss", "train loss"), ("eval/loss", "held-out loss"),
            ("eval/token_acc", "held-out token accuracy")],
    "reward": [("loss", "train loss"), ("accuracy", "train accuracy"),
               ("eval/accuracy", "held-out accuracy"), ("eval/margin", "held-out margin"),
               ("eval/reward_mean", "held-out reward mean"),
               ("eval/reward_std", "held-out reward std")],
    "dpo": [("loss", "train loss"), ("rewards/accuracies", "train reward accuracy"),
            ("rewards/margins", "train reward margin"),
            ("eval/rewards/accuracies", "held-out reward accuracy"),
            ("eval/rewards/margins", "held-out reward margin"), ("eval/loss", "held-out loss")],
    "ppo": [("loss", "last update loss"), ("approx_kl", "approx KL"),
            ("clip_frac", "clip fraction"), ("value_loss", "value loss")],
}
HEADLINES["pretrain"] = HEADLINES["sft"]


SECTION_FILES = ("config.yaml", "analysis.json", "compare.json", "eval.json")
CAI_LOGS = ("revisions.jsonl", "feedback.jsonl")  # with summary.json: a `cai` output folder


def _is_cai(folder: Path) -> bool:
    return (folder / "summary.json").is_file() and any((folder / n).is_file() for n in CAI_LOGS)


def _is_section(folder: Path) -> bool:
    return any((folder / name).is_file() for name in SECTION_FILES) or _is_cai(folder)


def find_stage_dirs(run: Path, depth: int = 2) -> list[Path]:
    """``run`` itself when it is a stage (or analysis) folder, else such folders below it, up
    to ``depth`` levels down, in sorted order (a stage's own subfolders are not searched)."""
    if _is_section(run):
        return [run]
    if depth == 0:
        return []
    return [found for sub in sorted(p for p in run.iterdir() if p.is_dir())
            for found in find_stage_dirs(sub, depth - 1)]


def _load_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _output_section(folder: Path, kind: str, plots_dir: Path) -> dict:
    """A folder written by ``alignkit compare`` or ``alignkit eval``: its markdown table(s),
    and for a comparison the win-rate bars."""
    data = _load_json(folder / f"{kind}.json") or {}
    md = folder / f"{kind}.md"
    images = {}
    if kind == "compare":
        from alignkit.eval.plots import plot_win_rates
        bars = plot_win_rates(data.get("win_rates") or {}, plots_dir / folder.name /
                              "win_rates.png", title=f"{folder.name}: win rates")
        if bars:
            images["win_rates"] = str(bars)
    return {"name": folder.name, "kind": kind, "path": str(folder),
            "markdown": md.read_text(encoding="utf-8") if md.is_file() else "",
            "images": images, "data": data}


def stage_section(folder: Path, plots_dir: Path) -> dict:
    """Everything the report shows of one folder, as plain data (also the ``--json`` output)."""
    if not (folder / "config.yaml").is_file():
        for kind in ("compare", "eval"):
            if (folder / f"{kind}.json").is_file():
                return _output_section(folder, kind, plots_dir)
    if _is_cai(folder) and not (folder / "config.yaml").is_file():
        return _cai_section(folder)
    if (folder / "analysis.json").is_file() and not (folder / "config.yaml").is_file():
        images = {p.stem: p for p in sorted(folder.glob("*.png"))}
        name = folder.name if folder.parent == folder else f"{folder.parent.name}/{folder.name}"
        md = folder / "analysis.md"
        return {"name": name, "kind": "analysis", "path": str(folder),
                "markdown": md.read_text(encoding="utf-8") if md.is_file() else "",
                "images": {k: str(v) for k, v in images.items()}}
    stage = run_stage(folder) or "unknown"
    done = _load_json(folder / "DONE")
    images = plot_run(folder, plots_dir / folder.name)
    figures = []
    if done:
        train, evals = done.get("train") or {}, done.get("eval") or {}
        for key, label in HEADLINES.get(stage, []):
            if key in evals:
                figures.append((label, _fmt(evals[key])))
            elif key in train:  # one logging window, not the whole run: say so
                figures.append((f"{label} (last logged step)", _fmt(train[key])))
        for key, label in (("examples_per_s", "examples/s"), ("tokens_per_s", "tokens/s")):
            value = (done.get("throughput") or {}).get(key)
            if value:
                figures.append((label, _fmt(value)))
        if (mem := (done.get("peak_memory") or {}).get("rss_gb")) is not None:
            figures.append(("peak resident memory (GB)", _fmt(mem)))
        figures += [("optimizer steps", _fmt(done.get("steps"))),
                    ("wall time (s)", _fmt(done.get("wall_s")))]
    else:
        from alignkit.engine.metrics import read_metrics
        logged = [r["step"] for r in read_metrics(folder / "metrics.jsonl") if "step" in r]
        figures.append(("status", f"unfinished (last logged step {max(logged)})" if logged
                        else "unfinished (no step logged)"))
    config = folder / "config.yaml"
    data_report = _load_json(folder / "data_report.json")
    return {"name": folder.name, "kind": "stage", "stage": stage, "path": str(folder),
            "finished": done is not None, "figures": figures,
            "images": {k: str(v) for k, v in images.items()},
            "config": config.read_text(encoding="utf-8") if config.is_file() else "",
            "data_report": data_report}


def _cai_section(folder: Path, shown: int = 3) -> dict:
    """A ``cai revise`` / ``cai feedback`` folder: its counts and its first few records
    (prompt, initial answer, critique, revision; or the two answers and the label)."""
    summary = _load_json(folder / "summary.json") or {}
    lines = [f"- prompts: {summary.get('prompts')}", f"- SFT examples: "
             f"{summary.get('sft_examples', '—')}", f"- preference pairs: "
             f"{summary.get('preference_pairs')}"]
    log = next(folder / n for n in CAI_LOGS if (folder / n).is_file())
    for raw in log.read_text(encoding="utf-8").splitlines()[:shown]:
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        flat = lambda text: " ".join(str(text).split())  # noqa: E731 (one list item each)
        lines += ["", f"**{flat(rec.get('prompt', ''))}**", ""]
        if "initial" in rec:
            lines.append(f"- initial: {flat(rec['initial'])}")
            for r in rec.get("rounds", []):
                lines += [f"- critique ({r.get('principle')}): {flat(r.get('critique'))}",
                          f"- revision: {flat(r.get('revision'))}"]
        else:
            lines += [f"- answer {i + 1}: {flat(a)}"
                      for i, a in enumerate(rec.get("answers", []))]
            lines.append(f"- P(answer 1 better): {rec.get('p_first_better')}")
    return {"name": folder.name, "kind": "cai", "path": str(folder),
            "markdown": "\n".join(lines), "images": {}}


def reward_kl_section(sections: list[dict], plots_dir: Path) -> dict | None:
    """The reward–KL frontier across ``alignkit eval`` results that carry both a KL and a
    reward-model score (one point per policy: e.g. a sweep of β or a run's checkpoints)."""
    from alignkit.eval.plots import plot_reward_kl
    points = []
    for s in sections:
        if s["kind"] != "eval":
            continue
        d = s["data"]
        reward = ((d.get("models") or {}).get("policy") or {}).get("reward") or {}
        kl = (d.get("kl") or {}).get("mean")
        if kl is not None and reward.get("mean") is not None:
            points.append({"kl": kl, "score": reward["mean"], "label": s["name"]})
    if len(points) < 2:
        return None
    points.sort(key=lambda p: p["kl"])
    path = plot_reward_kl(points, plots_dir / "reward_kl_frontier.png",
                          title="reward–KL frontier: mean reward-model score vs KL(policy‖ref)")
    rows = "\n".join(f"| {p['label']} | {p['kl']:.3f} | {p['score']:.3f} |" for p in points)
    return {"name": "reward–KL frontier", "kind": "frontier", "path": str(plots_dir),
            "markdown": "| policy | KL (nats/answer) | mean score |\n| --- | --- | --- |\n" + rows,
            "images": {"reward_kl": str(path)}}


def _img_html(path: str, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" '
            f'style="max-width:100%">')


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .7em;
text-align:left}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
.unfinished{color:#b00}"""


def render_html(title: str, sections: list[dict]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append("<ul>" + "".join(f"<li><a href='#s{i}'>{html.escape(s['name'])}</a> "
                                  f"({html.escape(s.get('stage', s['kind']))})</li>"
                                  for i, s in enumerate(sections)) + "</ul>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s['name'])}"
                     f" — {html.escape(s.get('stage', s['kind']))}</h2>")
        if s["kind"] in ("analysis", "compare", "eval", "frontier", "cai"):
            parts.append(f"<pre>{html.escape(s['markdown'])}</pre>")
        else:
            if not s["finished"]:
                parts.append("<p class='unfinished'>This stage has not finished.</p>")
            parts.append("<table>" + "".join(
                f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                for k, v in s["figures"]) + "</table>")
        for name, path in s["images"].items():
            parts.append(_img_html(path, f"{s['name']} {name}"))
        if s.get("data_report"):
            parts.append("<details><summary>data report</summary><pre>"
                         + html.escape(json.dumps(s["data_report"], indent=2))
                         + "</pre></details>")
        if s.get("config"):
            parts.append("<details><summary>config.yaml</summary><pre>"
                         + html.escape(s["config"]) + "</pre></details>")
    # On load, count the images that decoded: a headless browser can read it back from the DOM
    # (<body data-images-loaded="n" data-images="m">), which is how the tests check the page.
    parts.append("<script>window.addEventListener('load',function(){var i=document.images,n=0;"
                 "for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0)n++;}"
                 "document.body.dataset.imagesLoaded=n;document.body.dataset.images=i.length;"
                 "});</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def demote_headings(markdown: str, levels: int = 2) -> str:
    """Push every ATX heading of ``markdown`` down ``levels`` levels (not inside code fences),
    so an embedded document nests under the report's own headings."""
    out, fence = [], None
    for line in markdown.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            mark = stripped[:3]
            run = len(stripped) - len(stripped.lstrip(mark[0]))
            if fence is None:
                fence = mark[0] * run
            elif stripped.startswith(fence) and not stripped[len(fence):].strip():
                fence = None
        elif fence is None and line.startswith("#"):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def render_markdown(title: str, sections: list[dict], base: Path) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s['name']} — {s.get('stage', s['kind'])}", ""]
        if s["kind"] in ("analysis", "compare", "eval", "frontier", "cai"):
            lines += [demote_headings(s["markdown"].strip()), ""]
        else:
            if not s["finished"]:
                lines += ["**This stage has not finished.**", ""]
            lines += ["| figure | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in s["figures"]] + [""]
        for name, path in s["images"].items():
            lines += [f"![{s['name']} {name}]({os.path.relpath(path, base)})", ""]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *,
                 stages: list[Path] | None = None) -> dict:
    """Write ``report.html`` and ``report.md`` (and the plots) for ``run_dir`` into ``out_dir``
    (default: ``run_dir``). Returns the paths and the sections' data. ``stages``: the stage
    folders in the order to show them (a pipeline's order), instead of searching ``run_dir``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError("not a run folder (no such directory)", path=str(run_dir))
    sections_dirs = (find_stage_dirs(run) if stages is None
                     else [d for d in stages if _is_section(Path(d))])
    if not sections_dirs:
        raise InputError("no stage found: expected config.yaml (a stage's run folder), "
                         "analysis.json, or subfolders holding them", path=str(run_dir))
    out = Path(out_dir) if out_dir is not None else run
    out.mkdir(parents=True, exist_ok=True)
    plots_dir = out / "plots"
    sections = [stage_section(d, plots_dir) for d in sections_dirs]
    frontier = reward_kl_section(sections, plots_dir)
    if frontier:
        sections.append(frontier)
    title = f"alignkit report: {run.resolve().name}"
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, render_html(title, sections))
    atomic_write_text(md_path, render_markdown(title, sections, out))
    return {"html": str(html_path), "markdown": str(md_path), "sections": sections}
