"""One run of the fine-tuning app, as a search trial runs it: the job that Hydra's launcher calls.

A search runs hundreds of short trials one after another in one process, so what a trial does besides
its training steps and validation is paid hundreds of times. Here it is kept to what differs between
trials: model and data are built by the first trial and restored in place by the next
(:func:`autoft.finetune.build` with ``reuse``); the model stays on its device between trials
(:class:`KeepOnDevice`); the trial's W&B run is written in the background once the trial ends
(:class:`autoft.loggers.TrialRun`). Each trial still builds its own objective (theta0 = the pretrained
weights), optimizer and trainer, and seeds itself, so a trial in a reused process equals a fresh
process bit for bit. ``benchmarks/throughput.py --sections trial`` names where a trial's time goes.

Where a trial differs from Lightning's behaviour, and why (said here, once):

- :class:`KeepOnDevice`: the model is not copied to the host after each fit.
- Lightning's scan of the installed packages' entry points for external callbacks (the
  ``pytorch_lightning.callbacks_factory`` group), done in every ``pl.Trainer()``, is done once per process
  once this module is imported (:func:`_scan_entry_points_once`): it was most of a trial's Trainer
  construction (12 of 15 ms on CPU). The callbacks themselves are still made afresh for every Trainer.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities import registry
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import SingleDeviceStrategy

from autoft import UserError, atomic_write
from autoft.finetune import VAL_KEYS, FineTuner, build, finetune
from autoft.loggers import finish_logger, make_logger
from hydra_plugins.autoft_optuna_sweeper import trial_from_config

log = logging.getLogger(__name__)


def _scan_entry_points_once() -> None:
    """Lightning's external-callback registry reads ``importlib.metadata.entry_points`` (every installed
    distribution's metadata) for each Trainer; the installed packages do not change during a search, so the
    scan's answer is kept for the process. Lightning still loads and calls each factory per Trainer."""
    if not hasattr(registry.entry_points, "cache_info"):
        registry.entry_points = functools.cache(registry.entry_points)


_scan_entry_points_once()


class OptunaPruning(pl.Callback):
    """Reports the OOD validation metric to the Optuna trial at every validation and stops the run
    when the study's pruner says so. The trial is the sweeper's own when the job runs in its process, else
    reached through the study's storage, so this works whichever Hydra launcher runs the job."""

    def __init__(self, trial, key: str):
        self.trial, self.key = trial, key
        # read once per trial (each is a storage query): Optuna prunes single-objective studies only
        self.never_prunes = isinstance(trial.study.pruner, optuna.pruners.NopPruner)
        self.multi_objective = len(trial.study.directions) > 1
        self.results: dict[str, float] = {}
        self.validated: int | None = None  # the step of the last validation

    def on_validation_end(self, trainer: pl.Trainer, module: FineTuner) -> None:
        if trainer.sanity_checking or self.key not in module.results:
            return
        step = self.validated = trainer.global_step
        if self.multi_objective:
            return
        self.trial.report(module.results[self.key], step)
        if self.never_prunes:  # the search's default (no pruner): asking would cost a storage read per validation
            return
        if self.trial.should_prune():
            self.results = dict(module.results)  # the pruned trial's last metrics, for its W&B run
            raise optuna.TrialPruned(f"pruned at step {step}: {self.key}={module.results[self.key]:.4f}")

    def on_fit_end(self, trainer: pl.Trainer, module: FineTuner) -> None:
        self._record_steps()

    def on_exception(self, trainer: pl.Trainer, module: FineTuner, exception: BaseException) -> None:
        self._record_steps()  # pruned (raised above) or failed

    def _record_steps(self) -> None:
        """The trial's ``inner_steps`` attr: its steps at its last validation, what the run cost, pruned or not.
        Written once, when the fit ends: each write is a storage transaction (2 ms on SQLite here)."""
        if self.validated is not None:
            self.trial.set_user_attr("inner_steps", self.validated)


class KeepOnDevice(SingleDeviceStrategy):
    """One device, and the model stays there when a fit or test ends.

    Lightning's teardown copies the module and the optimizer state to the host after every fit and
    test, and the next fit copies the module back: for a search's trials, which reuse one model, that
    is the model, its theta0 copy and AdamW's state across the bus per trial (ViT-B/16, image tower
    trained: about 2.5 GB by parameter count).
    Here the optimizer state is dropped instead (a trial's optimizer is not used again) and the rest of
    Lightning's teardown runs as usual.
    """

    def teardown(self) -> None:
        for optimizer in self.optimizers:
            optimizer.state.clear()
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def _single_device(kwargs: dict[str, Any]) -> torch.device | None:
    """The device a one-device Trainer with these arguments trains on, if it is a CUDA GPU or the CPU."""
    if kwargs.get("strategy", "auto") != "auto" or kwargs.get("devices") != 1 or kwargs.get("num_nodes", 1) != 1:
        return None
    accelerator = kwargs.get("accelerator", "auto")
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", 0)
    if accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available()):
        return torch.device("cpu")
    return None


def trainer_overrides(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """Trainer overrides that leave the model on its device after fit and test (:class:`KeepOnDevice`), on one
    device; none for DDP, several devices or other accelerators (they keep their own)."""
    device = _single_device(trainer_cfg)
    return {"strategy": KeepOnDevice(device)} if device is not None else {}


class ValidateAtEnd(pl.Callback):
    """A step budget is validated after its last step, whatever the validation interval.

    Lightning validates every ``val_check_interval`` steps and stops at ``max_steps`` without validating, so
    ``search.inner_steps=30`` under ``search.eval_every=25`` scored each trial on its model at step 25, five
    steps before its end, and ``inner_steps=10`` never validated (every trial failed: no metric). Here the
    trainer is asked to stop at its last step, which makes Lightning's loop validate then (its ``should_stop``
    check); training is unchanged, it ends there anyway.
    """

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.max_steps:
            trainer.should_stop = True


def end_validation(trainer_cfg: dict[str, Any]) -> list[pl.Callback]:
    """:class:`ValidateAtEnd` where a step budget's validation interval does not divide it."""
    steps, every = trainer_cfg.get("max_steps", -1), trainer_cfg.get("val_check_interval")
    return [ValidateAtEnd(steps)] if isinstance(every, int) and steps > 0 and steps % every else []


def validation_keys(cfg: DictConfig, search: bool) -> tuple[str, ...]:
    """What a run validates on: val_id and val_ood; a search trial only val_ood, unless it returns val_id.

    Trials are scored and pruned on val_ood alone; the ID split would add 60% to every trial's
    evaluation on the embedded world (600 more images each time), a cost paid by hundreds of trials.
    """
    return VAL_KEYS if not search or "val_id" in cfg.returns else ("val_ood",)


def run(cfg: DictConfig) -> float | list[float]:
    """One fine-tuning run; writes ``results.json``; returns the metric(s) named by ``cfg.returns``.

    Run by the sweeper, the job finds its Optuna trial through the storage, reports the OOD
    validation metric at every validation and raises ``optuna.TrialPruned`` when pruned.
    """
    trial = trial_from_config(cfg)
    model, data = build(cfg, reuse=True)  # the next trial in this process reuses model and data
    data.val_keys = validation_keys(cfg, search=trial is not None)
    metric = cfg.dataset.get("search_metric") or cfg.dataset.metric  # few-shot: neg_ce (accuracy is too coarse)
    key = f"val_ood/{metric}"
    pruning = [OptunaPruning(trial, key)] if trial is not None else []
    logger = make_logger(cfg, trial)
    results: dict[str, float] = {}
    state = "failed"
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    try:  # the model stays on its device: the next trial starts there
        overrides = trainer_overrides(trainer_cfg)  # one device: the first batch is made while the trial sets up
        module = finetune(cfg, model, data, logger, pruning + end_validation(trainer_cfg),
                          early_epoch=bool(overrides), **overrides)
        results, state = module.results, "finished"
    except optuna.TrialPruned:
        results, state = pruning[0].results, "pruned"
        raise
    finally:  # pruned or failed too: the trial's run is closed, not left open for the next trial to log into
        finish_logger(logger, results, state)
    if module.trainer.is_global_zero:  # DDP: every rank has the same results; one writes them
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "results.json", json.dumps(results, indent=1, sort_keys=True))
    keys = [f"{split}/{metric}" for split in cfg.returns]
    missing = [k for k in keys if k not in results]
    if missing:
        raise UserError(f"metric(s) {missing} not produced; available: {sorted(results)}")
    values = [results[k] for k in keys]
    log.info("%s", ", ".join(f"{k} = {v:.4f}" for k, v in zip(keys, values, strict=True)))
    return values[0] if len(values) == 1 else values
