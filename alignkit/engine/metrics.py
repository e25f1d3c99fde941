"""metrics.jsonl (rank 0, append-only, trimmed on resume) and the live progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsLog:
    """One JSON object per line. On resume, lines past the resumed step are dropped first so the
    file reads exactly as an uninterrupted run's would."""

    def __init__(self, path: Path, *, enabled: bool = True, resume_step: int = 0) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step > 0 and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:  # a line cut by a kill mid-write
                    continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        tmp.replace(path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                 for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class Progress:
    """A single refreshing status line on stderr: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, *, enabled: bool, start_step: int = 0, desc: str = "train"):
        self.total, self.enabled, self.desc = total, enabled and sys.stderr.isatty(), desc
        self.plain = enabled and not self.enabled  # not a terminal: print a line per update
        self.t0, self.s0 = time.perf_counter(), start_step

    def update(self, step: int, info: dict) -> None:
        if not (self.enabled or self.plain):
            return
        el = time.perf_counter() - self.t0
        rate = (step - self.s0) / el if el > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"{self.desc} {step}/{self.total}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()]
        parts.append(f"ETA {_fmt(eta)}")
        text = "  ".join(parts)
        if self.enabled:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
