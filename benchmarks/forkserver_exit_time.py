"""How long a fork server job takes to exit once its work is done (tests/forkserver.py).

    python -m benchmarks.forkserver_exit_time --out benchmarks/results/<date>-<machine>/forkserver-exit-time.json
    python -m benchmarks.forkserver_exit_time --server tests/_forkserver_old.py --label before ...

A job like the tests' (compose the fine-tuning config, open and run an Optuna study on SQLite, build the tiny CLIP)
stamps ``time.monotonic()`` as its last statement; the client stamps when it sees the exit status. The gap is the
process's shutdown; the median over ``--reps`` jobs is written, with the whole job's wall time. ``--server`` runs
another copy of the server script (e.g. an older commit's, saved beside the original for its imports) to compare.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autoft import atomic_write

ROOT = Path(__file__).resolve().parents[1]
JOB = """\
import sys, time
import optuna
from hydra import compose, initialize_config_dir
from autoft.finetune import CONF_DIR
from autoft.model import load_clip
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    compose("finetune", overrides=["model.pretrained=null", "~model.pretrain"])
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(storage=f"sqlite:///{sys.argv[1]}", study_name="x", load_if_exists=True)
study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
load_clip("autoft-tiny")
print(time.monotonic())
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--server", type=Path, default=ROOT / "tests" / "forkserver.py")
    parser.add_argument("--label", default="current")
    parser.add_argument("--out", type=Path, default=Path("outputs/forkserver-exit-time.json"))
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location("forkserver_under_test", args.server)
    server = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
    spec.loader.exec_module(server)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exits, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.py"
        job.write_text(JOB)
        for i in range(args.reps + 1):  # the first starts the server: not counted
            tic = time.monotonic()
            proc = server.Popen([sys.executable, str(job), str(Path(tmp) / "o.db")], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate()
            toc = time.monotonic()
            if proc.returncode != 0:
                print(f"job failed ({proc.returncode}): {err.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            if i:
                exits.append(toc - float(out.split()[-1]))
                walls.append(toc - tic)
    result = {"label": args.label, "server": str(args.server.resolve().relative_to(ROOT)), "reps": args.reps,
              "exit_median_s": statistics.median(exits), "job_median_s": statistics.median(walls),
              "exit_s": exits, "job_s": walls}
    print(f"{args.label}: exit {result['exit_median_s']:.3f} s of a {result['job_median_s']:.3f} s job "
          f"(medians of {args.reps})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    atomic_write(args.out, json.dumps({**results, args.label: result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
