"""Shared tiny fixtures: a small embedded world and a briefly pretrained tiny CLIP, per session."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from tests import hydra_cache

hydra_cache.install()  # Hydra parses each config file once per process (tests/hydra_cache.py)

TINY_WORLD = {"n_train": 240, "n_id_val": 60, "n_id_test": 80, "n_ood_val": 80, "n_ood_test": 100}
TINY_PRETRAIN = {"n_web": 256, "steps": 3, "batch_size": 32}
# The hydra block of the sweeper tests' fake apps: the sweeper keys conf/search/autoft.yaml sets, over a 2-d space.
FAKE_APP_HYDRA = """\
hydra:
  sweeper:         # as conf/search/autoft.yaml sets them
    direction: maximize
    n_jobs: 1
    pass_trial: true
    sampler: {seed: 0}
    max_failure_rate: 0.5
    failure_rate_min_trials: 5
    params:
      x: interval(-5, 5)
      y: interval(-5, 5)
"""


def pytest_configure(config) -> None:
    """Under pytest-xdist (make test: -n 2), each worker and the processes it starts get their share of the cores
    (torch would take them all in each, and the workers would slow each other down); a value set outside wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``long(seconds)`` first, longest first; the rest in their collected order (a stable sort).
    pytest-xdist hands the work out in collection order (its grouped tests first): a long test collected late would
    otherwise run alone on one worker at the end while the other had nothing left; longest first, the two workers
    end together."""
    items.sort(key=lambda item: -long_seconds(item))


def long_seconds(item: pytest.Item) -> float:
    """A test's ``long`` mark: about how many seconds it takes in make test (0 if unmarked)."""
    mark = item.get_closest_marker("long")
    return float(mark.args[0]) if mark is not None else 0.0


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory) -> Path:
    """Every test writes worlds and checkpoints into a throwaway cache, never ~/.cache: one per session, and
    under pytest-xdist one per worker (each worker has its own base temp dir)."""
    path = tmp_path_factory.mktemp("autoft-cache")
    os.environ["AUTOFT_CACHE"] = str(path)
    os.environ.setdefault("WANDB_MODE", "offline")
    return path


@pytest.fixture(scope="session")
def tiny_world(cache):
    from autoft.world import WorldConfig, ensure_world

    cfg = WorldConfig(seed=0, **TINY_WORLD)
    return cfg, ensure_world(cfg)


def overrides(**extra: str) -> list[str]:
    """Hydra overrides for a seconds-long run on the tiny world."""
    items = [f"dataset.world.{k}={v}" for k, v in TINY_WORLD.items()]
    items += [f"model.pretrain.{k}={v}" for k, v in TINY_PRETRAIN.items()]
    items += ["trainer.max_steps=4", "trainer.log_every_n_steps=1", "dataset.batch_size=16", "dataset.ood_val_size=40"]
    return items + [f"{k}={v}" for k, v in extra.items()]


def trial_states(db: Path, exited: bool = False) -> list[str]:
    """Trial states ('+beat' once a heartbeat is recorded) read straight from a sweep's SQLite file.

    While the sweeper runs, read-only: opening the study through Optuna would race it to create the schema, and a
    missing schema or a moment's lock reads as no trials yet. Once its process is gone (``exited``), read-write and
    without swallowing errors: a kill -9 during a write leaves a hot journal, which only a writable connection may
    roll back (read-only, SQLite refuses with 'attempt to write a readonly database'), the same rollback the
    resumed sweeper makes; reading that refusal as "no trials" made the kill tests miscount."""
    query = ("SELECT state || CASE WHEN h.trial_id IS NULL THEN '' ELSE '+beat' END FROM trials "
             "LEFT JOIN trial_heartbeats h USING (trial_id)")
    if exited:
        with sqlite3.connect(f"file:{db}?mode=rw", uri=True) as con:
            return [row[0] for row in con.execute(query)]
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return [row[0] for row in con.execute(query)]
    except sqlite3.OperationalError:
        return []
