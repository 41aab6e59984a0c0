"""One fine-tuning run: the AutoFT inner loop as a LightningModule, and its Hydra app.

``python -m autoft.finetune dataset=embedded model=tiny_clip objective=robust`` fine-tunes once
and returns the OOD validation metric, which is what a sweeper optimises.
"""

from __future__ import annotations

if __name__ == "__main__":  # bad data, missing weights, a command Hydra rejects: told before the imports below (12 s)
    from autoft.preflight import preflight

    preflight("finetune", app="autoft.finetune", objective=True)

import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO

from autoft import UserError, atomic_write
from autoft.conventions import objective_settings
from autoft.data import WildsDataModule
from autoft.datasets import check_root, open_data, templates
from autoft.imagecache import file_stat
from autoft.imagecheck import skip_counts
from autoft.layers import optimizer_groups
from autoft.model import CLIPClassifier, load_clip
from autoft.objective import CompositeObjective
from autoft.preflight import CONF_DIR, configured_root
from autoft.world import config_hash

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per fit: noise, not news.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Under DDP, FineTuner gathers every rank's predictions and each rank computes the whole split's metrics
# (each example once): Lightning's advice to sync logged metrics or evaluate on one device does not apply.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level in distributed setting")
warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
VAL_KEYS, TEST_KEYS = ("val_id", "val_ood"), ("test_id", "test_ood")


class FineTuner(pl.LightningModule):
    """Fine-tunes a :class:`CLIPClassifier` with a :class:`CompositeObjective`.

    AdamW at the given lr from the first step: ``constant`` for the search's short inner loops
    (the reference code hid them inside a 500-step warmup, so they barely trained), or linear
    warmup then cosine decay for full runs. Metrics are the dataset's own (``evaluate``), logged
    as ``val_id/``, ``val_ood/``, ``test_id/``, ``test_ood/``; training terms under ``train/``.
    The norm terms' gradients are added in closed form before each optimizer step, so
    ``train/loss`` is the other terms' sum; the terms are logged on the steps Lightning writes (every
    ``log_every_n_steps``).
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
        written = self._logs_written()
        loss, terms = self.objective(logits, y, feats, text, self.model.logit_scale, norm_values=written)
        self._losses.append(loss.detach())
        if written or self.trainer.progress_bar_callback is not None:
            self.log("train/loss", loss, prog_bar=True)
        if written:
            self.log_dict({f"train/{k}": v for k, v in terms.items()})
        return loss

    def _logs_written(self) -> bool:
        """Whether Lightning writes this training step's logged values to the loggers: step k (0-based) when k + 1
        is a multiple of ``log_every_n_steps``, or when stopping (its ``LoggerConnector.should_update_logs``).

        The terms are logged only then: a value logged on another step is overwritten before it is written, yet
        each ``self.log`` costs about 0.6 ms on CPU (an objective's terms: several ms per step, paid by every
        trial) and a norm term's value a pass over the weights. Only ``train/loss`` is logged every step while a
        progress bar shows it."""
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def _test_keys(self) -> tuple[str, ...]:
        """The data module's test loader names (ImageNet has several OOD test sets), else test_id, test_ood."""
        return tuple(getattr(self.trainer.datamodule, "test_keys", TEST_KEYS))

    def _val_keys(self) -> tuple[str, ...]:
        """The data module's validation loader names: val_id, val_ood (search trials: see
        autoft.trial.validation_keys)."""
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
    root = configured_root(cfg.dataset)
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


def make_trainer(cfg: DictConfig, logger=None, **overrides) -> pl.Trainer:
    """The configured Trainer; ``overrides``: any other ``pl.Trainer`` arguments (a search trial's strategy)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) | overrides
    if kwargs.get("precision") == "auto":  # bf16 autocast where a GPU exists, fp32 on CPU
        kwargs["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    return pl.Trainer(logger=logger if logger is not None else False, **kwargs)


def finetune(cfg: DictConfig, model: CLIPClassifier, data: WildsDataModule, logger=None,
             callbacks: list[pl.Callback] | None = None, early_epoch: bool = False, **trainer_overrides) -> FineTuner:
    """Fine-tune ``model`` in place with the configured objective; validate and (optionally) test.
    ``early_epoch``: start the first training epoch's batches before the trainer is built (one device only: under
    DDP Lightning rebuilds the loader); ``trainer_overrides``: other ``pl.Trainer`` arguments (see
    :func:`make_trainer`)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if early_epoch and hasattr(data, "start_train_epoch"):
        data.start_train_epoch()
    compile_norms = cfg.model.get("compile_norm_grads", cfg.model.get("compile", False))
    settings = objective_settings(cfg, model)  # convention, per-layer-group norm weights
    try:
        objective = CompositeObjective(OmegaConf.to_container(cfg.objective.weights), model.trainable(),
                                       closed_form_norms=True, compile_norm_grads=compile_norms, **settings)
    except ValueError as e:
        raise UserError(f"objective: {e}") from None
    module = FineTuner(model, objective, data.evaluate, layer_groups=cfg.model.get("layer_groups"), **cfg.optim)
    trainer = make_trainer(cfg, logger, callbacks=callbacks or [], **trainer_overrides)
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


@hydra.main(config_path=CONF_DIR, config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float | list[float]:
    from autoft.trial import run

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
