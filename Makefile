# Quickstart: `make demo`, then `make test`. Both set up everything on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_STATE := $(CURDIR)/.sandbox-state/demo

.PHONY: setup test test-slow demo bench clean

# venv + editable install with test extras; Debian packages (root or sudo): libseccomp2 for the system-call
# filter, Mesa lavapipe for arch=vulkan; promtool (from Debian's prometheus package) for deploy/prometheus.
$(STAMP): pyproject.toml
	./scripts/install-system-deps.sh || echo "warning: libseccomp2 or Mesa lavapipe not installed: jobs are rejected unless [sandbox] syscall_filter = \"off\"; vulkan tests are skipped"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	./scripts/install-promtool.sh $(VENV)/bin || echo "warning: promtool not installed: the checks of deploy/prometheus are skipped"
	touch $(STAMP)

setup: $(STAMP)

# make test: all but the long tail (under 10 min); make test-slow: exactly that tail. CI runs both (.ci/run).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not soak"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or soak"

demo: $(STAMP)
	TAICHI_SANDBOX_LIMITS=limits.toml XDG_STATE_HOME=$(DEMO_STATE) $(PY) examples/demo.py

bench: $(STAMP)
	$(PY) -m compileall -q sandbox  # byte-compiled, as an installed package is (PYTHONDONTWRITEBYTECODE may be set)
	$(PY) benchmarks/run.py $(BENCH_ARGS)  # e.g. make bench BENCH_ARGS="--only cli_cold"

clean:
	rm -rf $(VENV) .sandbox-state .pytest_cache
