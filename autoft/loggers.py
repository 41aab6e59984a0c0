"""The runs' loggers: W&B (offline without a login) or CSV, and search trials' W&B runs written after the trial.

A search runs hundreds of ten-second trials, one W&B run each. Opening a W&B run costs far more than a
trial's logging: ``wandb.init`` lists every installed package (``x_save_requirements``, most of it),
reads git, starts system-metrics sampling and console capture, then waits on the W&B service to create
the run; ``finish`` waits for it again. So a trial does not open its run: :class:`TrialRun` records
what the trial logs (config, metric rows with their steps, final summary) and, when the trial ends,
a background thread writes it as one W&B run (grouped by study, named ``trial-N``, job type
``trial``), overlapping the next trial. The process's first trial run records the environment
(requirements, git, system metadata); later ones, being in the same process, only their own data.
Each run is written in full before the process exits (the writer is a non-daemon thread, joined
before W&B's own exit hooks run). The runs are the same as a live run's, except that in the W&B UI
a trial's rows carry the time they were written, not the time they were logged, and a trial killed
mid-way (kill -9) has no run at all rather than a partial one.

Other runs (a single fine-tuning, final training, methods) log live through Lightning's ``WandbLogger``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from lightning_fabric.utilities.logger import _convert_json_serializable, _convert_params, _sanitize_callable_params
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)
STEP_KEY = "trainer/global_step"  # the x-axis Lightning's WandbLogger gives W&B
# WandbLogger arguments that are not wandb.init's (offline is handled apart)
_LIGHTNING_ONLY = ("_target_", "log_model", "prefix", "experiment", "checkpoint_name")


def wandb_offline() -> bool:
    """No login, no prompt: W&B runs offline (``wandb sync`` later) unless WANDB_MODE says otherwise."""
    if "WANDB_MODE" in os.environ:
        return False
    netrc = Path.home() / ".netrc"
    logged_in = "WANDB_API_KEY" in os.environ or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return not logged_in


def _is_wandb(cfg: DictConfig) -> bool:
    return bool(cfg.get("logger")) and cfg.logger._target_.endswith("WandbLogger")


def make_logger(cfg: DictConfig, trial=None, **wandb_run: str):
    """The configured Lightning logger, with the run's whole config as its hyperparameters.

    W&B: a search trial (``trial``) gets a :class:`TrialRun`, grouped by study and named after the
    trial; any other run Lightning's ``WandbLogger``, named by ``wandb_run`` (group, name, job_type).
    """
    if not cfg.get("logger"):
        return None
    params = OmegaConf.to_container(cfg, resolve=True)
    if trial is not None:
        params["trial"] = {"number": trial.number, "params": trial.params}
    if _is_wandb(cfg) and trial is not None:
        init = {k: v for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items()
                if k not in _LIGHTNING_ONLY}  # the rest are wandb.init's, as WandbLogger passes them
        offline = bool(init.pop("offline", False)) or wandb_offline()
        init |= {"group": trial.study.study_name, "name": f"trial-{trial.number}", "job_type": "trial"}
        logger = TrialRun(offline, **init)
    else:
        extra: dict[str, Any] = {}
        if _is_wandb(cfg):
            extra = {"offline": wandb_offline(), **wandb_run}
        logger = hydra.utils.instantiate(cfg.logger, **extra)
    logger.log_hyperparams(params)
    return logger


@rank_zero_only
def finish_logger(logger, results: dict[str, float], state: str = "finished") -> None:
    """Final metrics as the run's summary, and the run closed so the next job in this process starts clean
    (``state``: finished, pruned or failed). Rank 0 only: under DDP the other ranks' W&B experiment is a
    stand-in without a summary."""
    if isinstance(logger, TrialRun):
        logger.finish(results, state)
    elif type(logger).__name__ == "WandbLogger":
        logger.experiment.summary.update(results)
        logger.experiment.finish(exit_code=1 if state == "failed" else 0)


class TrialRun(Logger):
    """A search trial's W&B run, recorded in memory and written by :func:`write_run` once the trial ends.

    ``init``: ``wandb.init``'s arguments (project, save_dir, group, name, job_type, ...); ``offline``
    as in :func:`wandb_offline`. Logs as Lightning's ``WandbLogger`` does: metric rows keyed by
    ``trainer/global_step``, the config made JSON-serialisable the same way.
    """

    def __init__(self, offline: bool, save_dir: str | None = None, dir: str | None = None, **init: Any):
        super().__init__()
        self.offline, self._save_dir, self.init = offline, save_dir or dir, init
        self.config: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.finished = False

    @property
    def name(self) -> str | None:
        return self.init.get("project")

    @property
    def version(self) -> str | None:
        return self.init.get("name")

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self.config.update(_convert_json_serializable(_sanitize_callable_params(_convert_params(params))))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics) | ({STEP_KEY: step} if step is not None else {}))

    def finish(self, summary: dict[str, float], state: str = "finished") -> None:
        """Hand the trial's record to the writer (once; it returns at once)."""
        if not self.finished:
            self.finished = True
            write_run(self.offline, self._save_dir, self.init, self.config, self.rows,
                      summary | {"trial/state": state}, exit_code=1 if state == "failed" else 0)


_writer: threading.Thread | None = None  # the last run's writer; each waits for the one before
_environment_recorded = False
# A trial's run is written once the next trial is training, not while it sets up: wandb.init and the run's rows
# are Python work holding the GIL, as is a trial's set-up (Hydra's job, Lightning, the objective), and the two
# took turns (the first run, which also lists the installed packages, doubled the next trial's overhead); the
# training steps spend most of their time in torch kernels, without the GIL. wait_for_runs() cuts the wait short.
WRITE_AFTER_S = 1.0
_hurry = threading.Event()


def write_run(offline: bool, save_dir: str | None, init: dict[str, Any], config: dict[str, Any],
              rows: list[dict[str, Any]], summary: dict[str, Any], exit_code: int = 0) -> None:
    """Write one W&B run on a background thread, after the runs handed over before it."""
    global _writer, _environment_recorded
    first, _environment_recorded = not _environment_recorded, True
    previous = _writer

    def write() -> None:
        if previous is not None:
            previous.join()
        _hurry.wait(WRITE_AFTER_S)
        try:
            _write(offline, save_dir, init, config, rows, summary, exit_code, environment=first)
        except Exception as e:  # the trial is over and its result recorded: report, do not raise
            log.error("W&B run %s not written: %s: %s", init.get("name"), type(e).__name__, e)

    # not a daemon: the interpreter joins it before the atexit hooks that stop W&B's service
    _writer = threading.Thread(target=write, name=f"wandb-{init.get('name')}")
    _writer.start()


def wait_for_runs() -> None:
    """Return once every W&B run handed over so far has been written and finished. W&B's service closes
    each run's files a moment later (``wandb.teardown()`` waits for that; the process's exit does too)."""
    _hurry.set()
    try:
        if _writer is not None:
            _writer.join()
    finally:
        _hurry.clear()


def _write(offline: bool, save_dir: str | None, init: dict[str, Any], config: dict[str, Any],
           rows: list[dict[str, Any]], summary: dict[str, Any], exit_code: int, environment: bool) -> None:
    import wandb

    # console capture off: this thread would record the next trial's output as this run's
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_save_requirements=environment,
                              disable_git=not environment, x_disable_meta=not environment,
                              x_disable_machine_info=not environment)
    run = wandb.init(dir=save_dir, config=config, mode="offline" if offline else None, reinit="create_new",
                     settings=settings, **init)
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
    for row in rows:
        run.log(row)
    run.summary.update(summary)
    run.finish(exit_code=exit_code)
