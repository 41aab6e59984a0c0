# Two commands do all set-up on a fresh machine: `make run` (main job) and `make test`.
# Both create .venv and install the package on first use; later calls reuse it (the stamp is
# rebuilt only when the dependency files change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp's name hashes the dependency files and the list of package files: adding a module
# must reinstall (the strict editable install links each file; Hydra's plugin scan does not see
# setuptools' default editable finder), editing one need not.
STAMP := $(VENV)/.installed-$(shell { cat setup.cfg pyproject.toml; ls autoft/*.py autoft/model_configs/*.json autoft/data_files/*.json \
	hydra_plugins/autoft_optuna_sweeper/*.py; } | md5sum | cut -c1-12)

.PHONY: install run table test test-slow test-faults-real lint clean-cache

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,postgres,launchers]' --config-settings editable_mode=strict
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m autoft.pipeline

table: $(STAMP)
	$(PY) benchmarks/paper.py wilds

# -n: pytest-xdist workers (one per core on the 2-core CI machine); tests marked xdist_group("name") share a worker
# (and so a module fixture); the 15 slowest tests are printed at the end.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15 -m "not slow" tests

# Tests marked slow (tests/test_learning.py: the full embedded world's learning effects, with its full pretraining):
# minutes, so outside make test; .ci/run runs them too.
test-slow: $(STAMP)
	$(PY) -m pytest -q --durations=5 -m slow tests

# The kill -9 rounds on the real fine-tuning app (tests/test_faults.py; make test runs them on a fake task): a few
# minutes, so outside make test; .ci/run runs both.
test-faults-real: $(STAMP)
	AUTOFT_FAULTS_REAL=1 $(PY) -m pytest -q tests/test_faults.py -k kill_9_at_random_moments

lint: $(STAMP)
	$(VENV)/bin/ruff check autoft hydra_plugins benchmarks tests

clean-cache:
	rm -rf $${AUTOFT_CACHE:-$$HOME/.cache/autoft}
