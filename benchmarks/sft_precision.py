"""SFT throughput and peak memory on the embedded SmolLM2-135M: bf16 autocast vs fp32, one run.

    .venv/bin/python benchmarks/sft_precision.py [--steps 12] [--repeats 2]

Each configuration trains in its own process (alternating, `--repeats` times) on the shipped
demo instruction set, batch 8, full fine-tuning; tokens/s are non-pad tokens per second over
the steps after the first two (warm-up), read from the run's metrics.jsonl; peak memory is the
child's maximum resident set size. Prints medians and the bf16/fp32 ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(precision: str, steps: int, out: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "alignkit.cli.main", "sft", "--output", str(out),
           "--max-steps", str(steps), "--batch-size", "8", "--precision", precision,
           "--template", "inst", "--set", "train.progress=false", "--set", "data.eval_fraction=0",
           "--set", "train.warmup_steps=0", "--overwrite"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{precision} run failed: {proc.stderr.read().decode()[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    return statistics.median(rates), usage.ru_maxrss / 1024  # KiB → MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"bf16": [], "fp32": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for precision in ("bf16", "fp32"):
                tps, rss = one_run(precision, args.steps, Path(tmp) / precision)
                results[precision].append((tps, rss))
                print(f"repeat {r + 1} {precision}: {tps:.0f} tokens/s, peak RSS {rss:.0f} MiB",
                      flush=True)
    med = {p: (statistics.median(x[0] for x in v), max(x[1] for x in v))
           for p, v in results.items()}
    spread = {p: (min(x[0] for x in v), max(x[0] for x in v)) for p, v in results.items()}
    print("\n| precision | tokens/s (median) | range | peak RSS MiB |\n| --- | --- | --- | --- |")
    for p, (tps, rss) in med.items():
        print(f"| {p} | {tps:.0f} | {spread[p][0]:.0f}–{spread[p][1]:.0f} | {rss:.0f} |")
    print(f"\nbf16/fp32 throughput ratio: {med['bf16'][0] / med['fp32'][0]:.2f}x; "
          f"memory ratio: {med['bf16'][1] / med['fp32'][1]:.2f}x")


if __name__ == "__main__":
    main()
