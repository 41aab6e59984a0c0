"""What wilds' readers of a WILDS dataset folder rely on, checked before wilds reads it.

wilds asserts deep inside its readers (or reads a wrong column silently); these checks say, in one line,
which file and field is wrong. They need only pandas and numpy, not wilds' dataset modules or torch,
so an entry point runs them first (:mod:`autoft.preflight`: seconds, where importing the training
stack takes about 12 s here), and ``autoft-data check`` lists them one by one.
"""

from __future__ import annotations

import ast
import datetime
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoft import MissingData, UserError

WILDS_FOLDERS = {"iwildcam": "iwildcam_v2.0", "fmow": "fmow_v1.1"}
WILDS_SPLITS = ("train", "id_val", "id_test", "val", "test")


def class_names_from(folder: Path) -> list[str]:
    """Class names from the dataset's ``categories.csv`` (columns ``y`` and ``name``)."""
    path = folder / "categories.csv"
    if not path.is_file():
        raise MissingData(f"{path} not found: class names are needed for the zero-shot head "
                          f"(or set dataset.class_names)")
    df = pd.read_csv(path)
    if not {"y", "name"} <= set(df.columns):
        raise UserError(f"{path}: expected columns 'y' and 'name', found {list(df.columns)}")
    return [str(n) for n in df.sort_values("y")["name"]]


@cache
def fmow_categories() -> list[str]:
    """FMoW's 62 categories in wilds' label order: the list literal ``categories`` of wilds' FMoW module, read
    from its source, since importing that module imports torch (8 s here) and these checks run before it."""
    spec = importlib.util.find_spec("wilds.datasets.fmow_dataset")
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "categories" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"no 'categories' list in {spec.origin}: this wilds version keeps FMoW's classes elsewhere")


def fmow_class_names() -> list[str]:
    """FMoW's 62 categories, in wilds' label order, as words ("airport_hangar" -> "airport hangar")."""
    return [c.replace("_", " ") for c in fmow_categories()]


def wilds_folder(name: str, root: str | Path) -> Path:
    """The dataset's folder under ``root``, or one clear error if it is not there."""
    if name not in WILDS_FOLDERS:
        raise UserError(f"unknown WILDS dataset '{name}'; known: {', '.join(WILDS_FOLDERS)}")
    folder = Path(root) / WILDS_FOLDERS[name]
    if not folder.is_dir():
        raise MissingData(f"{name}: data folder {folder} does not exist (set dataset.root "
                          f"to the folder that holds {WILDS_FOLDERS[name]}/)")
    return folder


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise MissingData(f"{path} not found")
    df = pd.read_csv(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; expected {list(columns)}, found {list(df.columns)}")
    return df


def _integers(df: pd.DataFrame, column: str, path: Path, contiguous: bool) -> np.ndarray:
    """A column of non-negative integers; ``contiguous``: every value 0..max is used (wilds asserts it)."""
    values = pd.to_numeric(df[column], errors="coerce")
    if values.isna().any() or (values % 1 != 0).any() or (values < 0).any():
        bad = df[column][values.isna() | (values % 1 != 0) | (values < 0)].iloc[0]
        raise UserError(f"{path}: column '{column}' must hold non-negative integers, found {bad!r}")
    values = values.to_numpy(dtype=np.int64)
    if contiguous and len(values) and len(np.unique(values)) != values.max() + 1:
        gaps = sorted(set(range(values.max() + 1)) - set(values.tolist()))[:5]
        raise UserError(f"{path}: column '{column}' must use every value 0..{values.max()} (wilds requires it); "
                        f"missing {gaps}")
    return values


def _first_missing_image(paths: Sequence[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingData(f"{what}: image file missing: {missing[0]}{more}")


def _split_rows(name: str, splits: dict[str, np.ndarray], path: Path, images: Callable[[np.ndarray], list[Path]],
                split: str) -> str:
    rows = splits[split]
    if not len(rows):
        raise MissingData(f"{path}: split '{split}' has no rows")
    _first_missing_image(images(rows), f"{name} split '{split}'")
    return f"{len(rows)} examples"


@dataclass
class FolderChecks:
    """What wilds' reader of one dataset folder relies on: ``checks``, in order, each returning a summary
    or raising one clear line (later ones use what earlier ones read), and ``images(split)``, the image
    files a split's rows reference (once the metadata check has run)."""

    checks: dict[str, Callable[[], str]]
    images: Callable[[str], list[Path]]


def iwildcam_checks(folder: Path, class_names: Sequence[str] | None) -> FolderChecks:
    """What wilds' iWildCam v2.0 reader relies on."""
    path = folder / "metadata.csv"
    cache: dict[str, Any] = {}  # what metadata() read, for the split checks
    names = list(class_names or [])

    def categories() -> str:
        names.extend(class_names_from(folder))
        return f"{len(names)} class names"

    def metadata() -> str:
        df = _read_csv(path, ["split", "filename", "y", "location_remapped", "sequence_remapped", "datetime"])
        bad = sorted(set(df["split"].astype(str)) - set(WILDS_SPLITS))
        if bad:
            raise UserError(f"{path}: column 'split' has unknown value(s) {bad}; expected {list(WILDS_SPLITS)}")
        y = _integers(df, "y", path, contiguous=False)
        if names and len(y) and y.max() >= len(names):
            raise UserError(f"{path}: column 'y' has label {y.max()} out of range 0..{len(names) - 1} "
                            f"({len(names)} class names)")
        _integers(df, "y", path, contiguous=True)
        for column in ("location_remapped", "sequence_remapped"):
            _integers(df, column, path, contiguous=True)
        try:
            df["datetime"].astype(str).map(lambda t: datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S.%f"))
        except ValueError as e:
            raise UserError(f"{path}: column 'datetime' must read as YYYY-MM-DD hh:mm:ss.ffffff: {e}") from None
        cache["files"] = df["filename"].astype(str).to_numpy()
        cache["splits"] = {s: np.flatnonzero(df["split"].to_numpy() == s) for s in WILDS_SPLITS}
        return f"{len(df)} rows, {y.max() + 1 if len(y) else 0} classes"

    def images(rows: np.ndarray) -> list[Path]:
        return [folder / "train" / f for f in cache["files"][rows]]

    checks: dict[str, Callable[[], str]] = {"RELEASE_v2.0.txt": lambda: present(folder / "RELEASE_v2.0.txt")}
    if not class_names:
        checks["categories.csv"] = categories
    checks["metadata.csv"] = metadata
    for split in WILDS_SPLITS:
        checks[f"split {split}"] = lambda s=split: _split_rows("iwildcam", cache["splits"], path, images, s)
    return FolderChecks(checks, lambda split: images(cache["splits"][split]))


def fmow_checks(folder: Path) -> FolderChecks:
    """What wilds' FMoW v1.1 reader relies on (default split scheme: OOD years from 2013, test from 2016)."""
    categories = fmow_categories()
    path = folder / "rgb_metadata.csv"
    cache: dict[str, Any] = {}  # what metadata() read, for the split checks

    def metadata() -> str:
        df = _read_csv(path, ["split", "category", "country_code", "timestamp"])
        bad = sorted(set(df["split"].astype(str)) - {"train", "val", "test", "seq"})
        if bad:
            raise UserError(f"{path}: column 'split' has unknown value(s) {bad}; expected train, val, test, seq")
        unknown = sorted(set(df["category"].astype(str)) - set(categories))
        if unknown:
            raise UserError(f"{path}: column 'category' has label(s) {unknown[:3]} outside FMoW's 62 categories")
        try:
            ts = pd.to_datetime(df["timestamp"], format="ISO8601")
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: column 'timestamp' must be ISO 8601 with a timezone: {e}") from None
        if not isinstance(ts.dtype, pd.DatetimeTZDtype):
            raise UserError(f"{path}: column 'timestamp' needs a timezone (e.g. 2016-03-01T10:00:00Z), "
                            f"found {df['timestamp'].iloc[0]!r}")
        year = ts.dt.tz_convert("UTC").dt.year.to_numpy()  # wilds compares with UTC years
        if len(year) and (year.min() < 2002 or year.max() > 2017):
            raise UserError(f"{path}: column 'timestamp' has years outside 2002..2017, which wilds cannot group")
        split = df["split"].to_numpy()
        ood_val, ood_test = (year >= 2013) & (year < 2016), year >= 2016
        cache["splits"] = {
            "train": np.flatnonzero((split == "train") & (year < 2013)),
            "id_val": np.flatnonzero((split == "val") & (year < 2013)),
            "id_test": np.flatnonzero((split == "test") & (year < 2013)),
            "val": np.flatnonzero((split == "val") & ood_val),
            "test": np.flatnonzero((split == "test") & ood_test),
        }
        return f"{len(df)} rows"

    def regions() -> str:
        df = _read_csv(folder / "country_code_mapping.csv", ["alpha-3", "region"])
        return f"{df['region'].nunique()} regions"

    def images(rows: np.ndarray) -> list[Path]:
        return [folder / "images" / f"rgb_img_{i}.png" for i in rows]

    checks: dict[str, Callable[[], str]] = {
        "RELEASE_v1.1.txt": lambda: present(folder / "RELEASE_v1.1.txt"),
        "rgb_metadata.csv": metadata,
        "country_code_mapping.csv": regions,
    }
    for split in WILDS_SPLITS:
        checks[f"split {split}"] = lambda s=split: _split_rows("fmow", cache["splits"], path, images, s)
    return FolderChecks(checks, lambda split: images(cache["splits"][split]))


def present(path: Path) -> str:
    """"present" if ``path`` exists, else :class:`MissingData` naming it."""
    if not path.exists():
        raise MissingData(f"{path} not found")
    return "present"


def wilds_checks(name: str, root: str | Path, class_names: Sequence[str] | None = None) -> FolderChecks:
    """Every check of one WILDS dataset folder (one clear error if the folder is not there)."""
    folder = wilds_folder(name, root)
    return fmow_checks(folder) if name == "fmow" else iwildcam_checks(folder, class_names)
