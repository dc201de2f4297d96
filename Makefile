# fedcam: `make demo` runs the main job, `make test` runs the tests; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-serial test-fast test-basic-isa bench clean-runs

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

# Two streams at once. Run as one, the suite leaves the second core mostly idle (one-thread training, waits on
# child processes: 19 CPU-minutes in 21.5 wall-minutes). One stream holds the tests that start Ray (Simulation
# Engine runs, the Ray cluster): they must never overlap, as a local ray.init joins a `ray start` cluster beside
# it. The other stream holds every other test; a new test that starts Ray belongs in RAY_TESTS. Each stream
# trains with one thread (FEDCAM_TEST_THREADS): two 2-thread streams on 2 cores spin against each other.
RAY_TESTS := tests/test_federation.py tests/test_privacy.py tests/test_secure.py tests/test_compress.py \
	tests/test_camera_snapshots.py tests/test_dashboard.py tests/test_ray_cluster.py tests/test_scaffold.py \
	tests/test_ray_local.py
TEST_TMP ?= /tmp/fedcam-tests
test: setup /usr/bin/chromium
	@mkdir -p $(TEST_TMP)
	@export FEDCAM_TEST_THREADS=1 OMP_NUM_THREADS=1; \
	$(PY) -m pytest -q -p no:cacheprovider --basetemp=$(TEST_TMP)/other $(addprefix --ignore=,$(RAY_TESTS)) \
		> $(TEST_TMP)/other.log 2>&1 & other=$$!; \
	$(PY) -m pytest -q -p no:cacheprovider --basetemp=$(TEST_TMP)/ray $(RAY_TESTS); ray=$$?; \
	wait $$other; rest=$$?; echo "--- the other tests (beside them):"; cat $(TEST_TMP)/other.log; \
	echo "tests that start Ray: exit $$ray; the other tests: exit $$rest"; exit $$(( ray || rest ))

# One stream, as plain pytest runs them.
test-serial: setup /usr/bin/chromium
	$(PY) -m pytest -q

# The tests whose verdict rests on float arithmetic or a short training, again with PyTorch and oneDNN held to the
# most basic x86-64 kernels (another CPU's arithmetic): they must hold on any CPU, not only on this one. Where this
# CPU can hide instruction sets (simulations/isa_mask.py), onnxruntime's int8 kernels are held to AVX2's too.
test-basic-isa: setup
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 $(PY) simulations/isa_mask.py -- $(PY) -m pytest -q -m numerics

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) simulations/bench_foundation.py

clean-runs:
	rm -rf runs
