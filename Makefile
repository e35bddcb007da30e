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

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py --out $(OUT) $(if $(SOURCE),--source $(SOURCE),)

# Everything.  Without the full data sets beside the project (../shared/datasets,
# $KMEANS_DASK_SHARED or $KMEANS_DASK_DATA) the tests that need them are skipped,
# and the summary says so.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The same without the tests that start real `dask scheduler`/`dask worker` processes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not cluster" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_kmeans.py --source $(SHARED) --json benchmarks/results.json

clean:
	rm -rf $(OUT) .pytest_cache
