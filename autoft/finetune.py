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
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from autoft import UserError
from autoft.data import WildsDataModule, wilds_folder
from autoft.model import CLIPClassifier, load_clip
from autoft.objective import CompositeObjective

log = logging.getLogger(__name__)
VAL_KEYS, TEST_KEYS = ("val_id", "val_ood"), ("test_id", "test_ood")


class FineTuner(pl.LightningModule):
    """Fine-tunes a :class:`CLIPClassifier` with a :class:`CompositeObjective`.

    AdamW at the given lr from the first step: ``constant`` for the search's short inner loops
    (the reference code hid them inside a 500-step warmup, so they barely trained), or linear
    warmup then cosine decay for full runs. Metrics are the dataset's own (``evaluate``), logged
    as ``val_id/``, ``val_ood/``, ``test_id/``, ``test_ood/``; training terms under ``train/``.
    """

    def __init__(self, model: CLIPClassifier, objective: CompositeObjective, evaluate, lr: float,
                 weight_decay: float, schedule: str = "constant", warmup_steps: int = 0):
        super().__init__()
        if schedule not in ("constant", "cosine"):
            raise UserError(f"unknown lr schedule '{schedule}'; use constant or cosine")
        self.model, self.objective, self.evaluate = model, objective, evaluate
        self.lr, self.weight_decay, self.schedule, self.warmup_steps = lr, weight_decay, schedule, warmup_steps
        self._outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self.results: dict[str, float] = {}

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        feats = self.model.image_features(x)
        logits = self.model.head(feats)
        text = self.model.caption_features(y) if self.objective.needs_text else None
        loss, terms = self.objective(logits, y, feats, text, self.model.logit_scale)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in terms.items()})
        return loss

    def _collect(self, batch, dataloader_idx: int) -> None:
        x, y, meta = batch
        self._outputs.setdefault(dataloader_idx, []).append((self.model(x).argmax(-1).cpu(), y.cpu(), meta.cpu()))

    def _report(self, keys: tuple[str, ...]) -> None:
        for idx, key in enumerate(keys):
            preds, ys, metas = (torch.cat(t) for t in zip(*self._outputs.pop(idx, []), strict=True))
            metrics = {f"{key}/{k}": v for k, v in self.evaluate(preds, ys, metas).items()}
            self.results.update(metrics)
            self.log_dict(metrics, add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._collect(batch, dataloader_idx)

    def on_validation_epoch_end(self):
        self._report(VAL_KEYS)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._collect(batch, dataloader_idx)

    def on_test_epoch_end(self):
        self._report(TEST_KEYS)

    def configure_optimizers(self):
        params = [p for _, p in self.model.trainable()]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                fused=self.device.type == "cuda")
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
    root = cfg.dataset.root or os.environ.get("AUTOFT_DATA")
    if not root:
        raise UserError(f"no data root for dataset '{cfg.dataset.name}': set dataset.root=... or AUTOFT_DATA")
    wilds_folder(cfg.dataset.name, root)
    return root


def build(cfg: DictConfig) -> tuple[CLIPClassifier, WildsDataModule, Any, Any]:
    """Model, data and transforms from a composed config."""
    root = dataset_root(cfg)  # first: a bad path fails before minutes of pretraining
    clip, train_tf, eval_tf, tokenizer = load_clip(cfg.model.name, resolve_pretrained(cfg))
    d = cfg.dataset
    data = WildsDataModule(d.name, root, train_tf, eval_tf, batch_size=d.batch_size,
                           eval_batch_size=d.eval_batch_size, num_workers=d.num_workers,
                           ood_val_size=d.ood_val_size, ood_val_balanced=d.ood_val_balanced,
                           subset_seed=d.subset_seed, class_names=d.get("class_names"))
    model = CLIPClassifier(clip, tokenizer, data.class_names, list(d.templates),
                           train_text=cfg.model.train_text)
    return model, data, train_tf, eval_tf


def make_trainer(cfg: DictConfig, logger=None, **overrides) -> pl.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) | overrides
    if kwargs.get("precision") == "auto":  # bf16 autocast where a GPU exists, fp32 on CPU
        kwargs["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return pl.Trainer(logger=logger if logger is not None else False, **kwargs)


def finetune(cfg: DictConfig, model: CLIPClassifier, data: WildsDataModule, logger=None) -> FineTuner:
    """Fine-tune ``model`` in place with the configured objective; validate and (optionally) test."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        objective = CompositeObjective(OmegaConf.to_container(cfg.objective.weights), model.trainable())
    except ValueError as e:
        raise UserError(f"objective: {e}") from None
    module = FineTuner(model, objective, data.evaluate, **cfg.optim)
    trainer = make_trainer(cfg, logger)
    trainer.fit(module, datamodule=data)
    if cfg.test:
        trainer.test(module, datamodule=data, verbose=False)
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


def run(cfg: DictConfig) -> float:
    """One fine-tuning run; writes ``results.json``; returns the OOD validation metric."""
    model, data, _, _ = build(cfg)
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else None
    module = finetune(cfg, model, data, logger)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(module.results, indent=1, sort_keys=True))
    tmp.replace(out / "results.json")
    key = f"val_ood/{cfg.dataset.metric}"
    if key not in module.results:
        raise UserError(f"metric '{cfg.dataset.metric}' not produced; available: "
                        f"{sorted(k for k in module.results if k.startswith('val_ood/'))}")
    log.info("%s = %.4f", key, module.results[key])
    return module.results[key]


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
