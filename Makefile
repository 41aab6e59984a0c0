# Two commands do all set-up on a fresh machine: `make run` (main job) and `make test`.
# Both create .venv and install the package on first use; later calls reuse it (the stamp is
# rebuilt only when the dependency files change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.autoft-installed

.PHONY: install run test lint clean-cache

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) benchmarks/embedded_table.py

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check autoft benchmarks tests

clean-cache:
	rm -rf $${AUTOFT_CACHE:-$$HOME/.cache/autoft}
