"""Every option of the hydra/sweeper/sampler group runs a seeded 6-trial sphere: twice with one seed, the same
trials; with another seed, other trials. Sweeps run in this process (Hydra's own sweep test harness) to keep it fast."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from hydra.test_utils.test_utils import SweepTaskFunction
from omegaconf import DictConfig

from hydra_plugins.autoft_optuna_sweeper.config import SAMPLERS

APPS = Path(__file__).resolve().parent / "sweeper_apps"

# Settings that make the samplers' own algorithms run within 6 trials (not only their random start-up trials).
ALGORITHM_SOON = {
    "tpe": ["hydra.sweeper.sampler.n_startup_trials=2"],
    "motpe": ["hydra.sweeper.sampler.n_startup_trials=2"],
    "gp": ["hydra.sweeper.sampler.n_startup_trials=2"],
    "nsgaii": ["hydra.sweeper.sampler.population_size=2"],
    "nsgaiii": ["hydra.sweeper.sampler.population_size=2"],
    "qmc": ["hydra.sweeper.sampler.scramble=true"],  # unscrambled Sobol points do not depend on the seed
    # the grid: a space of exactly 6 points, all of which it walks (n_trials is capped at the grid's size)
    "grid": ["hydra.sweeper.params.x='choice(-1, 1)'", "hydra.sweeper.n_trials=20"],
}


def sphere(cfg: DictConfig) -> float:
    return float(cfg.x) ** 2 + float(cfg.y) ** 2


def trials(sampler: str, seed: int, sweep_dir: Path, *extra: str) -> list[tuple]:
    runner = SweepTaskFunction()
    runner.calling_file, runner.calling_module = str(APPS / "sphere.py"), None
    runner.config_path, runner.config_name, runner.task_function = "conf", "config", sphere
    runner.temp_dir = str(sweep_dir)
    runner.overrides = [f"hydra/sweeper/sampler={sampler}", f"hydra.sweeper.sampler.seed={seed}",
                        "hydra.sweeper.n_trials=6", "hydra.job.chdir=false", *ALGORITHM_SOON.get(sampler, []), *extra]
    with runner:  # it deletes the sweep dir on exit
        study = optuna.load_study(study_name="sphere", storage=f"sqlite:///{sweep_dir}/optuna.db")
        return [(t.state.name, t.params, t.values) for t in study.trials]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning", "ignore::UserWarning")
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_each_sampler_gives_the_same_trials_for_the_same_seed(sampler, tmp_path):
    first, again = trials(sampler, 0, tmp_path / "a"), trials(sampler, 0, tmp_path / "b")
    assert len(first) == 6 and all(state == "COMPLETE" for state, _, _ in first)
    assert again == first
    assert trials(sampler, 1, tmp_path / "c", "hydra.sweeper.n_trials=2") != first[:2]  # the seed is used
    if sampler == "grid":  # its whole space, each point once
        assert sorted((p["x"], p["y"]) for _, p, _ in first) == [(x, y) for x in (-1, 1) for y in (-5, 0, 5)]
