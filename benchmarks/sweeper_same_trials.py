"""Same seed, same trials: the first trials of a project search on a tiny world, before and after a sweeper change.

Runs ``python -m autoft.finetune -m search=<embedded|autoft>`` (tiny world, 2 inner steps) with the ``autoft`` it
imports (this checkout, or an old tree put first on PYTHONPATH) and records each trial's params and value;
``--compare`` then puts two records of each search side by side and says whether params and values are identical:

    AUTOFT_CACHE=/work/cache-x python benchmarks/sweeper_same_trials.py --tag before   # on the old commit
    AUTOFT_CACHE=/work/cache-x python benchmarks/sweeper_same_trials.py --tag after    # on the new commit
    python benchmarks/sweeper_same_trials.py --compare before after
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import yaml

from autoft import atomic_write

OUT = Path(__file__).resolve().parent / "results" / "2026-11-30-cpu"
TINY = ["dataset.world.n_train=240", "dataset.world.n_id_val=60", "dataset.world.n_id_test=80",
        "dataset.world.n_ood_val=80", "dataset.world.n_ood_test=100", "model.pretrain.n_web=256",
        "model.pretrain.steps=3", "model.pretrain.batch_size=32", "dataset.batch_size=16", "dataset.ood_val_size=40",
        "search.inner_steps=2", "search.eval_every=2", "logger=csv"]
# Before 26dd8fd search=autoft's study name used the ${hydra:...} resolver, which crashed the command at its start:
# naming the study on the command line runs it on both sides (the name does not change what is sampled).
EXTRA = {"autoft": ["hydra.sweeper.study_name=autoft-embedded-tiny_clip"]}


def record(tag: str, search: str, n_trials: int, commit: str | None) -> Path:
    """Run the search in a throwaway sweep dir; write its trials to ``sweeper-same-trials[-<search>]-<tag>.json``."""
    commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "autoft.finetune", "-m", f"search={search}", f"hydra.sweeper.n_trials={n_trials}",
               *TINY, *EXTRA.get(search, []), f"hydra.sweep.dir={tmp}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        name = yaml.safe_load(Path(tmp, "best_params.yaml").read_text())["study_name"]
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/optuna.db")
        trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                  for t in study.trials]
    out = OUT / f"sweeper-same-trials{_suffix(search)}-{tag}.json"
    atomic_write(out, json.dumps({"commit": commit, "command": " ".join(cmd[1:-1]), "trials": trials}, indent=1) + "\n")
    return out


def _suffix(search: str) -> str:
    return "" if search == "embedded" else f"-{search}"


def compare(a: str, b: str, search: str) -> str:
    """A text table of both records' params, and whether they are identical."""
    runs = {tag: json.loads((OUT / f"sweeper-same-trials{_suffix(search)}-{tag}.json").read_text()) for tag in (a, b)}
    lines = [f"{tag}: commit {run['commit']}: {run['command']}" for tag, run in runs.items()]
    for ta, tb in zip(runs[a]["trials"], runs[b]["trials"], strict=True):
        for tag, t in ((a, ta), (b, tb)):
            params = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
            lines.append(f"trial {t['number']} {tag:>6}: value {t['value']} | {params}")
    same_params = [t["params"] for t in runs[a]["trials"]] == [t["params"] for t in runs[b]["trials"]]
    same_values = [t["value"] for t in runs[a]["trials"]] == [t["value"] for t in runs[b]["trials"]]
    lines.append(f"search={search}: params identical: {same_params}; values identical: {same_values}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", help="record this checkout's trials under this name")
    parser.add_argument("--search", nargs="+", default=["embedded", "autoft"], choices=["embedded", "autoft"])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--commit", help="the commit to record (default: this checkout's HEAD)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two records of each search")
    args = parser.parse_args()
    for search in args.search if args.tag else []:
        print(record(args.tag, search, args.trials, args.commit))
    if args.compare:
        text = "\n".join(compare(*args.compare, search) for search in args.search)
        (OUT / "sweeper-same-trials.txt").write_text(text)
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
