"""Same seed, same trials: the first trials of ``search=embedded`` on a tiny world, before and after a sweeper change.

Runs ``python -m autoft.finetune -m search=embedded`` (tiny world, 2 inner steps) in the checkout it is run from and
records each trial's params and value; ``--compare`` then puts two such records side by side and says whether the
params (and values) are identical. Run it once on the old commit and once on the new one:

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

OUT = Path(__file__).resolve().parent / "results" / "2026-11-30-cpu"
TINY = ["dataset.world.n_train=240", "dataset.world.n_id_val=60", "dataset.world.n_id_test=80",
        "dataset.world.n_ood_val=80", "dataset.world.n_ood_test=100", "model.pretrain.n_web=256",
        "model.pretrain.steps=3", "model.pretrain.batch_size=32", "dataset.batch_size=16", "dataset.ood_val_size=40",
        "search.inner_steps=2", "search.eval_every=2", "logger=csv"]


def record(tag: str, n_trials: int) -> Path:
    """Run the search in a throwaway sweep dir; write its trials to ``sweeper-same-trials-<tag>.json``."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "autoft.finetune", "-m", "search=embedded", f"hydra.sweeper.n_trials={n_trials}",
               *TINY, f"hydra.sweep.dir={tmp}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        study = optuna.load_study(study_name="autoft-embedded-seed0", storage=f"sqlite:///{tmp}/optuna.db")
        trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                  for t in study.trials]
    out = OUT / f"sweeper-same-trials-{tag}.json"
    out.write_text(json.dumps({"commit": commit, "command": " ".join(cmd[1:-1]), "trials": trials}, indent=1) + "\n")
    return out


def compare(a: str, b: str) -> str:
    """A text table of both records' params, and whether they are identical."""
    runs = {tag: json.loads((OUT / f"sweeper-same-trials-{tag}.json").read_text()) for tag in (a, b)}
    lines = [f"{tag}: commit {run['commit']}: {run['command']}" for tag, run in runs.items()]
    for ta, tb in zip(runs[a]["trials"], runs[b]["trials"], strict=True):
        for tag, t in ((a, ta), (b, tb)):
            params = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
            lines.append(f"trial {t['number']} {tag:>6}: value {t['value']} | {params}")
    same_params = [t["params"] for t in runs[a]["trials"]] == [t["params"] for t in runs[b]["trials"]]
    same_values = [t["value"] for t in runs[a]["trials"]] == [t["value"] for t in runs[b]["trials"]]
    lines.append(f"params identical: {same_params}; values identical: {same_values}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", help="record this checkout's trials under this name")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two records")
    args = parser.parse_args()
    if args.tag:
        print(record(args.tag, args.trials))
    if args.compare:
        text = compare(*args.compare)
        (OUT / "sweeper-same-trials.txt").write_text(text)
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
