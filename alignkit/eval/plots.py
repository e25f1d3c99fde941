"""Training curves of a run folder, drawn from what the run wrote (PNG, matplotlib, no window).

Every training stage writes ``metrics.jsonl`` (one record per logged step, ``eval/…`` records
for held-out evaluations); PPO/RLOO/GRPO also write ``rollouts.jsonl`` (one record per rollout:
score, KL, total reward, entropy, response length, the time split). :func:`plot_run` reads them
and draws, by stage:

- sft / pretrain: loss and held-out loss; token accuracy.
- reward: Bradley–Terry loss, accuracy and margin, train and held-out.
- dpo: the lesson lab's "DPO training dynamics": loss, implicit rewards of chosen and rejected,
  their margin, and the accuracy, train and held-out (TRL's metric names).
- ppo: per rollout the mean score, KL(policy‖reference), total reward and entropy, per update
  the clip fraction, approximate KL and value loss; and the reward–KL plane (score against KL,
  coloured by rollout), where the KL-regularised objective trades one for the other.

Curves are smoothed with an exponential moving average when there are many points (the raw
points stay visible, faded). Files are written through a temporary name, so a plot is either
complete or absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignkit.engine.metrics import read_metrics
from alignkit.io import atomic_path

# (title, [(metric key, label)]) panels per stage; a panel whose keys are all absent is skipped.
PANELS: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {
    "sft": [("loss", [("loss", "train"), ("eval/loss", "held-out")]),
            ("token accuracy", [("token_acc", "train"), ("eval/token_acc", "held-out")])],
    "reward": [("Bradley–Terry loss", [("loss", "train"), ("eval/loss", "held-out")]),
               ("accuracy (r_chosen > r_rejected)", [("accuracy", "train"),
                                                     ("eval/accuracy", "held-out")]),
               ("margin r_chosen − r_rejected", [("margin", "train"),
                                                 ("eval/margin", "held-out")])],
    "dpo": [("loss", [("loss", "train"), ("eval/loss", "held-out")]),
            ("implicit rewards β·log(π/π_ref)", [("rewards/chosen", "chosen"),
                                                 ("rewards/rejected", "rejected"),
                                                 ("eval/rewards/chosen", "chosen, held-out"),
                                                 ("eval/rewards/rejected", "rejected, held-out")]),
            ("reward margin", [("rewards/margins", "train"),
                               ("eval/rewards/margins", "held-out")]),
            ("reward accuracy", [("rewards/accuracies", "train"),
                                 ("eval/rewards/accuracies", "held-out")])],
    "ppo_rollouts": [("mean score", [("score", "score")]),
                     ("KL(policy ‖ reference)", [("kl", "KL per sequence")]),
                     ("total reward (score − β·KL)", [("total_reward", "total reward")]),
                     ("entropy", [("entropy", "per token")]),
                     ("response length", [("response_length", "tokens")]),
                     ("critic explained variance", [("explained_variance", "explained var.")])],
    "ppo": [("policy loss", [("policy_loss", "train")]),
            ("clip fraction", [("clip_frac", "policy"), ("value_clip_frac", "value")]),
            ("approximate KL (old → new)", [("approx_kl", "train")]),
            ("value loss", [("value_loss", "train")])],
}
PANELS["pretrain"] = PANELS["sft"]
SMOOTH_ABOVE = 40  # points: above this, draw an EMA over the faded raw curve


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window; safe on headless machines
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as PNG through a temporary file renamed into place; close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        pyplot().close(fig)
    return path


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, debiased as Adam's moments are (the start is not pulled to 0).

    s_t = (1 − α)·s_{t−1} + α·x_t, s_0 = 0, reported as s_t / (1 − (1 − α)^t).
    """
    out, s = [], 0.0
    for t, x in enumerate(values, start=1):
        s = (1 - alpha) * s + alpha * x
        out.append(s / (1 - (1 - alpha) ** t))
    return out


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r.get(x, len(xs)))
            ys.append(float(v))
    return xs, ys


def plot_panels(records: list[dict], panels, path: Path, *, title: str,
                x: str = "step") -> Path | None:
    """A grid of line panels (one per entry of ``panels`` with data); None when none has any."""
    present = [(t, [(k, lab) for k, lab in keys if _series(records, k, x)[1]])
               for t, keys in panels]
    present = [(t, keys) for t, keys in present if keys]
    if not present:
        return None
    plt = pyplot()
    cols = 2 if len(present) > 1 else 1
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    for ax, (panel_title, keys) in zip(axes.flat, present):
        for key, label in keys:
            xs, ys = _series(records, key, x)
            held_out = key.startswith("eval/")
            if held_out or len(ys) == 1:
                ax.plot(xs, ys, marker="o", linestyle="--" if held_out else "-", label=label)
            elif len(ys) > SMOOTH_ABOVE:
                line, = ax.plot(xs, ys, alpha=0.25)
                ax.plot(xs, ema(ys, 2 / (1 + len(ys) / 10)), color=line.get_color(),
                        label=f"{label} (EMA)")
            else:
                ax.plot(xs, ys, label=label)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reward_kl(points: list[dict], path: Path, *, title: str) -> Path | None:
    """Score against KL(policy‖reference), one point per rollout (or checkpoint, or β of a
    sweep), coloured by order, labelled where a ``label`` is given. None without points."""
    pts = [p for p in points if isinstance(p.get("kl"), (int, float))
           and isinstance(p.get("score"), (int, float))]
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    sc = ax.scatter([p["kl"] for p in pts], [p["score"] for p in pts],
                    c=list(range(len(pts))), cmap="viridis", s=22)
    ax.plot([p["kl"] for p in pts], [p["score"] for p in pts], alpha=0.2, color="grey")
    for p in pts:
        if p.get("label"):
            ax.annotate(str(p["label"]), (p["kl"], p["score"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="order (rollout)")
    ax.set_xlabel("KL(policy ‖ reference), nats per sequence")
    ax.set_ylabel("mean score")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_win_rates(win_rates: dict, path: Path, *, title: str) -> Path | None:
    """Bars: each model's mean win rate against the others, one group per judging method
    (``win_rates[method]["mean"]``: model → rate, as ``alignkit compare`` writes). A dashed line
    marks 50 %. None without rates."""
    methods = [(m, w["mean"]) for m, w in win_rates.items()
               if any(v is not None for v in w.get("mean", {}).values())]
    if not methods:
        return None
    plt = pyplot()
    models = list(methods[0][1])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(models) * len(methods)), 3.8))
    width = 0.8 / len(methods)
    for k, (method, means) in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(models))]
        ax.bar(xs, [means.get(m) or 0.0 for m in models], width=width,
               label=method.replace("_", " "))
    ax.axhline(0.5, linestyle="--", color="grey", linewidth=1)
    ax.set_xticks(list(range(len(models))), models)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean win rate vs the others")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run_stage(run_dir: Path) -> str | None:
    """The stage a run folder was written by (its config.yaml's ``stage``), or None."""
    import yaml
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return data.get("stage") if isinstance(data, dict) else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Draw a run folder's curves into ``out_dir`` (default ``<run>/plots``); name → path."""
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    stage = run_stage(run) or "sft"
    name = run.name
    metrics = read_metrics(run / "metrics.jsonl")
    made: dict[str, Path] = {}
    if stage == "ppo":
        rollouts = _read_jsonl(run / "rollouts.jsonl")
        algo = _config_value(run, "algo") or "ppo"
        p = plot_panels(rollouts, PANELS["ppo_rollouts"], out / "rollouts.png",
                        title=f"{name}: {algo} rollouts", x="rollout")
        if p:
            made["rollouts"] = p
        p = plot_reward_kl(rollouts, out / "reward_kl.png",
                           title=f"{name}: score vs KL, one point per rollout")
        if p:
            made["reward_kl"] = p
    p = plot_panels(metrics, PANELS.get(stage, PANELS["sft"]), out / "training.png",
                    title=f"{name}: DPO training dynamics" if stage == "dpo"
                    else f"{name}: {stage} training")
    if p:
        made["training"] = p
    return made


def _config_value(run: Path, key: str):
    import yaml
    try:
        data = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data.get(key) if isinstance(data, dict) else None
