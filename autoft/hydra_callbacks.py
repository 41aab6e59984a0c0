"""Hydra callbacks of the app (registered in conf/search/autoft.yaml's ``hydra.callbacks``)."""

from __future__ import annotations

import gc
import sys
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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
