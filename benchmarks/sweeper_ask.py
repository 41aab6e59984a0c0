"""What the sweeper's ask and tell cost a trial, against SQLite's commit settings.

"Between trials" (Hydra's job set-up, the sweeper's ask and tell) is 0.40 s a trial on a quiet CPU, more than
the trial's own overhead (docs/speed.md). Optuna's ``study.ask`` writes each of a trial's suggested params in a
transaction of its own, so the embedded search's 11 params are 11 SQLite commits, each waiting for the disk.
This times ``ask`` (with a search config's distributions, as the sweeper parses them), the sweeper's worker
attribute and ``tell`` on an SQLite file, with SQLite's defaults (what the sweeper uses) and with ``journal_mode=WAL,
synchronous=NORMAL`` (commits without waiting for the disk; safe against a killed process, not against a
power cut) to size that lever before anyone takes it. TPE's first 10 trials are random; later ones model.

    python benchmarks/sweeper_ask.py [--search embedded] --trials 30 \
        --out benchmarks/results/2026-11-30-cpu/sweeper-ask.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from proxy_fidelity import search_space
from sqlalchemy import event

SETTINGS = {"sqlite defaults": [], "WAL, synchronous=NORMAL": ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL"]}


def measure(db: Path, pragmas: list[str], space: dict, trials: int) -> list[dict[str, float]]:
    """Seconds of ask (with ``space``'s distributions), the worker attribute and tell, per trial, on a new study
    in ``db``."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    if pragmas:
        @event.listens_for(storage.engine, "connect")
        def _pragmas(connection, _record) -> None:
            for pragma in pragmas:
                connection.execute(pragma)
        storage.engine.dispose()  # connections from now on run the pragmas
    study = optuna.create_study(storage=storage, study_name="ask", direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    rows = []
    for k in range(trials):
        t0 = time.perf_counter()
        trial = study.ask(space)
        t1 = time.perf_counter()
        trial.set_user_attr("worker", "bench")
        t2 = time.perf_counter()
        study.tell(trial, 0.5 + 0.001 * k)
        rows.append({"ask": t1 - t0, "worker attr": t2 - t1, "tell": time.perf_counter() - t2})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--search", default="embedded", help="the search config whose space is asked (conf/search/)")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--dir", type=Path, default=None, help="where the SQLite files go (default: a temporary folder)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    optuna.logging.set_verbosity(logging.WARNING)
    space = search_space(args.search, []).distributions
    report: dict = {"search": args.search, "trials": args.trials, "params": len(space),
                    "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for i, (name, pragmas) in enumerate(SETTINGS.items()):
            rows = measure(Path(tmp) / f"study{i}.db", pragmas, space, args.trials)
            report[name] = {"pragmas": pragmas, "per_trial": rows, "median_ms": {
                part: {"trials 1-10": 1000 * statistics.median(r[part] for r in rows[:10]),
                       "trials 11..": 1000 * statistics.median(r[part] for r in rows[10:])} for part in rows[0]}}
    report["load_average_after"] = os.getloadavg()[0]
    lines = [f"sweeper ask/tell, search={args.search}, {len(space)} params, {args.trials} trials, load average "
             f"{report['load_average_before']:.2f} before, {report['load_average_after']:.2f} after; median ms",
             "| SQLite | part | trials 1-10 | trials 11.. |", "|---|---|---|---|"]
    for name in SETTINGS:
        for part, m in report[name]["median_ms"].items():
            lines.append(f"| {name} | {part} | {m['trials 1-10']:.1f} | {m['trials 11..']:.1f} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
