"""Time ``make test`` as CI runs it and keep pytest's own figures beside the wall clock.

    python benchmarks/make_test_time.py [--out benchmarks/results/<date>-<machine>/make-test-after-speedup.txt]

Runs ``make test`` from the repository root with the caller's environment (CI leaves OMP_NUM_THREADS unset; the
suite's conftest then gives each of the 2 xdist workers its share of the cores), then prints and writes: the wall
seconds of the whole command, pytest's summary line (its own total), its slowest-15 block, the commit, and the
1-minute load average before and after, since the figure is only as quiet as the machine was. The text file
holds those lines; a JSON file of the same name holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^=*\s*(?P<line>(?:\d+ \w+, )*\d+ \w+.* in (?P<s>[\d.]+)s.*?)\s*=*$")


def measure() -> tuple[dict, list[str]]:
    """Run make test once: its figures and the lines kept from its output."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(["make", "test"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if "slowest" in line and "durations" in line), None)
    slowest = lines[start + 1:start + 16] if start is not None else []
    summary = next((m for line in reversed(lines) if (m := SUMMARY.match(line.strip()))), None)
    figures = {"commit": commit, "returncode": proc.returncode, "wall_s": round(wall, 1),
               "pytest_summary": summary.group("line") if summary else None,
               "pytest_s": float(summary.group("s")) if summary else None,
               "load1_before": load_before, "load1_after": os.getloadavg()[0],
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "slowest": [{"s": float(line.split("s", 1)[0]), "test": line.split(None, 2)[-1]} for line in slowest]}
    kept = [f"# make test at {commit}: wall {wall:.1f} s, exit {proc.returncode}; OMP_NUM_THREADS="
            f"{figures['omp_num_threads'] or 'unset'}; load average (1 min) {load_before:.2f} before, "
            f"{figures['load1_after']:.2f} after", figures["pytest_summary"] or "(no pytest summary line)",
            *(lines[start:start + 16] if start is not None else [])]
    return figures, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/2026-11-30-cpu/make-test-after-speedup.txt")
    args = parser.parse_args(argv)
    figures, kept = measure()
    print("\n".join(kept))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from autoft import atomic_write

    atomic_write(args.out, "\n".join(kept) + "\n")
    atomic_write(args.out.with_suffix(".json"), json.dumps(figures, indent=1) + "\n")
    print(f"written: {args.out}, {args.out.with_suffix('.json')}")
    return figures["returncode"]


if __name__ == "__main__":
    sys.exit(main())
