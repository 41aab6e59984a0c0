"""Time the tests moved to the fork server (tests/forkserver.py), before and after, with the same command.

    python benchmarks/forkserver_tests_time.py [--before 6935874] [--out benchmarks/results/<date>-<machine>/...]

Runs ``pytest -q -n 2 --dist loadgroup --durations=0`` on the converted tests (NODES), once in a ``git archive``
export of the ``--before`` commit (its tests, this checkout's installed package) and once in this checkout, under
``nice -n 15`` and one thread per worker (the shared 2-core machine's rule). Prints and writes, per side: wall
seconds, pytest's summary line and the load average before and after; and every test's call + setup seconds on
both sides, to a JSON file. test_methods' clash check is not in NODES: it sits inside the 90 s embedded wilds table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODES = [
    "tests/test_faults.py",
    "tests/test_postgres.py",
    "tests/test_sweeper_released.py",
    "tests/test_search.py::test_killed_search_resumes_to_exactly_n_trials",
    "tests/test_search.py::test_final_rejects_a_missing_best_file",
    "tests/test_badimages.py::test_checker_command_line_shows_progress_and_no_traceback",
    "tests/test_badimages.py::test_a_run_ends_with_one_line_naming_the_bad_file_and_its_split",
    "tests/test_datasets.py::test_data_checker_command_line_has_no_traceback",
    "tests/test_layers.py::test_a_trainable_parameter_in_no_group_is_one_error_line",
    "tests/test_conventions.py::test_converter_cli_counts_vit_b16_and_converts_the_published_weights",
    "tests/test_conventions.py::test_reference_convention_on_a_model_that_does_not_train_everything_is_one_error_line",
    "tests/test_finetune.py::test_cli_bad_input_is_one_line_and_nonzero",
    "tests/test_speed.py::test_a_process_ends_only_after_its_prefetch_threads_stopped",
    "tests/test_sweeper.py::test_cli_bad_space_exits_nonzero_and_writes_nothing",
    "tests/test_sweeper.py::test_joblib_launcher_runs_each_batch_in_parallel_processes",
    "tests/test_sweeper.py::test_submitit_local_launcher_runs_trials",
]
DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)")
SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+, )*\d+ \w+.* in [\d.]+s.*?)\s*=*$")


def run(tree: Path) -> tuple[dict, dict[str, float]]:
    """The converted tests in ``tree``: figures and each test's seconds (setup + call + teardown)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["nice", "-n", "15", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
           "--dist", "loadgroup", "--durations=0", *NODES]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    per_test: dict[str, float] = defaultdict(float)
    for line in proc.stdout.splitlines():
        if m := DURATION.match(line):
            per_test[m.group(3)] += float(m.group(1))
    summary = next((m.group(1) for line in reversed(proc.stdout.splitlines()) if (m := SUMMARY.match(line.strip()))),
                   None)
    return ({"returncode": proc.returncode, "wall_s": round(wall, 1), "pytest_summary": summary,
             "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)},
            {k: round(v, 2) for k, v in per_test.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="6935874", help="commit whose tests are the 'before' side")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "2026-12-01-cpu" / "forkserver-tests-time.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=export, check=True)
        before, before_tests = run(Path(tmp))
    after, after_tests = run(ROOT)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"before": {"commit": args.before, **before}, "after": {"commit": commit, **after},
              "nodes": NODES,
              "tests": {k: {"before_s": before_tests.get(k), "after_s": after_tests.get(k)}
                        for k in sorted(set(before_tests) | set(after_tests))}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for side in ("before", "after"):
        print(side, json.dumps(result[side]))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
