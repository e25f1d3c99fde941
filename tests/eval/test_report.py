"""Plots and the HTML/markdown report of run folders: real tiny runs in, self-contained HTML
with decodable PNGs out; a headless browser (where Chromium is installed) loads every image."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from alignkit.config import DPOConfig, SFTConfig, build_config
from alignkit.errors import InputError
from alignkit.eval.plots import ema, plot_panels, plot_reward_kl, plot_run
from alignkit.eval.report import demote_headings, find_stage_dirs, write_report

PNG = b"\x89PNG\r\n\x1a\n"
PAIRS = [{"prompt": f"Add {a} and {b}.", "chosen": f"{a} plus {b} is {a + b}.",
          "rejected": "No."} for a in range(6) for b in range(4)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder holding a finished SFT run and a finished DPO run on the tiny model."""
    from alignkit.stages import dpo, sft
    root = tmp_path_factory.mktemp("pipeline")
    pairs = _jsonl(root / "pairs.jsonl", PAIRS)
    sft_data = _jsonl(root / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                           for p in PAIRS])
    common = {"model.name_or_path": "tiny", "train.batch_size": 8, "train.max_steps": 6,
              "train.precision": "fp32", "train.progress": False, "train.log_every": 1,
              "data.eval_fraction": 0.25, "train.eval_every": 3, "train.num_threads": 1}
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGNKIT_CACHE", str(root / "cache"))
    try:
        sft.run(build_config(SFTConfig, overrides=common | {
            "data.path": str(sft_data), "output": str(root / "runs" / "1-sft"),
            "train.lr": 1e-3}), log=lambda *_: None)
        dpo.run(build_config(DPOConfig, overrides=common | {
            "data.path": str(pairs), "output": str(root / "runs" / "2-dpo"),
            "train.lr": 2e-3, "beta": 0.5}), log=lambda *_: None)
    finally:
        mp.undo()
    return root / "runs"


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_report_is_self_contained_with_every_stage_figures_and_curves(runs, tmp_path):
    out = write_report(runs, tmp_path / "report")
    html = Path(out["html"]).read_text(encoding="utf-8")
    assert [s["name"] for s in out["sections"]] == ["1-sft", "2-dpo"]
    images = _images(html)
    assert len(images) == 2 and all(img.startswith(PNG) and len(img) > 5000 for img in images)
    assert [list(s["images"]) for s in out["sections"]] == [["training"], ["training"]]
    dpo_sec = out["sections"][1]
    figures = dict(dpo_sec["figures"])
    assert {"held-out reward accuracy", "held-out reward margin", "examples/s",
            "peak resident memory (GB)", "optimizer steps"} <= set(figures)
    assert figures["optimizer steps"] == "6"
    # Nothing refers outside the file: no src/href other than data: URIs and in-page anchors.
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html)
    assert "config.yaml" in html and "stage: dpo" in html  # the exact config, escaped
    md = Path(out["markdown"]).read_text(encoding="utf-8")
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (Path(out["markdown"]).parent / link).read_bytes().startswith(PNG)
    assert "| held-out loss |" in md


def test_dpo_curves_come_from_the_metrics_the_run_wrote(runs, tmp_path):
    made = plot_run(runs / "2-dpo", tmp_path)
    assert set(made) == {"training"} and made["training"].read_bytes().startswith(PNG)
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary name, renamed


def test_unfinished_stage_is_reported_as_such_and_bad_folders_fail_in_one_line(runs, tmp_path):
    half = tmp_path / "runs" / "3-reward"
    half.mkdir(parents=True)
    (half / "config.yaml").write_text("stage: reward\n")
    _jsonl(half / "metrics.jsonl", [{"loss": 0.7, "accuracy": 0.5, "step": 1},
                                    {"loss": 0.6, "accuracy": 0.6, "step": 2}])
    out = write_report(tmp_path / "runs")
    sec = out["sections"][0]
    assert not sec["finished"] and dict(sec["figures"])["status"].endswith("step 2)")
    assert "has not finished" in Path(out["html"]).read_text(encoding="utf-8")
    with pytest.raises(InputError, match="no such directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no stage found"):
        write_report(tmp_path / "empty")


def test_find_stage_dirs_nests_two_levels_and_not_inside_a_stage(tmp_path):
    for rel in ("a/config.yaml", "a/checkpoints/x/config.yaml", "b/sub/analysis.json",
                "c/d/e/config.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    assert find_stage_dirs(tmp_path) == [tmp_path / "a", tmp_path / "b" / "sub"]


def test_ema_is_debiased_and_tracks_a_constant_exactly():
    assert ema([3.0, 3.0, 3.0], 0.1) == pytest.approx([3.0, 3.0, 3.0])
    # s1 = 0.5·1 = 0.5 → 0.5/0.5 = 1; s2 = 0.25 + 0.5·3 = 1.75 → 1.75/0.75
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 1.75 / 0.75])


def test_panels_skip_absent_metrics_and_reward_kl_needs_points(tmp_path):
    assert plot_panels([{"step": 1, "other": 1.0}], [("loss", [("loss", "train")])],
                       tmp_path / "x.png", title="t") is None
    assert plot_reward_kl([{"rollout": 0}], tmp_path / "rk.png", title="t") is None
    pts = [{"kl": 0.1 * i, "score": 0.05 * i, "label": f"β={i}" if i == 3 else None}
           for i in range(6)]
    assert plot_reward_kl(pts, tmp_path / "rk.png", title="t").read_bytes().startswith(PNG)


def test_embedded_markdown_headings_nest_but_code_fences_are_left_alone():
    md = "# Title\ntext\n````text\n# not a heading\n````\n## Sub"
    assert demote_headings(md) == "### Title\ntext\n````text\n# not a heading\n````\n#### Sub"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs it "
                                             "from the OS packages where it can)")
def test_report_opens_in_a_headless_browser_with_every_image_decoded(runs, tmp_path):
    out = write_report(runs, tmp_path / "report")
    html = Path(out["html"])
    shot = tmp_path / "shot.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--virtual-time-budget=5000"]
    dom = subprocess.run(common + ["--dump-dom", html.as_uri()], capture_output=True,
                         text=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-images="(\d+)"', body.group(0))
    assert loaded and total and int(total.group(1)) == 2 and loaded.group(1) == total.group(1)
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,2400", html.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 20_000


def test_compare_and_eval_outputs_join_the_report_with_win_rates_and_the_frontier(tmp_path):
    from alignkit.eval.compare import build_result, write_outputs
    from alignkit.models.tiny import tiny_tokenizer
    root = tmp_path / "pipeline"
    answers = {"base": ["No.", "I can't help with that."], "dpo": ["Sure: 1. a 2. b", "Yes."]}
    result = build_result(["p1", "p2"], answers, tokenizer=tiny_tokenizer(),
                          rm_scores={"base": [0.1, 0.2], "dpo": [0.5, 0.0]})
    write_outputs(result, root / "compare")
    for name, kl, score in (("eval-beta0.1", 2.0, 0.4), ("eval-beta0.5", 0.5, 0.2)):
        (root / name).mkdir(parents=True)
        (root / name / "eval.json").write_text(json.dumps(
            {"kl": {"mean": kl}, "models": {"policy": {"reward": {"mean": score}}}}))
        (root / name / "eval.md").write_text(f"# Alignment tax\n\n| KL | {kl} |\n")
    out = write_report(root)
    kinds = [(s["name"], s["kind"]) for s in out["sections"]]
    assert kinds == [("compare", "compare"), ("eval-beta0.1", "eval"), ("eval-beta0.5", "eval"),
                     ("reward–KL frontier", "frontier")]
    assert list(out["sections"][0]["images"]) == ["win_rates"]
    frontier = out["sections"][-1]
    assert "| eval-beta0.5 | 0.500 | 0.200 |" in frontier["markdown"]
    html = Path(out["html"]).read_text(encoding="utf-8")
    assert len(_images(html)) == 2 and "Alignment tax" in html
    assert "### Alignment tax" in Path(out["markdown"]).read_text(encoding="utf-8")
