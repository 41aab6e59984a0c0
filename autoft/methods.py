"""The fine-tuning methods of the paper's tables, each a ``method=`` config run by one Hydra app.

``python -m autoft.methods -m method=zeroshot,lp,ft,lpft,l2sp,flyp,autoft seed=0,1,2 dataset=...``
trains and evaluates every method the same way: the same data module, the same Lightning loop
(:func:`autoft.final.final_train`: full budget, the epoch best on ID validation, ID and OOD test),
the same metrics, and WiSE-FT of the result against the zero-shot weights. Methods differ only in
what their config sets:

* zero-shot: no training (``method.train: false``, whatever budget the suite sets);
* linear probe (LP): logistic regression on frozen image features, computed once per model, data
  and split and cached under ``$AUTOFT_CACHE/features``; L-BFGS with its L2 penalty chosen on ID
  validation (the CLIP paper's recipe); no fine-tuning;
* LP-FT: that probe as the head, then full fine-tuning;
* FT, L2-SP, FLYP: full fine-tuning with their objectives (FLYP classifies with the zero-shot head
  of its fine-tuned text tower, ``model.text_head``);
* AutoFT: the AutoFT search (``method.search``, a child process running the project's Optuna
  sweeper, resumable), then final training with the best trial's hyperparameters; or, with
  ``method.search=null``, training with the composed objective (e.g. the published
  ``objective=autoft_iwildcam``).

Each job writes ``method.json`` (its row for :mod:`benchmarks/paper.py`); a job whose
``method.json`` holds the same configuration is not run again, so a killed suite resumes.
"""

from __future__ import annotations

if __name__ == "__main__":  # bad data, missing weights, a command Hydra rejects: told before the imports below (12 s)
    from autoft.preflight import preflight

    preflight("benchmark", app="autoft.methods")

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from autoft import UserError, atomic_write
from autoft.best_params import load_best_params
from autoft.datasets import open_data
from autoft.final import final_train
from autoft.finetune import CONF_DIR, dataset_root, weights_signature
from autoft.model import CLIPClassifier
from autoft.world import cache_dir, config_hash

log = logging.getLogger(__name__)
# Overrides of the benchmark job that are not the search's business: the search sets its own budget,
# optimiser, objective and outputs.
_NOT_FOR_SEARCH = ("method", "seed", "trainer", "optim", "objective", "wise_alphas", "output_dir", "returns",
                   "test", "study", "hydra", "lp")


# ------------------------------------------------------------------------------------ linear probe

def feature_file(cfg: DictConfig, key: str) -> Path:
    """Where the frozen image features of split ``key`` live: keyed by model, weights file and dataset."""
    sig = weights_signature(cfg) | {"dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "split": key}
    return cache_dir() / "features" / f"{cfg.dataset.name}-{key}-{config_hash(sig)}.pt"


@torch.no_grad()
def frozen_features(cfg: DictConfig, model: CLIPClassifier, data, key: str) -> dict[str, torch.Tensor]:
    """Normalised image features, labels and metadata of split ``key`` (un-augmented), computed once."""
    path = feature_file(cfg, key)
    if path.is_file():
        return torch.load(path, weights_only=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    feats, ys, metas = [], [], []
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for x, y, meta in data.plain_batches(key, device):
            feats.append(model.image_features(x).float().cpu())
            ys.append(torch.as_tensor(y))
            metas.append(torch.as_tensor(meta))
    out = {"features": torch.cat(feats), "y": torch.cat(ys), "metadata": torch.cat(metas)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(out, f))
    return out


def logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, reg: float, max_iter: int,
                        init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, ``mean CE + reg * ||W||^2``, by full-batch L-BFGS on ``x``'s device."""
    w = torch.zeros(n_classes, x.shape[1], device=x.device) if init is None else init[0].clone()
    b = torch.zeros(n_classes, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + reg * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_linear_probe(cfg: DictConfig, model: CLIPClassifier, data) -> dict[str, Any]:
    """Set ``model.head`` to a logistic regression on frozen train features, its penalty picked on ID
    validation with the dataset's metric (strongest penalty first, each fit warm-starting the next)."""
    train, val = frozen_features(cfg, model, data, "train"), frozen_features(cfg, model, data, "val_id")
    metric, n_classes = cfg.dataset.metric, model.head.out_features
    device = "cuda" if torch.cuda.is_available() else "cpu"  # ImageNet: 1.28M features x 1000 classes
    x, y = train["features"].to(device), train["y"].to(device)
    best: dict[str, Any] = {}
    init = None
    for reg in sorted(cfg.lp.regs, reverse=True):
        init = logistic_regression(x, y, n_classes, float(reg), cfg.lp.max_iter, init)
        preds = (val["features"].to(device) @ init[0].T + init[1]).argmax(-1).cpu()
        score = data.evaluate(preds, val["y"], val["metadata"])[metric]
        log.info("linear probe: reg %g -> val_id/%s %.4f", reg, metric, score)
        if not best or score > best["val_id"]:
            best = {"reg": float(reg), "val_id": score, "weights": init}
    w, b = best.pop("weights")
    with torch.no_grad():
        model.head.weight.copy_(w.to(model.head.weight))
        model.head.bias.copy_(b.to(model.head.bias))
    return best


# ------------------------------------------------------------------------------------------ search

def launch_search(sweep_dir: Path, overrides: list[str]) -> Path:
    """Run (or resume) an AutoFT search as a Hydra multirun in a child process; its best_params.yaml."""
    cmd = [sys.executable, "-m", "autoft.finetune", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    log.info("search: %s", " ".join(cmd[1:]))
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"the search failed (see its output above); re-running resumes it: {' '.join(cmd)}")
    return sweep_dir / "best_params.yaml"


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def search_overrides(cfg: DictConfig, job_overrides: list[str]) -> list[str]:
    """The search's overrides: the job's data/model/logger ones, the dataset's search budget (trials, inner
    steps, and its batch size unless the job sets dataset.batch_size), the method's sampler and search
    settings, seeded by the job's seed. A key given twice keeps its last value (an objective-transfer run
    searches on ``dataset=<source>`` while it trains on another)."""
    keep = [o for o in job_overrides if _key(o).split(".", 1)[0] not in _NOT_FOR_SEARCH]
    budget = cfg.dataset.get("budget") or {}
    budget_overrides = [f"{key}={budget[name]}" for name, key in
                        (("trials", "hydra.sweeper.n_trials"), ("inner_steps", "search.inner_steps")) if name in budget]
    batch = [f"dataset.batch_size={budget.inner_batch_size}"] if "inner_batch_size" in budget else []
    name = f"autoft-{cfg.study}-{cfg.method.name}-seed{cfg.seed}"
    ordered = [f"search={cfg.method.search}", *batch, *keep, *budget_overrides, f"hydra.sweeper.study_name={name}",
               f"hydra.sweeper.sampler.seed={cfg.seed}", f"hydra/sweeper/sampler={cfg.method.sampler}",
               *cfg.method.search_overrides]
    last = {_key(o): i for i, o in enumerate(ordered)}
    return [o for i, o in enumerate(ordered) if last[_key(o)] == i]


# -------------------------------------------------------------------------------------------- jobs

def run(cfg: DictConfig, job_overrides: list[str]) -> dict[str, Any]:
    """One method at one seed: train (or not), test, WiSE-FT; writes and returns its ``method.json`` row."""
    out = Path(cfg.output_dir)
    record_file = out / "method.json"
    key = config_hash(OmegaConf.to_container(cfg, resolve=True) | {"output_dir": None})
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("config_hash") != key:
            raise UserError(f"{record_file} holds another configuration's results; choose another "
                            f"hydra.sweep.dir (or delete that run) instead of overwriting them")
        log.info("%s seed %s: already done (%s)", cfg.method.label, cfg.seed, record_file)
        return record
    t0 = time.time()
    if not cfg.method.train:  # a budget given for the whole suite (trainer.max_epochs=6) must not train these
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.trainer.max_epochs, cfg.trainer.max_steps = 0, -1
    params: dict[str, Any] = {}
    searched: dict[str, Any] | None = None
    if cfg.method.search:
        open_data(cfg.dataset, dataset_root(cfg))  # bad data: one line here, before the search loads weights
        searched = load_best_params(str(launch_search(out / "search", search_overrides(cfg, job_overrides))))
        params = {k: v for k, v in searched.items() if k != "seed"}  # the final run's seed is the benchmark seed
    probe: dict[str, Any] = {}

    def prepare(model: CLIPClassifier, data) -> None:
        probe.update(fit_linear_probe(cfg, model, data))

    run_name = f"{cfg.method.name}-seed{cfg.seed}"
    summary = final_train(cfg, params, out, prepare=prepare if cfg.method.linear_probe else None,
                          group=cfg.study, name=run_name, job_type=cfg.method.name,
                          tags=[cfg.method.name, cfg.study])
    metric = cfg.dataset.metric
    results = summary["results"]
    record = {
        "method": cfg.method.name, "label": cfg.method.label, "seed": cfg.seed, "study": cfg.study,
        "metric": metric, "id": results[f"test_id/{metric}"], "ood": results.get(f"test_ood/{metric}"),
        "ood_sets": {k.split("/")[0]: v for k, v in results.items()
                     if k.endswith(f"/{metric}") and k.startswith("test_") and k.split("/")[0] not in
                     ("test_id", "test_ood")},
        "wise": summary["wise"], "searched_params": searched, "linear_probe": probe or None,
        "seconds": round(time.time() - t0, 1), "config_hash": key,
    }
    if rank_zero_only.rank == 0:  # DDP: every rank has the same record (gathered metrics); one writes it
        atomic_write(record_file, json.dumps(record, indent=1, default=float))
    log.info("%s seed %s: ID %.4f OOD %s (%.0f s)", cfg.method.label, cfg.seed, record["id"], record["ood"],
             record["seconds"])
    return record


@hydra.main(config_path=CONF_DIR, config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        record = run(cfg, list(HydraConfig.get().overrides.task))
    except UserError as e:
        print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)
    return record["ood"] if record["ood"] is not None else record["id"]


if __name__ == "__main__":
    main()
