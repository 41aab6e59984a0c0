"""How long each bad-input command of the test suite takes to its error, start to exit.

The tests that claim a command's exit status and its one error line run the command as a process (the claim is
the process). Each pays Python's start and whatever the command imports before it finds the error; a command
that imported torch, Lightning, open_clip and wilds first paid about 12 s here. This runs each such command
once in an empty folder (a temporary ``AUTOFT_CACHE``, nothing to find there), and records its wall and CPU
seconds (user + system: near the wall time of a quiet machine, where the wall time of a busy one is not), exit
status and last stderr line, then prints them and writes them to ``--out`` (JSON).

    .venv/bin/python benchmarks/cli_error_time.py --out benchmarks/results/2026-11-30-cpu/cli-error-time-after.json

To time another commit's code with this script: export its tree (``git archive COMMIT | tar -x -C DIR``) and run
with ``PYTHONPATH=DIR ... --commit COMMIT``: the commands then import that tree's autoft and read its conf/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autoft import atomic_write

# name: (command after `python`, what finds the error); the tests that run them are named in the commands' comments
COMMANDS: dict[str, tuple[list[str], str]] = {
    # tests/test_finetune.py::test_cli_bad_input_is_one_line_and_nonzero
    "finetune unknown dataset": (["-m", "autoft.finetune", "dataset=no_such_dataset"], "Hydra"),
    "finetune missing data folder": (["-m", "autoft.finetune", "dataset.world=null", "dataset.root=/no/such/root"],
                                     "preflight"),
    # tests/test_faults.py::test_unknown_config_names_are_hydra_one_liners
    "finetune unknown objective": (["-m", "autoft.finetune", "objective=nope", "hydra.run.dir=r"], "Hydra"),
    "finetune -m unknown dataset": (["-m", "autoft.finetune", "-m", "search=embedded", "dataset=nope",
                                     "hydra.sweep.dir=s"], "Hydra"),
    # tests/test_finetune.py::test_cli_bad_input_is_one_line_and_nonzero, on the tests' tiny world (tests/conftest.py)
    "finetune unknown loss term": (["-m", "autoft.finetune", "+objective.weights.foo=1", "TINY"],
                                   "the run (b97c6e0), the preflight (after)"),
    # tests/test_search.py::test_final_rejects_a_missing_best_file
    "final missing best_params": (["-m", "autoft.final", "best=/no/such/best_params.yaml"], "preflight"),
    "methods unknown method": (["-m", "autoft.methods", "-m", "method=nope"], "Hydra"),  # in no test
    # tests/test_conventions.py::test_converter_cli_counts_vit_b16_and_converts_the_published_weights
    "conventions bad --to": (["-m", "autoft.conventions", "objective=autoft_iwildcam", "dataset=iwildcam", "--to",
                              "theirs"], "argparse"),
    "conventions no class count": (["-m", "autoft.conventions", "objective=autoft_iwildcam", "dataset=iwildcam"],
                                   "the converter"),
}


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """One run of ``cmd``: wall and CPU seconds, exit status, the last stderr line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "returncode": proc.returncode,
            "first_stderr_line": lines[0] if lines else None, "last_stderr_line": lines[-1] if lines else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--commit", help="the commit whose tree PYTHONPATH points at (default: this checkout's)")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=root).stdout.strip()
    sys.path.insert(0, str(root))
    from tests.conftest import overrides  # the tests' tiny world
    results, load_before = {}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "AUTOFT_CACHE": str(Path(tmp) / "cache")}
        env.pop("AUTOFT_DATA", None)
        for name, (cmd, finder) in COMMANDS.items():
            cwd = Path(tmp) / name.replace(" ", "-")
            cwd.mkdir()
            cmd = [arg for c in cmd for arg in (overrides() if c == "TINY" else [c])]
            results[name] = {"command": "python " + " ".join(cmd), "found_by": finder,
                             **timed([sys.executable, *cmd], cwd, env), "wrote": sorted(os.listdir(cwd))}
            r = results[name]
            print(f"{r['wall_s']:6.2f} s wall {r['cpu_s']:6.2f} s cpu  exit {r['returncode']}  {name}: "
                  f"{r['last_stderr_line']}")
    figures = {"commit": commit, "pythonpath": os.environ.get("PYTHONPATH"), "load1_before": load_before,
               "load1_after": os.getloadavg()[0], "commands": results}
    atomic_write(args.out, json.dumps(figures, indent=1) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
