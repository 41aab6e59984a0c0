"""Hydra callbacks of the apps (registered under ``hydra.callbacks`` in conf/finetune.yaml, which every app
config builds on, conf/search/autoft.yaml and conf/benchmark.yaml)."""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class NoticesToRunLog(Callback):
    """Library notices and warnings go to the run's log (Hydra's: stdout and ``<run dir>/<job>.log``), so that
    stderr holds what went wrong and nothing else: a failed run's stderr is its one ``error:`` line.

    Lightning gives its loggers a handler of their own on stderr when imported before logging is configured (as
    the apps import it), which prints its "GPU available" banners and tips there; Python's warnings print to
    stderr too. Both are sent through logging instead, to the handlers Hydra configured for the job.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        logging.captureWarnings(True)
        for name in ("pytorch_lightning", "lightning_fabric"):
            lib = logging.getLogger(name)
            for handler in list(lib.handlers):
                lib.removeHandler(handler)
            lib.propagate = True


class TrialRunsWritten(Callback):
    """A search ends once its trials' W&B runs are written: they are written on a background thread, after the next
    trial's set-up (:data:`autoft.loggers.WRITE_AFTER_S`). A process's exit waits for that thread anyway; a search
    run inside a longer process (the main job, a methods job, a test) leaves its runs complete as it returns."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        loggers = sys.modules.get("autoft.loggers")  # not imported: no trial run was handed over
        if loggers is not None:
            loggers.wait_for_runs()


class FreeFailedTrial(Callback):
    """After a failed search trial, free what it still holds before the next trial runs in the same process.

    A job's exception keeps the job's frames alive through its traceback, and with them its model, data and (after
    an out-of-memory error) its GPU memory, for as long as the sweeper holds the job's result. The traceback is
    dropped (the sweeper records the error's type and message), then the frames collected and the CUDA cache
    emptied. Successful trials free nothing: the next one reuses their model on its device.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        exc = job_return._return_value  # hydra 1.3 keeps the job's exception here
        while isinstance(exc, BaseException):
            exc.__traceback__ = None
            exc = exc.__cause__ or exc.__context__
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


class _KeptSweepConfigs:
    """A config loader that keeps each job config it composes for the next request of the same job."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._kept: dict[tuple[int, tuple[str, ...]], DictConfig] = {}

    def __getattr__(self, name: str) -> Any:  # the rest of the loader's interface
        if name.startswith("__") or name in ("_loader", "_kept"):  # unpickling (a joblib launcher's workers)
            raise AttributeError(name)
        return getattr(self._loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        kept = self._kept.pop(key, None)
        if kept is not None:
            return kept
        config = self._loader.load_sweep_config(master_config, sweep_overrides)
        self._kept[key] = config
        return config


class ComposeOnce(Callback):
    """Each job's config composed once in a multirun of Hydra's basic sweeper, not twice.

    The basic sweeper composes every job's config of a batch to check the whole batch before it launches any
    job, then its launcher composes each again (hydra 1.3, ``Sweeper.validate_batch_is_legal`` and
    ``BasicLauncher.launch``): a second second or so per methods job. Here the multirun's config loader keeps
    the config the check composed and hands it, once, to the launch of the same job (same sweep config, same
    overrides); the check still runs first, and every other request composes as before. Where we differ from
    Hydra: the loader is swapped on the running Hydra object, before it builds the sweeper's context.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = GlobalHydra.instance().hydra
        if hydra is not None and not isinstance(hydra.config_loader, _KeptSweepConfigs):
            hydra.config_loader = _KeptSweepConfigs(hydra.config_loader)
