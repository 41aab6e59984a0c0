"""Seconds to make one search trial's job config: Hydra's own composition against the sweeper's derived config.

    python benchmarks/sweep_compose.py [--trials 20] [--out benchmarks/results/<date>-<machine>/sweep-compose.json]

Hydra's launcher asks the config loader for each job's config (``load_sweep_config``). The sweeper hands it a loader
that composes the first job and derives the rest from it where only param values differ
(hydra_plugins/autoft_optuna_sweeper/_compose.py). This times both on the embedded search's jobs as the sweeper
builds them (the command's fixed overrides, the trial's params, its job dir and storage handle; new values each
trial), in this process, after one warm-up composition, and checks that both give the same config.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from autoft import atomic_write
from autoft.finetune import CONF_DIR
from hydra_plugins.autoft_optuna_sweeper._compose import DerivedSweepConfigs

WEIGHTS = ["hinge", "entropy", "dcm", "flyp", "l1init", "l2init", "l1zero", "l2zero"]


def job(number: int, rng: random.Random) -> list[str]:
    """One trial's overrides, in the sweeper's shape (the embedded search's space)."""
    return ["search=embedded", "dataset.world.seed=0",
            *(f"objective.weights.{w}={10 ** rng.uniform(-4, 1)}" for w in WEIGHTS),
            f"optim.lr={10 ** rng.uniform(-4.5, -2.5)}", f"optim.weight_decay={rng.random()}",
            f"seed={rng.randrange(11)}", f"hydra.sweep.subdir={number}",
            "++optuna_trial.storage='sqlite:///optuna.db'", "++optuna_trial.study_name=autoft-embedded-seed0",
            f"++optuna_trial.trial_id={number + 1}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("outputs/sweep-compose.json"))
    args = parser.parse_args(argv)
    rng = random.Random(0)
    jobs = [job(n, rng) for n in range(args.trials)]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().hydra.config_loader
        master = loader.load_configuration("finetune", ["search=embedded", "hydra.sweep.dir=outputs/x"],
                                           run_mode=RunMode.MULTIRUN)
        loader.load_sweep_config(master, jobs[0])  # warm-up: imports, first file reads
        timings: dict[str, list[float]] = {"hydra": [], "derived": []}
        configs = {}
        for name, source in (("hydra", loader), ("derived", DerivedSweepConfigs(loader))):
            made = []
            for overrides in jobs:
                tic = time.perf_counter()
                made.append(source.load_sweep_config(master, overrides))
                timings[name].append(time.perf_counter() - tic)
            configs[name] = [OmegaConf.to_yaml(c) for c in made]
    same = configs["hydra"] == configs["derived"]
    result = {
        "trials": args.trials, "same_configs": same, "machine": platform.machine(),
        "seconds_per_job": {name: {"first": round(t[0], 4), "median_rest": round(statistics.median(t[1:]), 4),
                                   "mean": round(statistics.fmean(t), 4)} for name, t in timings.items()},
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
