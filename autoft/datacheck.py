"""``autoft-data check dataset=<name> [--sample N] [--workers N] [key=value ...]``: is a dataset root complete?

Lists every file and split the dataset config needs as present, missing or malformed (with the one
line a fine-tuning run would fail with), reading the metadata with the same code a run uses. Then it
opens every image the splits reference and decodes it in full (:func:`autoft.imagecheck.verify_file`;
arrays and HDF5 rows are read through their dataset), in parallel threads with a progress bar on
stderr, and names each bad file and what is wrong with it. ``--sample N`` checks a seeded random N of
the images instead (a quick look at a 200k-image dataset); ``--sample 0`` only the metadata. Exit
status: 0 all present, 1 something missing, malformed or a bad image, 2 bad command or config. Never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
from omegaconf import DictConfig

from autoft import UserError

USAGE = ("usage: autoft-data check dataset=<name> [--sample N] [--workers N] [dataset.root=DIR] [key=value ...]"
         "  (root default: $AUTOFT_DATA)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoft-data", usage=USAGE, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["check"])
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="check a seeded random N of the images (default: all; 0: metadata only)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads decoding images (default: every available CPU)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides: dataset=<name>, dataset.root=DIR, ...")
    return p


def _items(d: DictConfig, root: str):
    """The checks of one dataset (each returns a short summary or raises a one-line :class:`UserError`),
    and a function giving the images of the named splits once their checks have passed."""
    from autoft.datasets import benchmark, kind_of
    from autoft.imagecheck import Items, dataset_items, file_items
    from autoft.wildscheck import present, wilds_checks

    if kind_of(d) == "wilds":
        folder = wilds_checks(d.name, root, d.get("class_names"))
        splits = [item.removeprefix("split ") for item in folder.checks if item.startswith("split ")]
        return folder.checks, lambda names: {s: file_items(folder.images(s)) for s in splits if s in names}
    bench = benchmark(d, root)
    built: dict[str, Items] = {}

    def split(key: str, build) -> Callable[[], str]:
        def run() -> str:
            s = build()
            s.check(key)
            built[key] = dataset_items(s.images, s.source)
            return f"{len(s.labels)} examples, {s.n_labels} classes"
        return run

    items = {str(bench.folder.relative_to(root)): lambda: present(bench.folder)}
    items["class names"] = lambda: f"{len(bench.class_names())} names"
    splits = {f"split {key}": split(key, build) for key, build in bench.splits.items()}
    return items | splits, lambda names: {s: built[s] for s in built if s in names}


def check(d: DictConfig, root: str) -> tuple[list[tuple[str, str, str]], Callable[[], dict]]:
    """``(item, status, detail)`` rows (status: present, missing, malformed or not checked), and the
    images of the splits that were read."""
    from autoft import MissingData

    try:
        items, images = _items(d, root)
    except UserError as e:
        return [(d.name, "missing" if isinstance(e, MissingData) else "malformed", str(e))], dict
    rows = []
    for item, run in items.items():
        try:
            rows.append((item, "present", run()))
        except MissingData as e:
            rows.append((item, "missing", str(e)))
        except UserError as e:
            rows.append((item, "malformed", str(e)))
        except Exception:  # a check that needs what an earlier, failed one reads (e.g. a split's rows)
            rows.append((item, "not checked", "needs the items above"))
    present = {item.removeprefix("split ") for item, status, _ in rows if status == "present"}
    return rows, lambda: images(present)


def check_images(splits: dict, sample: int | None, seed: int, workers: int | None) -> list[tuple[str, str, str]]:
    """``(split, file, problem)`` of every bad image among the splits' (or a seeded sample of them)."""
    from autoft.imagecheck import available_cpus, scan

    total = sum(len(items) for items in splits.values())
    if sample is not None and sample < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=sample, replace=False))
        print(f"checking a random {sample} of the {total} images (--seed {seed}), "
              f"{workers or available_cpus()} threads")
    else:
        chosen = np.arange(total)
        print(f"checking all {total} images, {workers or available_cpus()} threads")
    sys.stdout.flush()
    bad, start = [], 0
    for split, items in splits.items():
        mine = chosen[(chosen >= start) & (chosen < start + len(items))] - start
        start += len(items)
        if not len(mine):
            continue
        part = items.take(mine)
        found = scan(part, workers, desc=f"split {split}", progress=True)
        bad += [(split, part.name(i), problem) for i, problem in sorted(found.items())]
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list:
        print(USAGE, file=sys.stderr)
        return 2
    parser = _parser()
    try:
        args = parser.parse_intermixed_args(args_list)
    except SystemExit as e:  # argparse has printed the usage and its error (or the help)
        return 0 if e.code == 0 else 2
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from autoft.finetune import CONF_DIR

    try:
        if (args.sample is not None and args.sample < 0) or (args.workers is not None and args.workers < 1):
            raise UserError("--sample must be 0 or more and --workers 1 or more")
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            d = compose("finetune", overrides=args.overrides).dataset
        if d.get("world") is not None and not d.root:
            print("the embedded world is generated in the cache on first use: nothing to check")
            return 0
        root = d.root or os.environ.get("AUTOFT_DATA")
        if not root:
            raise UserError(f"no data root for dataset '{d.name}': set dataset.root=... or AUTOFT_DATA")
        rows, images = check(d, str(root))
    except (UserError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{d.name} under {root}:")
    width = max(len(item) for item, _, _ in rows)
    for item, status, detail in rows:
        print(f"  {status:<11} {item:<{width}}  {detail}")
    problems = [status for _, status, _ in rows if status != "present"]
    splits = images()
    if args.sample != 0 and splits:
        bad = check_images(splits, args.sample, args.seed, args.workers)
        for split, name, problem in bad:
            print(f"  bad image   {name}  {problem}  [split {split}]")
        checked = min(args.sample, sum(map(len, splits.values()))) if args.sample else sum(map(len, splits.values()))
        print(f"{checked} images checked: {len(bad)} bad")
        problems += ["bad image"] * len(bad)
    if problems:
        kinds = ("missing", "malformed", "not checked", "bad image")
        counts = ", ".join(f"{problems.count(s)} {s}" for s in kinds if s in problems)
        print(f"{len(problems)} problem(s): {counts}")
        return 1
    print("all present" + ("" if args.sample == 0 else ", every image checked reads in full"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
