"""The app's Hydra callbacks: FreeFailedTrial frees what a failed search trial still holds before the next one."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus

from autoft.hydra_callbacks import FreeFailedTrial


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
