"""One fine-tuning run: the AutoFT inner loop as a LightningModule, and its Hydra app.

``python -m autoft.finetune dataset=embedded model=tiny_clip objective=robust`` fine-tunes once
and returns the OOD validation metric, which is what a sweeper optimises.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import optuna
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_only

from autoft import UserError, atomic_write
from autoft.conventions import objective_settings
from autoft.data import WildsDataModule
from autoft.datasets import check_root, open_data, templates
from autoft.imagecache import file_stat
from autoft.imagecheck import skip_counts
from autoft.layers import optimizer_groups
from autoft.model import CLIPClassifier, load_clip
from autoft.objective import CompositeObjective
from autoft.world import config_hash

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per fit: noise, not news.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Under DDP, FineTuner gathers every rank's predictions and each rank computes the whole split's metrics
# (each example once): Lightning's advice to sync logged metrics or evaluate on one device does not apply.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level in distributed setting")
warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
VAL_KEYS, TEST_KEYS = ("val_id", "val_ood"), ("test_id", "test_ood")
# The repo's top-level conf/ (resolved through the editable install's symlinks).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class FineTuner(pl.LightningModule):
    """Fine-tunes a :class:`CLIPClassifier` with a :class:`CompositeObjective`.

    AdamW at the given lr from the first step: ``constant`` for the search's short inner loops
    (the reference code hid them inside a 500-step warmup, so they barely trained), or linear
    warmup then cosine decay for full runs. Metrics are the dataset's own (``evaluate``), logged
    as ``val_id/``, ``val_ood/``, ``test_id/``, ``test_ood/``; training terms under ``train/``.
    The norm terms' gradients are added in closed form before each optimizer step, so
    ``train/loss`` is the other terms' sum and each norm term is logged every ``log_every_n_steps``.
    """

    def __init__(self, model: CLIPClassifier, objective: CompositeObjective, evaluate, lr: float,
                 weight_decay: float, schedule: str = "constant", warmup_steps: int = 0, groups=None,
                 layer_groups=None):
        super().__init__()
        if schedule not in ("constant", "cosine"):
            raise UserError(f"unknown lr schedule '{schedule}'; use constant or cosine")
        self.model, self.objective, self.evaluate = model, objective, evaluate
        self.lr, self.weight_decay, self.schedule, self.warmup_steps = lr, weight_decay, schedule, warmup_steps
        # optim.groups: per-layer-group lr / weight decay (autoft.layers), checked here, before any training
        self.groups, self.layer_groups = groups, layer_groups
        if groups:
            optimizer_groups(model.trainable(), layer_groups, groups, lr, weight_decay)
        self._outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self.results: dict[str, float] = {}
        self.examples: dict[str, int] = {}  # how many examples each loader's metrics are over
        self._losses: list[torch.Tensor] = []  # since the last optimizer step, checked once backward is queued

    def on_before_optimizer_step(self, optimizer) -> None:
        # after backward and AMP unscaling, before clipping and the step. The losses are checked here, not
        # in training_step: reading one waits for the GPU, which then idles while the CPU launches what
        # follows; before backward (on ViT-B/16 with a trained text tower) that wait cost most of the
        # flyp term's price. Here backward and the norm gradients are already queued, and a non-finite
        # loss (of any accumulated batch) still stops the step.
        self.objective.add_norm_grads()
        losses, self._losses = torch.stack(self._losses), []
        if not torch.isfinite(losses).all():  # diverged: the sweeper prunes the trial with this reason
            bad = losses[~torch.isfinite(losses)][0].item()
            raise FloatingPointError(f"non-finite loss {bad} at step {self.global_step}")

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        feats = self.model.image_features(x)
        logits = self.model.head(feats)
        text = self.model.caption_features(y) if self.objective.needs_text else None
        log_norms = self.global_step % self.trainer.log_every_n_steps == 0  # norm-term values cost a pass
        loss, terms = self.objective(logits, y, feats, text, self.model.logit_scale, norm_values=log_norms)
        self._losses.append(loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in terms.items()})
        return loss

    def _test_keys(self) -> tuple[str, ...]:
        """The data module's test loader names (ImageNet has several OOD test sets), else test_id, test_ood."""
        return tuple(getattr(self.trainer.datamodule, "test_keys", TEST_KEYS))

    def _val_keys(self) -> tuple[str, ...]:
        """The data module's validation loader names: val_id, val_ood (search trials: see validation_keys)."""
        return tuple(getattr(self.trainer.datamodule, "val_keys", VAL_KEYS))

    def _collect(self, batch, dataloader_idx: int) -> None:
        x, y, meta = batch
        logits = self.model(x).float()
        key = (self._test_keys() if self.trainer.testing else self._val_keys())[dataloader_idx]
        groups = getattr(self.trainer.datamodule, "class_groups", {}).get(key)
        if groups is not None:  # labels are groups of the model's classes (ImageNet-R/-A, ObjectNet): max-pool
            logits = logits[:, groups.to(logits.device)].amax(-1)
        # one process: the batch's summed CE; DDP: each example's, since a padded shard repeats some examples
        ce = F.cross_entropy(logits, y, reduction="sum" if self.trainer.world_size == 1 else "none")
        self._outputs.setdefault(dataloader_idx, []).append(
            (logits.argmax(-1).cpu(), y.cpu(), meta.cpu(), ce.reshape(-1).cpu()))

    def _gather(self, dataloader_idx: int, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every rank's rows of one loader, each example once, in the dataset's order.

        Lightning gives each rank a ``DistributedSampler`` shard (indices r, r + W, ...; the last ones
        padded with repeats); the sampler says which example each local row is, so the rows are sorted
        by example and repeats dropped, whatever the sampler (and any batch limit) did.
        """
        loaders = self.trainer.test_dataloaders if self.trainer.testing else self.trainer.val_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        rows = torch.as_tensor(list(loader.sampler)[:len(columns[0])], dtype=torch.long)
        parts: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, (rows, *columns))
        rows, *columns = (torch.cat(c) for c in zip(*parts, strict=True))
        order = torch.argsort(rows, stable=True)
        first = torch.ones(len(rows), dtype=torch.bool)
        first[1:] = rows[order][1:] != rows[order][:-1]
        return tuple(c[order[first]] for c in columns)

    def _report(self, keys: tuple[str, ...]) -> None:
        """Each loader's metrics: the dataset's own, plus ``neg_ce`` (the few-shot search objective),
        over the whole split under DDP too (each rank gathers all ranks' rows: every rank has the same)."""
        for idx, key in enumerate(keys):
            preds, ys, metas, ces = (torch.cat(c) for c in zip(*self._outputs.pop(idx, []), strict=True))
            if self.trainer.world_size > 1:
                preds, ys, metas, ces = self._gather(idx, preds, ys, metas, ces)
            self.examples[key] = len(ys)
            metrics = self.evaluate(preds, ys, metas) | {"neg_ce": -ces.sum().item() / len(ys)}
            metrics = {f"{key}/{k}": v for k, v in metrics.items()}
            self.results.update(metrics)
            self.log_dict(metrics, add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._collect(batch, dataloader_idx)

    def on_validation_epoch_end(self):
        self._report(self._val_keys())

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._collect(batch, dataloader_idx)

    def on_test_epoch_end(self):
        keys = self._test_keys()
        self._report(keys)
        if keys[1:] and keys[1:] != ("test_ood",):  # named OOD test sets (ImageNet shifts): test_ood is their mean
            names = [{m.split("/", 1)[1] for m in self.results if m.startswith(f"{k}/")} for k in keys[1:]]
            mean = {f"test_ood/{m}": sum(self.results[f"{k}/{m}"] for k in keys[1:]) / len(keys[1:])
                    for m in set.intersection(*names)}
            self.results.update(mean)
            self.log_dict(mean)

    def configure_optimizers(self):
        params = ([p for _, p in self.model.trainable()] if not self.groups else
                  optimizer_groups(self.model.trainable(), self.layer_groups, self.groups, self.lr, self.weight_decay))
        # fused: one kernel over all parameters; on CPU too (torch >= 2.4): the tiny CLIP's AdamW step 14 ms vs 41 here
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                fused=self.device.type in ("cuda", "cpu"))
        if self.schedule == "constant":
            return opt
        total, warm = self.trainer.estimated_stepping_batches, self.warmup_steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class OptunaPruning(pl.Callback):
    """Reports the OOD validation metric to the Optuna trial at every validation and stops the run
    when the study's pruner says so. The trial is reached through the study's storage, so this works
    whichever Hydra launcher (in-process or other processes) runs the job."""

    def __init__(self, trial, key: str):
        self.trial, self.key = trial, key

    def on_validation_end(self, trainer: pl.Trainer, module: FineTuner) -> None:
        if trainer.sanity_checking or self.key not in module.results:
            return
        step = trainer.global_step
        self.trial.set_user_attr("inner_steps", step)  # what the run cost, pruned or not
        if len(self.trial.study.directions) > 1:
            return  # Optuna prunes single-objective studies only
        self.trial.report(module.results[self.key], step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.key}={module.results[self.key]:.4f}")


def resolve_pretrained(cfg: DictConfig) -> str | None:
    """``pretrained: embedded`` means the project's own tiny CLIP for the embedded world (built once)."""
    if cfg.model.pretrained != "embedded":
        return cfg.model.pretrained
    from autoft.pretrain import PretrainConfig, ensure_pretrained

    return str(ensure_pretrained(world_config(cfg), PretrainConfig(model=cfg.model.name, **cfg.model.pretrain)))


def world_config(cfg: DictConfig):
    from autoft.world import WorldConfig

    world = cfg.dataset.get("world")
    return WorldConfig.from_dict(OmegaConf.to_container(world, resolve=True) if world else {})


def dataset_root(cfg: DictConfig) -> str:
    """The data root: config, then ``AUTOFT_DATA``; the embedded world is generated on demand."""
    if cfg.dataset.get("world") is not None and not cfg.dataset.root:
        from autoft.world import ensure_world

        return str(ensure_world(world_config(cfg)))
    root = cfg.dataset.root or os.environ.get("AUTOFT_DATA")
    if not root:
        raise UserError(f"no data root for dataset '{cfg.dataset.name}': set dataset.root=... or AUTOFT_DATA")
    check_root(cfg.dataset, root)
    return root


def weights_signature(cfg: DictConfig) -> dict[str, Any]:
    """What fixes the model's starting weights, for cache keys: its config, the pretrained tag or
    checkpoint path, and that file's size and mtime."""
    pretrained = resolve_pretrained(cfg)
    return {"model": OmegaConf.to_container(cfg.model, resolve=True), "pretrained": pretrained,
            "checkpoint": file_stat(Path(pretrained)) if pretrained else None}


# The last model and data built with reuse=True, by config key, with the model's pretrained state.
_BUILT: dict[str, tuple[CLIPClassifier, pl.LightningDataModule, dict[str, torch.Tensor]]] = {}


def build(cfg: DictConfig, reuse: bool = False) -> tuple[CLIPClassifier, pl.LightningDataModule]:
    """Model and data from a composed config (the data module holds the model's transforms).

    ``reuse`` (a search's trials, which run one after another in one process): keep what was built
    and, when the next call has the same model and dataset config (and checkpoint file), return the
    same model restored in place to its pretrained state (no reload, no deepcopy: a copy of the
    pretrained state is kept, on the model's device after the first trial) and the same data module
    (its loaders, workers and preprocessing cache). Nothing else carries over: each trial builds its
    own objective, optimizer and trainer, and seeds itself. One entry is kept, the latest.
    """
    root = dataset_root(cfg)  # first: a bad path fails before minutes of pretraining
    weights = weights_signature(cfg)
    pretrained = weights["pretrained"]
    key = config_hash(weights | {"root": root, "dataset": OmegaConf.to_container(cfg.dataset, resolve=True)})
    if reuse and key in _BUILT:
        model, data, state = _BUILT[key]
        device = next(model.parameters()).device
        if next(iter(state.values())).device != device:  # the trainer moved the model: keep the copy beside it
            state = {k: v.to(device) for k, v in state.items()}
            _BUILT[key] = model, data, state
        model.restore(state)
        return model, data
    _BUILT.clear()
    source = open_data(cfg.dataset, root)  # files, metadata, class names: bad data fails before weights load
    clip, train_tf, eval_tf, tokenizer = load_clip(cfg.model.name, pretrained)
    data = source.module(train_tf, eval_tf)
    model = CLIPClassifier(clip, tokenizer, data.class_names, templates(cfg.dataset.templates),
                           train_text=cfg.model.train_text, text_head=cfg.model.get("text_head", False),
                           train_logit_scale=cfg.model.get("train_logit_scale", False),
                           captions=cfg.model.get("captions", "first"))
    if cfg.model.get("channels_last", False):
        model.use_channels_last()
    if cfg.model.get("compile", False):  # in place: same parameters and state-dict keys; compiled once per process
        model.clip.visual.compile()
        if cfg.model.train_text:  # flyp trains the text tower too: its many small kernels are worth fusing
            model.clip.transformer.compile()
    if reuse:
        _BUILT[key] = model, data, {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, data


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, then renamed: Lightning's own writer streams into the
    destination, so a kill mid-write would leave a truncated checkpoint where a good one was."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


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


def make_trainer(cfg: DictConfig, logger=None, keep_on_device: bool = False, **overrides) -> pl.Trainer:
    """The configured Trainer. ``keep_on_device``: on one device, the model stays there after fit and test
    (:class:`KeepOnDevice`), for a model that the next run in this process reuses."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) | overrides
    if kwargs.get("precision") == "auto":  # bf16 autocast where a GPU exists, fp32 on CPU
        kwargs["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    if keep_on_device and (device := _single_device(kwargs)) is not None:
        kwargs["strategy"] = KeepOnDevice(device)
    return pl.Trainer(logger=logger if logger is not None else False, **kwargs)


def finetune(cfg: DictConfig, model: CLIPClassifier, data: WildsDataModule, logger=None,
             callbacks: list[pl.Callback] | None = None, keep_on_device: bool = False) -> FineTuner:
    """Fine-tune ``model`` in place with the configured objective; validate and (optionally) test.
    ``keep_on_device``: leave the model on its device afterwards (see :func:`make_trainer`)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    compile_norms = cfg.model.get("compile_norm_grads", cfg.model.get("compile", False))
    settings = objective_settings(cfg, model)  # convention, per-layer-group norm weights
    try:
        objective = CompositeObjective(OmegaConf.to_container(cfg.objective.weights), model.trainable(),
                                       closed_form_norms=True, compile_norm_grads=compile_norms, **settings)
    except ValueError as e:
        raise UserError(f"objective: {e}") from None
    module = FineTuner(model, objective, data.evaluate, layer_groups=cfg.model.get("layer_groups"), **cfg.optim)
    trainer = make_trainer(cfg, logger, keep_on_device, callbacks=callbacks or [])
    trainer.fit(module, datamodule=data)
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
        # keep the epoch that is best on the monitored (ID validation) metric
        best = torch.load(trainer.checkpoint_callback.best_model_path, map_location=module.device, weights_only=True)
        module.load_state_dict(best["state_dict"])
    if cfg.test:
        trainer.test(module, datamodule=data, verbose=False)
    module.results.update(skip_counts(getattr(data, "skipped", {})))  # dataset.on_bad_image=skip: dropped examples
    return module


def evaluate(cfg: DictConfig, model: CLIPClassifier, data: WildsDataModule,
             keys: tuple[str, ...] = TEST_KEYS) -> dict[str, float]:
    """The dataset's metrics for ``model`` as it is (zero-shot, WiSE-FT, ...) on the given splits."""
    module = FineTuner(model, CompositeObjective({"ce": 1.0}, []), data.evaluate, lr=0.0, weight_decay=0.0)
    trainer = make_trainer(cfg, enable_progress_bar=False)
    if keys == VAL_KEYS:
        trainer.validate(module, datamodule=data, verbose=False)
    else:
        trainer.test(module, datamodule=data, verbose=False)
    return module.results


def wandb_offline() -> bool:
    """No login, no prompt: W&B runs offline (``wandb sync`` later) unless WANDB_MODE says otherwise."""
    if "WANDB_MODE" in os.environ:
        return False
    netrc = Path.home() / ".netrc"
    logged_in = "WANDB_API_KEY" in os.environ or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return not logged_in


def make_logger(cfg: DictConfig, trial=None, **wandb_run: str):
    """The configured Lightning logger; a W&B run is grouped by study and named after its trial
    (or by ``wandb_run``: group, name, job_type)."""
    if not cfg.get("logger"):
        return None
    extra: dict[str, Any] = {}
    if cfg.logger._target_.endswith("WandbLogger"):
        extra["offline"] = wandb_offline()
        if trial is not None:
            extra.update(group=trial.study.study_name, name=f"trial-{trial.number}", job_type="trial")
        extra.update(wandb_run)
    logger = hydra.utils.instantiate(cfg.logger, **extra)
    params = OmegaConf.to_container(cfg, resolve=True)
    if trial is not None:
        params["trial"] = {"number": trial.number, "params": trial.params}
    logger.log_hyperparams(params)
    return logger


@rank_zero_only
def finish_logger(logger, results: dict[str, float]) -> None:
    """Final metrics as the run's summary; close a W&B run so the next job in this process starts clean.
    Rank 0 only: under DDP the other ranks' W&B experiment is a stand-in without a summary."""
    if type(logger).__name__ == "WandbLogger":
        logger.experiment.summary.update(results)
        logger.experiment.finish()


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
    from hydra_plugins.autoft_optuna_sweeper import trial_from_config

    trial = trial_from_config(cfg)
    model, data = build(cfg, reuse=True)  # the next trial in this process reuses model and data
    data.val_keys = validation_keys(cfg, search=trial is not None)
    logger = make_logger(cfg, trial)
    metric = cfg.dataset.get("search_metric") or cfg.dataset.metric  # few-shot: neg_ce (accuracy is too coarse)
    key = f"val_ood/{metric}"
    callbacks = [OptunaPruning(trial, key)] if trial is not None else []
    module = finetune(cfg, model, data, logger, callbacks, keep_on_device=True)  # the next trial starts there
    finish_logger(logger, module.results)
    if module.trainer.is_global_zero:  # DDP: every rank has the same results; one writes them
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "results.json", json.dumps(module.results, indent=1, sort_keys=True))
    keys = [f"{split}/{metric}" for split in cfg.returns]
    missing = [k for k in keys if k not in module.results]
    if missing:
        raise UserError(f"metric(s) {missing} not produced; available: {sorted(module.results)}")
    values = [module.results[k] for k in keys]
    log.info("%s", ", ".join(f"{k} = {v:.4f}" for k, v in zip(keys, values, strict=True)))
    return values[0] if len(values) == 1 else values


@hydra.main(config_path=CONF_DIR, config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float | list[float]:
    try:
        return run(cfg)
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records it as this trial's failure and goes on
        # a DataLoader worker re-raises with its traceback in the message: its last line is the error
        print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
