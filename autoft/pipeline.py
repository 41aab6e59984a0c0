"""The main job, end to end: search, final training, WiSE-FT, report.

``python -m autoft.pipeline`` (what ``make run`` runs) on the embedded world:

1. the world and the tiny CLIP (generated and pretrained once, then cached);
2. the AutoFT search: ``python -m autoft.finetune -m search=embedded`` through the project's
   Optuna sweeper (a persistent study: re-running the command resumes it);
3. final training with the best objective, and plain fine-tuning (ce) at the same budget;
4. WiSE-FT of both over an alpha grid;
5. a report in the run directory: results table (markdown, JSON), the best objective, and plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import optuna
import yaml
from hydra import compose, initialize_config_dir

from autoft import UserError, atomic_write
from autoft.best_params import load_best_params
from autoft.datasets import open_data
from autoft.final import final_train
from autoft.finetune import CONF_DIR, dataset_root, resolve_pretrained
from autoft.methods import launch_search

log = logging.getLogger("autoft.pipeline")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=False)


def search(out: Path, seed: int, trials: int | None, extra: list[str]) -> Path:
    """Run (or resume) the embedded search in a child process; return its best_params.yaml."""
    return launch_search(out / "search", [
        "search=embedded", f"dataset.world.seed={seed}", f"hydra.sweeper.sampler.seed={seed}",
        *([f"hydra.sweeper.n_trials={trials}"] if trials else []), *extra])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="world, pretraining and search seed")
    parser.add_argument("--trials", type=int, default=None,
                        help="search trials, finished across restarts (default: search=embedded's n_trials)")
    parser.add_argument("--epochs", type=int, default=6, help="final-training budget, same for every method")
    parser.add_argument("--alpha", type=float, default=0.5, help="WiSE-FT alpha reported in the table")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default outputs/main/seed<S>)")
    parser.add_argument("--search-override", action="append", default=[], metavar="OVERRIDE",
                        help="extra Hydra override for the search, e.g. hydra/sweeper/pruner=median")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. logger=csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # open_clip logs every load at INFO on the root logger
    for name in ("autoft", "hydra_plugins"):
        logging.getLogger(name).setLevel(logging.INFO)
    out = (args.out or Path("outputs/main") / f"seed{args.seed}").resolve()
    common = [f"dataset.world.seed={args.seed}", *args.overrides]
    t0 = time.time()
    try:
        log.info("embedded world (a procedural stand-in, not iWildCam) and tiny CLIP, seed %d", args.seed)
        base = _compose("final", [*common, f"output_dir={out}"])
        open_data(base.dataset, dataset_root(base))  # generate the world once (then cached) and check it
        resolve_pretrained(base)  # pretrain the tiny CLIP once; cached afterwards
        t_search = time.time()
        best_file = search(out, args.seed, args.trials, [*common, *args.search_override])
        params = load_best_params(str(best_file))
        study_name = yaml.safe_load(best_file.read_text())["study_name"]  # whatever the search config named it
        t_search = time.time() - t_search
        final = [f"trainer.max_epochs={args.epochs}", "optim.warmup_steps=20", f"seed={args.seed}", *common]
        log.info("final training with the best objective: %s", params)
        group = study_name  # final runs sit beside their study's trials in W&B
        autoft = final_train(_compose("final", [*final, f"output_dir={out / 'autoft'}"]), params, out / "autoft",
                             group=group, name="final-autoft")
        log.info("plain fine-tuning (ce) at the same budget")
        plain = final_train(_compose("final", [*final, "objective=ce", f"output_dir={out / 'finetune'}"]), {},
                            out / "finetune", group=group, name="final-ce")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = _rows(plain, autoft, args.alpha)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{out / 'search' / 'optuna.db'}")
    best = {"params": params, "value": study.best_value if len(study.directions) == 1 else None,
            "search_seconds": round(t_search), "trials": len(study.trials)}
    wise = {"AutoFT + WiSE-FT": autoft["wise"], "FT + WiSE-FT": plain["wise"]}
    from autoft.report import write_report

    written = write_report(out, rows, best, wise, study, metric="macro-F1")
    if base.get("logger") and base.logger._target_.endswith("WandbLogger"):
        log_report_to_wandb(out, group, rows, written)
    print((out / "results.md").read_text())
    log.info("report: %s (%.0f s in all)", ", ".join(str(p) for p in written.values()), time.time() - t0)
    atomic_write(out / "timing.json", json.dumps({"total_s": time.time() - t0, "search_s": t_search}))
    return 0


def log_report_to_wandb(out: Path, group: str, rows: dict[str, dict[str, float]], files: dict[str, Path]) -> None:
    """The report (tables, plots, best params) as a W&B artifact in the study's group; offline without login."""
    import wandb

    from autoft.loggers import wandb_offline

    run = wandb.init(project="autoft", group=group, name="report", job_type="report", dir=str(out),
                     mode="offline" if wandb_offline() else None)
    run.summary.update({f"{m}/{k}": v for m, r in rows.items() for k, v in r.items()})
    art = wandb.Artifact(f"{group}-report", type="report")
    for path in files.values():
        art.add_file(str(path))
    run.log_artifact(art)
    run.finish()


def _rows(plain: dict, autoft: dict, alpha: float) -> dict[str, dict[str, float]]:
    def at(run: dict, a: float) -> dict[str, float]:
        point = min(run["wise"], key=lambda w: abs(w["alpha"] - a))
        return {"id": point["id"], "ood": point["ood"]}

    return {"zero-shot": at(plain, 0.0), "fine-tuning (ce)": at(plain, 1.0),
            f"FT + WiSE-FT (alpha {alpha})": at(plain, alpha), "AutoFT": at(autoft, 1.0),
            f"AutoFT + WiSE-FT (alpha {alpha})": at(autoft, alpha)}


if __name__ == "__main__":
    sys.exit(main())
