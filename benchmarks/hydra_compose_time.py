"""One Hydra composition's seconds, with and without the tests' parse-once cache (tests/hydra_cache.py).

    python -m benchmarks.hydra_compose_time --out benchmarks/results/2026-12-01-cpu/hydra-compose-time.json

A methods job's config on the tests' tiny world (benchmark.yaml, method=flyp, Hydra's node returned), composed
``--reps`` times each way, interleaved so that the machine's drift falls on both; the median of each is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from autoft import atomic_write
from autoft.finetune import CONF_DIR
from tests import hydra_cache
from tests.conftest import overrides

OVERRIDES = ["study=x", "method=flyp", *overrides()]


def _once() -> float:
    tic = time.perf_counter()
    compose("benchmark", overrides=OVERRIDES, return_hydra_config=True)
    return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("outputs/hydra-compose-time.json"))
    args = parser.parse_args(argv)
    own, cached = [], []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        _once()  # Hydra's plugin scan and the first imports, on neither side
        hydra_cache.install()
        _once()  # the files parsed once
        for _ in range(args.reps):
            with hydra_cache.uninstalled():
                own.append(_once())
            cached.append(_once())
    result = {"overrides": ["benchmark", *OVERRIDES], "reps": args.reps,
              "hydra_median_s": statistics.median(own), "cached_median_s": statistics.median(cached),
              "hydra_s": own, "cached_s": cached}
    print(f"one composition: Hydra {result['hydra_median_s']:.3f} s, parse-once {result['cached_median_s']:.3f} s "
          f"(medians of {args.reps})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
