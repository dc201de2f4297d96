# fedcam: `make demo` runs the main job, `make test` runs the tests; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-fast test-basic-isa bench clean-runs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[full,test]'
	touch $@

setup: $(VENV)/.installed

# The dashboard test drives Debian's Chromium (Playwright uses it; it never downloads a browser).
/usr/bin/chromium:
	apt-get update -q && apt-get install -y -q chromium

demo: setup
	$(VENV)/bin/fedcam simulate --scenario simulations/scenarios/demo.toml --run-dir $(DEMO_DIR)

test: setup /usr/bin/chromium
	$(PY) -m pytest -q

# The tests whose verdict rests on float arithmetic or a short training, again with PyTorch and oneDNN held to the
# most basic x86-64 kernels (another CPU's arithmetic): they must hold on any CPU, not only on this one.
test-basic-isa: setup
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 $(PY) -m pytest -q -m numerics

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) simulations/bench_foundation.py

clean-runs:
	rm -rf runs
