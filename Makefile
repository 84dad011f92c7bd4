# Two commands a fresh machine with Python 3.11+ needs:
#   make demo   -- the main job (trains a model on bundled real data, prints the result)
#   make test   -- the full test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jaxbatch train --config configs/codesearch_clip.py --workdir runs/codesearch_clip

# Two pytest-xdist workers, one per core of the 2-core CI machine; compiled programs are shared
# through JAX's persistent compilation cache (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest tests -q -n 2

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check jaxbatch pallas_kernels tests scripts configs

clean:
	rm -rf $(VENV) .pytest_cache
