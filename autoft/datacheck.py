"""``autoft-data check dataset=<name> [dataset.root=DIR] [key=value ...]``: is a dataset root complete?

Lists every file and split the dataset config needs as present, missing or malformed (with the one
line a fine-tuning run would fail with), reading the data with the same loaders a run uses. Exit
status: 0 all present, 1 something missing or malformed, 2 bad command or config. Never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from autoft import UserError

USAGE = "usage: autoft-data check dataset=<name> [dataset.root=DIR] [key=value ...]  (root default: $AUTOFT_DATA)"


def _items(d: DictConfig, root: str) -> dict[str, Callable[[], str]]:
    """The checks of one dataset: each returns a short summary or raises a one-line :class:`UserError`."""
    from autoft.data import present, wilds_checks
    from autoft.datasets import benchmark, kind_of

    if kind_of(d) == "wilds":
        return wilds_checks(d.name, root, d.get("class_names"))
    bench = benchmark(d, root)

    def split(build) -> Callable[[], str]:
        def run() -> str:
            s = build()
            s.check_labels()
            return f"{len(s.labels)} examples, {s.n_labels} classes"
        return run

    items = {str(bench.folder.relative_to(root)): lambda: present(bench.folder)}
    items["class names"] = lambda: f"{len(bench.class_names())} names"
    return items | {f"split {key}": split(build) for key, build in bench.splits.items()}


def check(d: DictConfig, root: str) -> list[tuple[str, str, str]]:
    """``(item, status, detail)`` rows; status is present, missing, malformed or not checked."""
    from autoft.data import MissingData

    try:
        items = _items(d, root)
    except UserError as e:
        return [(d.name, "missing" if isinstance(e, MissingData) else "malformed", str(e))]
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
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "check" or any(a in ("-h", "--help") for a in args):
        print(USAGE, file=sys.stderr)
        return 0 if any(a in ("-h", "--help") for a in args) else 2
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from autoft.finetune import CONF_DIR

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            d = compose("finetune", overrides=args[1:]).dataset
        if d.get("world") is not None and not d.root:
            print("the embedded world is generated in the cache on first use: nothing to check")
            return 0
        root = d.root or os.environ.get("AUTOFT_DATA")
        if not root:
            raise UserError(f"no data root for dataset '{d.name}': set dataset.root=... or AUTOFT_DATA")
        rows = check(d, str(root))
    except (UserError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{d.name} under {root}:")
    width = max(len(item) for item, _, _ in rows)
    for item, status, detail in rows:
        print(f"  {status:<11} {item:<{width}}  {detail}")
    problems = [status for _, status, _ in rows if status != "present"]
    if problems:
        counts = ", ".join(f"{problems.count(s)} {s}" for s in ("missing", "malformed", "not checked") if s in problems)
        print(f"{len(problems)} problem(s): {counts}")
        return 1
    print("all present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
