"""Memory soak (issue 8, part 5): does resident memory stay flat over a long CPU run of each stage?

Each stage (sft, reward, dpo, ppo) runs as the real CLI in its own process, on the tiny model
built in code (or the embedded SmolLM2-135M with ``--real``), with a metrics line every step,
an eval and a checkpoint every few dozen steps (PPO: a rollout every 2 updates), so every path
a long run takes repeats many times. This script polls the child's resident set size
(VmRSS, /proc or psutil) and the step it has reached (the tail of its metrics.jsonl), keeps
one sample per ``--every`` steps, and prints per stage:

- RSS at the first sample after the warm-up (``--warmup``, default 10% of the steps: the
  allocator's pools, lazily built kernels and the first checkpoint fill up there),
- RSS at the last sample and the peak,
- the slope of RSS over steps after the warm-up (least squares), in MB per 100 steps, and
  over the second half of those samples alone (a leak keeps its slope there; the allocator's
  settling flattens out),
- a verdict: ``flat`` when the slope is under ``--threshold`` MB per 100 steps, else ``GROWS``.

A leak of one retained autograd graph or batch per step costs the tiny model well over
1 MB per 100 steps; the default threshold (0.5) sits above the allocator's noise measured here.

    python benchmarks/soak.py                       # all four stages, ~1 minute each
    python benchmarks/soak.py --stages ppo --steps 5000 --every 50
    python benchmarks/soak.py --real --steps 300    # the embedded model (slow on a CPU)

Exit status 1 when a stage grows, 0 otherwise. Not a test: it needs minutes and a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "reward", "dpo", "ppo")
# Steps for about a minute per stage on the tiny model, one thread, on a shared laptop-class
# CPU (PPO's steps are slower: every second one makes a rollout).
DEFAULT_STEPS = {"sft": 5000, "reward": 1000, "dpo": 3500, "ppo": 800}
WORDS = "apple river stone cloud paper music green quiet table window light over".split()


def write_data(stage: str, folder: Path) -> Path:
    """A few dozen tiny examples of the stage's format (nothing downloaded)."""
    if stage == "sft":
        rows = [{"instruction": f"Add {a} and {b}.", "response": f"{a} plus {b} is {a + b}."}
                for a in range(8) for b in range(5)]
    elif stage in ("reward", "dpo"):
        rows = [{"prompt": f"Question {i}: {WORDS[i % 12]} {WORDS[(i * 5) % 12]}?",
                 "chosen": f"{WORDS[(i * 7) % 12]} thank you",
                 "rejected": f"{WORDS[(i * 3) % 12]} {WORDS[(i * 11) % 12]} no"}
                for i in range(48)]
    else:
        rows = [{"prompt": f"Say something about {w}."} for w in WORDS]
    path = folder / f"{stage}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command(stage: str, data: Path, out: Path, steps: int, real: bool,
            save_every: int, eval_every: int) -> list[str]:
    keys = {"data.path": data, "train.max_steps": steps, "train.precision": "fp32",
            "train.device": "cpu", "train.num_threads": 1, "train.progress": "false",
            "train.batch_size": 4, "train.lr": 1e-4 if real else 1e-3,
            "train.save_every": save_every, "train.keep_checkpoints": 2}
    if not real:
        keys["model.name_or_path"] = "tiny"
    if stage == "ppo":
        keys |= {"reward_fn": "alignkit.assets.rewards:positive_words", "rollout.prompts": 4,
                 "rollout.max_new_tokens": 16, "ppo_epochs": 2, "sample_every": 50}
    else:
        keys |= {"data.eval_fraction": 0.2, "train.eval_every": eval_every,
                 "data.max_length": 64, "data.template": "inst" if stage == "sft" else "plain"}
    argv = [sys.executable, "-m", "alignkit.cli.main", stage, "--output", str(out)]
    for k, v in keys.items():
        argv += ["--set", f"{k}={v}"]
    return argv


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (MiB), or None once it has exited."""
    try:
        import psutil
        try:
            return psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            return None
    except ImportError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(metrics: Path) -> int:
    """The step of the last complete training line of ``metrics`` (its tail only)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines[1:] if len(lines) > 1 else lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            return int(row["step"])
    return 0


def slope_per_100(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) over steps, times 100."""
    n = len(samples)
    if n < 2:
        return 0.0
    mx = sum(s for s, _ in samples) / n
    my = sum(r for _, r in samples) / n
    sxx = sum((s - mx) ** 2 for s, _ in samples)
    sxy = sum((s - mx) * (r - my) for s, r in samples)
    return 100 * sxy / sxx if sxx else 0.0


def soak(stage: str, args, work: Path) -> dict:
    steps = args.steps or DEFAULT_STEPS[stage]
    out = work / f"{stage}-run"
    argv = command(stage, write_data(stage, work), out, steps, args.real,
                   save_every=args.save_every, eval_every=args.eval_every)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               ALIGNKIT_CACHE=str(work / "cache"))
    log = open(work / f"{stage}.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples: list[tuple[int, float]] = []
    peak, next_at = 0.0, args.every
    while proc.poll() is None:
        rss = rss_mb(proc.pid)
        step = last_step(out / "metrics.jsonl")
        if rss is not None:
            peak = max(peak, rss)
            if step >= next_at:  # one sample per `every` steps
                samples.append((step, rss))
                next_at = (step // args.every + 1) * args.every
        time.sleep(args.poll)
    wall = time.monotonic() - t0
    log.close()
    if proc.returncode != 0:
        tail = (work / f"{stage}.log").read_text()[-2000:]
        raise SystemExit(f"{stage} failed (exit {proc.returncode}):\n{tail}")
    warmup = args.warmup if args.warmup is not None else steps // 10
    kept = [s for s in samples if s[0] >= warmup] or samples[-1:]
    slope = slope_per_100(kept)
    late = slope_per_100(kept[len(kept) // 2:])
    return {"stage": stage, "steps": steps, "wall_s": round(wall, 1), "samples": len(kept),
            "warm_step": kept[0][0], "rss_warm_mb": round(kept[0][1], 1),
            "end_step": kept[-1][0], "rss_end_mb": round(kept[-1][1], 1),
            "rss_peak_mb": round(peak, 1), "slope_mb_per_100": round(slope, 3),
            "late_slope_mb_per_100": round(late, 3),
            "verdict": "flat" if slope < args.threshold else "GROWS",
            "trace": [(s, round(r, 1)) for s, r in samples]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated, of " + ", ".join(STAGES))
    p.add_argument("--steps", type=int, help="steps per stage (default: ~1 minute each, tiny)")
    p.add_argument("--every", type=int, default=20, help="sample every k steps")
    p.add_argument("--warmup", type=int, help="steps before the first kept sample "
                                              "(default 10%% of the steps)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="MB per 100 steps above which a stage GROWS")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--poll", type=float, default=0.02, help="seconds between polls")
    p.add_argument("--real", action="store_true",
                   help="the embedded SmolLM2-135M instead of the tiny model")
    p.add_argument("--json", type=Path, help="also write the results (with traces) here")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    results = []
    print(f"{'stage':<7}{'steps':>7}{'wall s':>8}{'RSS warm MB':>13}{'RSS end MB':>12}"
          f"{'peak MB':>9}{'MB/100 steps':>14}{'2nd half':>10}  verdict", flush=True)
    with tempfile.TemporaryDirectory(prefix="alignkit-soak-") as tmp:
        for stage in stages:
            r = soak(stage, args, Path(tmp))
            results.append(r)
            print(f"{stage:<7}{r['steps']:>7}{r['wall_s']:>8}"
                  f"{r['rss_warm_mb']:>9} @{r['warm_step']:<4}{r['rss_end_mb']:>11}"
                  f"{r['rss_peak_mb']:>10}{r['slope_mb_per_100']:>13}"
                  f"{r['late_slope_mb_per_100']:>11}  {r['verdict']}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": "embedded" if args.real else "tiny",
                                         "threshold_mb_per_100": args.threshold,
                                         "results": results}, indent=1))
    return 1 if any(r["verdict"] != "flat" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
