"""Does AutoFT earn its place? Issue 13's targets, checked on a WILDS table written by benchmarks/paper.py.

    python benchmarks/autoft_targets.py outputs/paper/wilds/table.csv [--proxy outputs/proxy/seed10/summary.json]

Per target: the measured figure, the threshold, and whether it is met; paired differences are taken seed by seed
(seed k of one method against seed k of the other: on the embedded world seed k is world k, so the pairing
removes the world's own spread). Writes ``targets.json`` beside the table and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from autoft import atomic_write

SINGLE_MODELS = ("lpft", "l2sp", "flyp")  # the hand-designed robust fine-tuning methods of the paper's tables


def _per_seed(row: dict) -> list[float]:
    return [100 * float(v) for v in row["ood_per_seed"].split()]


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    diff = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(diff), statistics.stdev(diff) if len(diff) > 1 else 0.0


def targets(rows: dict[str, dict], proxy: dict | None) -> list[dict]:
    """Issue 13's 'done when' list, each as {target, measured, threshold, met}."""
    auto, ft = _per_seed(rows["autoft"]), _per_seed(rows["ft"])
    mean, std = _paired(auto, ft)
    best = max(SINGLE_MODELS, key=lambda m: statistics.fmean(_per_seed(rows[m])))
    best_ood = statistics.fmean(_per_seed(rows[best]))
    wise_mean, wise_std = _paired(_per_seed(rows["autoft+wise"]), _per_seed(rows["ft+wise"]))
    per_seed = ", ".join(f"{a - f:+.1f}" for a, f in zip(auto, ft, strict=True))
    out = [
        {"target": "AutoFT OOD - FT OOD >= +2 points", "measured": f"{mean:+.2f} (per seed {per_seed})",
         "threshold": "+2.00", "met": mean >= 2},
        {"target": "... and >= 2x its paired std", "measured": f"{mean:+.2f} vs 2 x {std:.2f}",
         "threshold": f"{2 * std:.2f}", "met": mean >= 2 * std and mean > 0},
        {"target": "AutoFT OOD >= best hand-designed single model OOD - 0.5",
         "measured": f"{statistics.fmean(auto):.2f} vs {rows[best]['label']} {best_ood:.2f}",
         "threshold": f"{best_ood - 0.5:.2f}", "met": statistics.fmean(auto) >= best_ood - 0.5},
        {"target": "AutoFT + WiSE-FT OOD >= FT + WiSE-FT OOD",
         "measured": f"{wise_mean:+.2f} ± {wise_std:.2f} (paired)", "threshold": "+0.00", "met": wise_mean >= 0},
    ]
    if proxy is not None:
        for run, stats in proxy["runs"].items():
            rho = stats["sampled"]["spearman"]
            out.append({"target": f"proxy Spearman >= 0.6 at {run} ({stats['sampled']['n']} sampled)",
                        "measured": "n/a" if rho is None else f"{rho:.2f}", "threshold": "0.60",
                        "met": rho is not None and rho >= 0.6 and stats["sampled"]["n"] >= 24})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", type=Path, help="a table.csv of benchmarks/paper.py wilds")
    parser.add_argument("--proxy", type=Path, default=None, help="a summary.json of benchmarks/proxy_fidelity.py")
    args = parser.parse_args(argv)
    with open(args.table) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    missing = {"autoft", "ft", "autoft+wise", "ft+wise", *SINGLE_MODELS} - set(rows)
    if missing:
        print(f"error: {args.table} has no row for {', '.join(sorted(missing))}", file=sys.stderr)
        return 2
    proxy = json.loads(args.proxy.read_text()) if args.proxy else None
    result = targets(rows, proxy)
    atomic_write(args.table.parent / "targets.json", json.dumps(result, indent=1))
    lines = ["| target | measured | threshold | met |", "|---|---|---:|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['threshold']} | {'yes' if t['met'] else '**no**'} |"
              for t in result]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
