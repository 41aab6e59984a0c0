"""AutoFT over several search seeds on the embedded world, with and without pruning.

Runs the main job (``autoft.pipeline``) once per seed (world, pretraining and search seed), then,
with ``--pruned``, again with a successive-halving pruner, and prints a table of OOD/ID test
macro-F1 (mean and std over seeds) and the inner steps each search spent in total.

    python benchmarks/search_seeds.py --seeds 0 1 2 [--pruned] [--out outputs/search_seeds]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import optuna
import yaml

from autoft import atomic_write
from autoft.pipeline import main as pipeline

PRUNING = ["hydra/sweeper/pruner=successive_halving", "hydra.sweeper.pruner.min_resource=10",
           "hydra.sweeper.pruner.reduction_factor=3", "search.eval_every=10"]


def inner_steps(run: Path, seed: int) -> int:
    name = yaml.safe_load((run / "search" / "best_params.yaml").read_text())["study_name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run / 'search/optuna.db'}")
    return sum(t.user_attrs.get("inner_steps", 0) for t in study.trials)


def collect(run: Path, seed: int) -> dict[str, float]:
    rows = json.loads((run / "results.json").read_text())["results"]
    out = {f"{m} {k}": v for m, r in rows.items() for k, v in r.items()}
    out["inner steps"] = inner_steps(run, seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pruned", action="store_true", help="also run each search with pruning")
    parser.add_argument("--trials", type=int, default=None, help="default: search=embedded's n_trials")
    parser.add_argument("--out", type=Path, default=Path("outputs/search_seeds"))
    args = parser.parse_args(argv)
    variants = {"unpruned": []} | ({"pruned": PRUNING} if args.pruned else {})
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name, extra in variants.items():
        for seed in args.seeds:
            run = args.out / name / f"seed{seed}"
            argv_run = ["--seed", str(seed), "--out", str(run), "logger=csv"]
            argv_run += ["--trials", str(args.trials)] if args.trials else []
            argv_run += [a for o in extra for a in ("--search-override", o)]
            if pipeline(argv_run) != 0:
                return 2
            results.setdefault(name, {})[seed] = collect(run, seed)
            atomic_write(args.out / "results.json", json.dumps(results, indent=1))
    lines = ["| search | metric | mean | std | per seed |", "|---|---|---|---|---|"]
    for name, per_seed in results.items():
        for key in next(iter(per_seed.values())):
            vals = [r[key] for r in per_seed.values()]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            lines.append(f"| {name} | {key} | {statistics.fmean(vals):.3f} | {std:.3f} | "
                         + ", ".join(f"{v:.3f}" if key != "inner steps" else str(int(v)) for v in vals) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "table.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
