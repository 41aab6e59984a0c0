"""The app's Hydra callbacks: FreeFailedTrial frees what a failed search trial still holds before the next one;
ComposeOnce composes each job of a basic-sweeper multirun once."""

from __future__ import annotations

import gc
import pickle
import weakref
from pathlib import Path

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.utils import JobReturn, JobStatus

from autoft.hydra_callbacks import FreeFailedTrial
from tests.inprocess import run_script

APP = """
import os
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg):
    with open("jobs.txt", "a") as f:
        f.write(f"{HydraConfig.get().job.num} {cfg.x}\\n")

if __name__ == "__main__":
    main()
"""
CONFIG = """
x: 0
hydra:
  callbacks:
    compose_once:
      _target_: autoft.hydra_callbacks.ComposeOnce
  sweep:
    dir: sweep
"""


class Model:
    """Stands for a trial's model (and its GPU memory)."""


def failing_job(alive: list) -> None:
    model = Model()
    alive.append(weakref.ref(model))
    try:
        raise MemoryError("out of memory")
    except MemoryError as e:
        raise RuntimeError("the trial failed") from e  # a chain, as a DataLoader or Lightning re-raise makes


def run(job) -> JobReturn:
    """As hydra.core.utils.run_job: the job's exception kept in the JobReturn."""
    ret = JobReturn()
    try:
        ret._return_value, ret.status = job(), JobStatus.COMPLETED
    except Exception as e:
        ret._return_value, ret.status = e, JobStatus.FAILED
    return ret


def test_a_failed_trials_frames_are_freed_once_the_job_ends():
    alive: list = []
    ret = run(lambda: failing_job(alive))
    gc.collect()
    assert alive[0]() is not None  # the traceback keeps the job's frame, and its model, alive
    FreeFailedTrial().on_job_end(config=None, job_return=ret)
    assert alive[0]() is None
    assert str(ret._return_value) == "the trial failed"  # what the sweeper records is still there


def test_a_successful_trial_is_left_alone():
    ret = run(lambda: 0.5)
    FreeFailedTrial().on_job_end(config=None, job_return=ret)
    assert ret.return_value == 0.5


def test_the_search_configs_register_it():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=["search=embedded"], return_hydra_config=True)
    assert cfg.hydra.callbacks.free_failed_trial._target_ == "autoft.hydra_callbacks.FreeFailedTrial"


@pytest.fixture
def composed(monkeypatch) -> list[list[str]]:
    """The overrides of every job config Hydra's config loader composes."""
    calls: list[list[str]] = []
    load = ConfigLoaderImpl.load_sweep_config

    def counted(self, master_config, sweep_overrides):
        calls.append(list(sweep_overrides))
        return load(self, master_config, sweep_overrides)

    monkeypatch.setattr(ConfigLoaderImpl, "load_sweep_config", counted)
    return calls


def test_compose_once_composes_each_basic_sweeper_job_once(tmp_path, composed):
    (tmp_path / "config.yaml").write_text(CONFIG)
    (tmp_path / "app.py").write_text(APP)
    assert run_script(tmp_path / "app.py", ["-m", "x=1,2,3"]) == 0
    assert (tmp_path / "jobs.txt").read_text().split("\n")[:-1] == ["0 1", "1 2", "2 3"]
    assert composed == [["x=1"], ["x=2"], ["x=3"]]  # Hydra alone: each twice (the batch's check, the launch)


def test_compose_once_still_checks_the_batch_before_any_job(tmp_path, composed):
    (tmp_path / "config.yaml").write_text("defaults:\n  - opt: a\n  - _self_\n" + CONFIG)
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "a.yaml").write_text("lr: 1\n")
    (tmp_path / "app.py").write_text(APP)
    assert run_script(tmp_path / "app.py", ["-m", "opt=a,nope"]) == 1  # the second job's option does not exist
    assert not (tmp_path / "jobs.txt").exists()  # so the first did not run


def test_the_kept_configs_travel_to_a_launchers_workers(tmp_path):
    """A joblib launcher pickles its hydra context, config loader included, to its worker processes."""
    from hydra._internal.utils import create_config_search_path

    from autoft.hydra_callbacks import _KeptSweepConfigs

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(tmp_path)))
    kept = pickle.loads(pickle.dumps(_KeptSweepConfigs(loader)))
    assert kept._kept == {} and isinstance(kept._loader, ConfigLoaderImpl)
