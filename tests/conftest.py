"""Shared tiny fixtures: a small embedded world and a briefly pretrained tiny CLIP, per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory) -> Path:
    """Every test writes worlds and checkpoints into a throwaway cache, never ~/.cache."""
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
