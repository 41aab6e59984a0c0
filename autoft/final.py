"""Final training with a searched objective, and WiSE-FT.

``python -m autoft.final best=<sweep dir>/best_params.yaml`` retrains from the pretrained weights
with exactly the best trial's hyperparameters (the searched lr included; the reference code let
its scheduler overwrite it), keeps the checkpoint best on the ID validation metric, tests it on
ID and OOD, and then evaluates WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned weights.
"""

from __future__ import annotations

if __name__ == "__main__":  # bad data, missing weights, a command Hydra rejects: told before the imports below (12 s)
    from autoft.best_params import load_best_params
    from autoft.preflight import preflight

    preflight("final", first=lambda cfg: load_best_params(cfg.best, cfg.study.storage, cfg.study.name, cfg.pick),
              app="autoft.final")

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint

from autoft import UserError, atomic_write
from autoft.best_params import load_best_params
from autoft.finetune import CONF_DIR, build, evaluate, finetune
from autoft.loggers import finish_logger, make_logger
from autoft.model import CLIPClassifier, interpolate

log = logging.getLogger(__name__)


def apply_params(cfg: DictConfig, params: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with each searched ``dotted.key: value`` set, exactly as the trial had it."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in params.items():
            OmegaConf.update(cfg, key.lstrip("+"), value, force_add=True)
    return cfg


def final_train(cfg: DictConfig, params: dict[str, Any], out_dir: Path,
                prepare: Callable[[CLIPClassifier, Any], None] | None = None, **wandb_run: str) -> dict[str, Any]:
    """Retrain with ``params``, keep the best-ID-val epoch, test it, then WiSE-FT over ``cfg.wise_alphas``.

    ``prepare(model, data)`` changes the model after the zero-shot weights are kept and before
    training (LP-FT starts from its linear probe; WiSE-FT still mixes with the zero-shot weights).
    ``wandb_run`` (group, name, job_type, tags) places the run beside its study's trials in W&B."""
    cfg = apply_params(cfg, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, data = build(cfg)
    zero_shot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if prepare is not None:
        prepare(model, data)
    metric = cfg.dataset.metric
    best_ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best-{epoch}", monitor=f"val_id/{metric}",
                                mode="max", save_top_k=1, save_weights_only=True)
    logger = make_logger(cfg, **({"job_type": "final"} | wandb_run))
    module = finetune(cfg, model, data, logger, callbacks=[best_ckpt])  # tests the best epoch (ckpt_path="best")
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    writer = module.trainer.is_global_zero  # DDP: every rank holds the same weights and metrics; one writes
    if writer:
        atomic_write(out_dir / "finetuned.pt", lambda f: torch.save(tuned, f))
    wise = []
    for alpha in cfg.wise_alphas:
        model.load_state_dict(interpolate(zero_shot, tuned, float(alpha)))
        res = evaluate(cfg, model, data)  # under DDP too: on every rank, over the whole test splits
        # few-shot and transfer sets have no OOD test set: their "ood" is None
        wise.append({"alpha": float(alpha), "id": res[f"test_id/{metric}"], "ood": res.get(f"test_ood/{metric}")})
        log.info("WiSE-FT alpha %.2f: ID %.4f OOD %s", alpha, wise[-1]["id"], wise[-1]["ood"])
    model.load_state_dict(tuned)
    score = best_ckpt.best_model_score  # None when the budget ended before any validation
    summary = {"params": params, "results": module.results, "examples": module.examples, "wise": wise,
               "best_checkpoint": best_ckpt.best_model_path,
               "best_epoch_metric": None if score is None else float(score)}
    if logger is not None:
        logger.log_metrics({f"wise/{w['alpha']}/{k}": w[k] for w in wise for k in ("id", "ood") if w[k] is not None})
    finish_logger(logger, module.results)
    if writer:
        atomic_write(out_dir / "final.json", json.dumps(summary, indent=1, default=float))
    return summary


@hydra.main(config_path=CONF_DIR, config_name="final", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        params = load_best_params(cfg.best, cfg.study.storage, cfg.study.name, cfg.pick)
        summary = final_train(cfg, params, Path(cfg.output_dir))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    results = summary["results"]
    return results.get(f"test_ood/{cfg.dataset.metric}", results[f"test_id/{cfg.dataset.metric}"])


if __name__ == "__main__":
    main()
