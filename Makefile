# Single entry point.  `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= outputs
# The full data sets, when they sit beside the project; otherwise the demo uses
# $KMEANS_DASK_DATA, Debian's package, the bundled test splits or a download.
SHARED ?= ../shared/datasets
SOURCE ?= $(if $(wildcard $(SHARED)/mnist),$(SHARED),)
PYTEST_ARGS ?=
# Test processes run at once (pytest-xdist); each module's tests stay in one of
# them (--dist loadfile), so its shared cluster and stores are made once.
# TEST_JOBS=0 runs every test in pytest's own process.
TEST_JOBS ?= 2

.PHONY: install compiled demo test test-fast bench bench-scaling bench-minibatch clean

# uv resolves and downloads in parallel: the install takes a minute rather than
# several, with the same versions pip picks.  Where uv cannot be had, pip does it.
# Both write the bytecode at install time: where PYTHONDONTWRITEBYTECODE is set,
# every process (each job, worker and test) would otherwise compile the whole
# stack again as it imports it, seconds each.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	( $(BIN)/python -m pip install --quiet --disable-pip-version-check uv \
	  && $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -e '.[test]' ) \
	  || $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The project's own modules, which the editable install leaves as sources, and
# the compiled loops of the bounded pass (Numba's cache, beside the sources),
# made once here rather than by every process that starts before the cache
# exists.  Only what changed since the last run is compiled again.
compiled: $(STAMP)
	@$(BIN)/python -m compileall -q kmeans_dask jobs
	@$(BIN)/python -c "import numpy as np; from kmeans_dask import _kernels; \
	  [_kernels.warm_up(t) for t in (np.uint8, np.float32, np.float64)]"

install: $(STAMP)

demo: compiled
	$(BIN)/python jobs/demo.py --out $(OUT) $(if $(SOURCE),--source $(SOURCE),)

# Everything.  Without the full data sets beside the project (../shared/datasets,
# $KMEANS_DASK_SHARED or $KMEANS_DASK_DATA) the tests that need them are skipped,
# and the summary says so.
test: compiled
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

# The same without the tests that start real `dask scheduler`/`dask worker` processes.
test-fast: compiled
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile -m "not cluster" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_kmeans.py --source $(SHARED) --json benchmarks/results.json

# kmeans-dask beside oneDAL, scikit-learn and FAISS at 70k and 1.4M rows (stores in $(OUT)).
bench-scaling: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/bench_scaling.py --source $(SHARED) --sizes 1400000 --ks 64 \
		--json benchmarks/results-scaling-1.4m.json
	$(BIN)/python benchmarks/bench_scaling.py --source $(SHARED) --sizes 70000 --ks 10,256 \
		--json benchmarks/results-scaling-70k.json

# kmeans-dask's MiniBatchKMeans beside scikit-learn's on Fashion-MNIST's 70,000 rows.
bench-minibatch: $(STAMP)
	$(BIN)/python benchmarks/bench_minibatch.py --source $(SHARED) --json benchmarks/results-minibatch.json

clean:
	rm -rf $(OUT) .pytest_cache
