# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv from requirements.lock when it is missing or older than the lock.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PIP_VERSION := 26.3
STAMP := $(VENV)/.installed
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
# Run with the virtual environment first on PATH, so dvc.yaml's `python` is the pinned one.
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: help .venv browser demo data release serve test check bench lock clean docs docs-serve

help:
	@echo "make demo   - set up .venv, generate the demo digits, run the whole pipeline (dvc repro)"
	@echo "make test   - set up .venv, run the test suite"
	@echo "make check  - lint and the fast tests (-m 'not slow'): the edit loop, in minutes"
	@echo "make release - copy build/serving/ to model/ and dvc add it (model.dvc)"
	@echo "make serve  - start the prediction service on 127.0.0.1:8000"
	@echo "make bench  - benchmarks against peer tools (results in bench/results/, figures in docs/benchmarks.md)"
	@echo "make docs   - build the documentation site into site/ (mkdocs build --strict)"
	@echo "make docs-serve - serve the documentation site on http://127.0.0.1:8001/, rebuilt on every edit"
	@echo "make .venv  - only create the virtual environment from requirements.lock"
	@echo "make browser - install Debian's headless Chromium for the browser tests (apt, when missing)"

.venv: $(STAMP)

# Rebuilt when requirements.lock changes, so a new pin (or a new tool such as ruff) is never missing.
$(STAMP): requirements.lock
	@test -n "$(PYTHON)" || { echo "make: no python3.11 found; run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || \
		{ echo "make: $(PYTHON) is not Python 3.11; run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check pip==$(PIP_VERSION)
	$(VENV)/bin/python -m pip install --quiet -r requirements.lock
	$(VENV)/bin/python -m pip check
	touch $@

# Re-resolve requirements.in into requirements.lock, then the service alone (pyproject.toml's base
# + [serve], no TensorFlow) into requirements-serve.lock at requirements.lock's versions
# (needs the package index; review the diffs).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check pip==$(PIP_VERSION)
	.venv-lock/bin/python -m pip install --quiet -r requirements.in
	{ sed -n 1,2p requirements.lock; .venv-lock/bin/python -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check pip==$(PIP_VERSION)
	.venv-lock/bin/python -m pip install --quiet -c requirements.lock -e '.[serve]'
	{ sed -n 1,2p requirements-serve.lock; .venv-lock/bin/python -m pip freeze --exclude-editable; } \
		> requirements-serve.lock.new
	mv requirements-serve.lock.new requirements-serve.lock
	rm -rf .venv-lock

# Generate the demo digits when data/ is missing, and cache them under data.dvc's hash
# (generation is byte-identical, so data.dvc does not change and `dvc status` stays clean).
data: $(STAMP)
	@test -e data || { $(RUN) python -m tools.demo_data --out data && $(RUN) dvc add -q data; }

# A failed stage (say, no model beats the baseline) still shows the summary of what did run.
demo: $(STAMP) data
	$(RUN) dvc repro || { $(RUN) python -m tools.summary; exit 1; }
	@$(RUN) python -m tools.summary
	@$(RUN) python -m tools.release

# Copy build/serving/ to model/ and `dvc add model` (model.dvc names the released model).
release: $(STAMP)
	$(RUN) python -m tools.release

# The prediction service on the released model (model/, else build/serving/).
serve: $(STAMP)
	$(RUN) python -m serve

# Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium; it never downloads its own).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update && \
		$(SUDO) apt-get install -y --no-install-recommends chromium; }

# Lint first (seconds), then the tests on three workers, a whole test file each (module fixtures
# stay in one process), in the order tests/conftest.py gives: the long files first. Three on two
# cores: much of a test's time is spent waiting (servers, subprocesses starting, a cluster), and a
# third worker fills it.
PYTEST := $(RUN) python -m pytest -n 3 --dist loadfile --no-loadscope-reorder
PYTEST_ARGS ?= --durations=20  # where the time went, at the end of every run (CI's log too)

test: $(STAMP) browser
	$(RUN) ruff check .
	$(PYTEST) $(PYTEST_ARGS)

# The edit loop: lint and every test but the slow ones (pipelines, training, clusters, new venvs).
check: $(STAMP) browser
	$(RUN) ruff check .
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

$(BENCH_STAMP):
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

# One shell, so every script records the same BENCH_RUN_ID (bench/provenance.py) in its results;
# bench.summary refuses results of different runs.
bench: $(STAMP) $(BENCH_STAMP)
	export BENCH_RUN_ID="$$(date -u +%Y%m%dT%H%M%SZ)-$$$$" && \
	$(RUN) python -m bench.download --img2dataset $(BENCH_VENV)/bin/img2dataset && \
	$(RUN) python -m bench.scale && \
	$(RUN) python -m bench.input_pipeline --img2dataset $(BENCH_VENV)/bin/img2dataset && \
	$(RUN) python -m bench.train && \
	$(RUN) python -m bench.serve && \
	$(RUN) python -m bench.summary --write docs/benchmarks.md

# The documentation site (mkdocs.yml, pages under docs/). --strict: a broken link or #anchor, or a
# page missing from nav, fails the build. Nothing is loaded from other hosts, search included.
docs: $(STAMP)
	$(RUN) NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(RUN) NO_MKDOCS_2_WARNING=1 mkdocs serve --strict --dev-addr 127.0.0.1:8001

clean:
	rm -rf .cache logs .pytest_cache
