# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,notebooks]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mttlite demo --out runs/demo

# The whole suite: library tests, notebooks executed by papermill, and nbval over the notebooks (CI sizes).
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests
	MTTLITE_CI=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --nbval-lax notebooks/

# The project's one GPU check (under 8 minutes on one GPU): tables in runs/gpu_check/gpu_check.md.
# Copy data/FashionMNIST/raw/*.gz beside the checkout first on a machine without network.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --device cuda --out runs/gpu_check

clean:
	rm -rf runs .pytest_cache

include notebooks/Makefile.inc
