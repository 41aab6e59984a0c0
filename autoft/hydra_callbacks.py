"""Hydra callbacks of the apps (registered under ``hydra.callbacks`` in conf/finetune.yaml, which every app
config builds on, and conf/search/autoft.yaml)."""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

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
