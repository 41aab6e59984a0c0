"""A search's job configs derived from the last composed one (hydra_plugins/autoft_optuna_sweeper/_compose.py) equal
the ones Hydra composes, node for node, and every case the derivation cannot answer is composed by Hydra."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.test_utils.test_utils import SweepTaskFunction
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from autoft.finetune import CONF_DIR
from hydra_plugins.autoft_optuna_sweeper._compose import DerivedSweepConfigs

APPS = Path(__file__).resolve().parent / "sweeper_apps"
# An embedded-world search's job, as the sweeper builds it: the command's fixed overrides, the trial's params, the
# trial's job dir and its storage handle.
FIXED = ["search=embedded", "dataset.world.seed=1", "trainer.max_steps=4", "optim.lr=${model.lr0}"]


def trial(number: int, lr: float, weight: float, seed: int, *extra: str) -> list[str]:
    return [*FIXED, f"objective.weights.hinge={weight}", f"objective.weights.l2init={weight / 3}", f"optim.lr={lr}",
            f"optim.weight_decay={weight / 7}", f"seed={seed}", *extra, f"hydra.sweep.subdir={number}",
            "++optuna_trial.storage='sqlite:///x.db'", "++optuna_trial.study_name=s",
            f"++optuna_trial.trial_id={number}"]


def nodes(cfg) -> Iterator[tuple[str, str, object]]:
    """Every node of a config: its path, its node type and its unresolved value (so types count, not only text)."""
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else cfg.keys()
    for key in keys:
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_none() and not node._is_interpolation():
            yield str(key), type(node).__name__, None
            yield from ((f"{key}.{p}", t, v) for p, t, v in nodes(node))
        else:
            yield str(key), type(node).__name__, node._value()


def same(derived: DictConfig, composed: DictConfig) -> None:
    assert list(nodes(derived)) == list(nodes(composed))
    assert OmegaConf.to_yaml(derived) == OmegaConf.to_yaml(composed)
    assert OmegaConf.is_struct(derived) and OmegaConf.is_struct(composed)
    assert OmegaConf.is_readonly(derived.hydra) == OmegaConf.is_readonly(composed.hydra)


@pytest.fixture
def loader():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield GlobalHydra.instance().hydra.config_loader


@pytest.fixture
def counted(loader, monkeypatch):
    """The derived-config loader, and the list of the jobs Hydra itself composed through it."""
    composed: list[list[str]] = []
    real = type(loader).load_sweep_config

    def compose(self, master, overrides):
        composed.append(list(overrides))
        return real(self, master, overrides)

    monkeypatch.setattr(type(loader), "load_sweep_config", compose)
    return DerivedSweepConfigs(loader), composed


def master(loader, *overrides: str) -> DictConfig:
    return loader.load_configuration("finetune", [*overrides, "hydra.sweep.dir=/tmp/x"], run_mode=RunMode.MULTIRUN)


def test_trials_differing_in_values_are_derived_and_equal_what_hydra_composes(loader, counted):
    derived, composed = counted
    top = master(loader, "search=embedded")
    jobs = [trial(0, 3e-4, 0.5, 0), trial(1, 1.2e-3, 0.002, 7), trial(2, 3e-5, 9.5, 3)]
    got = [derived.load_sweep_config(top, job) for job in jobs]
    assert composed == [jobs[0]]  # Hydra composed the first only
    for job, cfg in zip(jobs, got, strict=True):
        same(cfg, loader.load_sweep_config(top, job))
    assert got[1].optim.lr == 1.2e-3 and got[1].seed == 7 and got[1].optuna_trial.trial_id == 1
    assert got[2].hydra.sweep.subdir == "2" and "optim.lr=3e-05" in got[2].hydra.overrides.task
    got[1].optim.lr = 1.0  # what a job does to its config stays in that job's
    assert derived.load_sweep_config(top, jobs[1]).optim.lr == 1.2e-3


@pytest.mark.parametrize("first, then", [
    (["objective=autoft"], ["objective=autoft_fmow"]),  # a config group
    (["+extra=1"], ["+extra=2"]),  # an addition: the kept config already holds it
    (["++optim.betas=[0.9,0.99]"], ["++optim.betas=[0.8,0.99]"]),  # not a scalar
    (["optim.lr=0.1"], ["optim.lr=0.2", "optim.lr=0.3"]),  # not the same overrides
    (["optim.lr=0.1", "optim={lr:0.5}"], ["optim.lr=0.2", "optim={lr:0.5}"]),  # a later override on the same node
])
def test_other_differences_are_composed_by_hydra(loader, counted, first, then):
    derived, composed = counted
    top = master(loader, "search=embedded")
    jobs = [trial(0, 3e-4, 0.5, 0, *first), trial(1, 3e-4, 0.5, 0, *then)]
    got = [derived.load_sweep_config(top, job) for job in jobs]
    assert composed == jobs
    same(got[1], loader.load_sweep_config(top, jobs[1]))


def test_another_master_config_is_composed_by_hydra(loader, counted):
    derived, composed = counted
    first, second = master(loader, "search=embedded"), master(loader, "search=embedded", "dataset.batch_size=8")
    derived.load_sweep_config(first, trial(0, 3e-4, 0.5, 0))
    derived.load_sweep_config(second, trial(1, 3e-4, 0.5, 1))
    assert len(composed) == 2


def test_a_sweep_composes_once(tmp_path, monkeypatch):
    composed = []
    real = DerivedSweepConfigs._keep
    monkeypatch.setattr(DerivedSweepConfigs, "_keep", lambda self, *a: (composed.append(1), real(self, *a)))
    runner = SweepTaskFunction()
    runner.calling_file, runner.calling_module = str(APPS / "sphere.py"), None
    runner.config_path, runner.config_name = "conf", "config"
    runner.task_function = lambda cfg: float(cfg.x) ** 2 + float(cfg.y) ** 2
    runner.temp_dir = str(tmp_path / "sweep")
    runner.overrides = ["hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=5", "hydra.job.chdir=false"]
    with runner:
        study = optuna.load_study(study_name="sphere", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert len(composed) == 1  # the batch check's; the 5 trials' configs were derived from it


def test_a_pickled_loader_keeps_no_config_and_composes(loader):
    """A launcher's workers (joblib, submitit) get the loader pickled: without the kept config, which they compose."""
    derived = DerivedSweepConfigs(loader)
    top = master(loader, "search=embedded")
    derived.load_sweep_config(top, trial(0, 3e-4, 0.5, 0))
    again = pickle.loads(pickle.dumps(derived))
    assert derived._kept is not None and again._kept is None
    same(again.load_sweep_config(top, trial(1, 1e-3, 0.5, 0)), loader.load_sweep_config(top, trial(1, 1e-3, 0.5, 0)))
