"""WILDS datasets as Lightning data modules, built on the datasets' own loaders; seeded subsets.

WILDS datasets go through ``wilds.get_dataset(..., download=False)``, its subsets, its
``get_train_loader``/``get_eval_loader`` and its ``dataset.eval`` metrics, so the numbers are
the benchmark's own. Training uses the model's augmenting transform; every evaluation split
uses the eval transform. With ``cache`` the images come from the preprocessing cache (see
"preprocessing cache" below) and the transforms' tensor part runs on the device. Before wilds
reads a folder, the metadata it relies on is checked, so a malformed dataset is one line naming
the file and field instead of an assertion deep in wilds.

Two known wilds 2.0.0 traps are fixed here, once, at import:
* ``avg_over_groups`` (FMoW's per-region and per-year accuracy) imports ``torch_scatter``, which
  wilds does not declare and which only builds from source; without it, a pure-torch equivalent
  (``index_add_`` over groups, same values: a group's mean, 0 for an empty group) is used.
* FMoW's timestamps mix second and millisecond precision; pandas >= 2 refuses to parse them with
  one inferred format (p-lambda/wilds#146). wilds' FMoW module gets a pandas whose
  ``to_datetime`` defaults to ISO 8601.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset
from wilds.common.data_loaders import get_eval_loader, get_train_loader
from wilds.datasets.wilds_dataset import WILDSSubset

from autoft import UserError
from autoft.imagecache import CachedImages, CachedLoaders, CacheFile, file_stat, rows_hash
from autoft.imagecheck import bad_items, check_policy, decode, file_items
from autoft.tensorprep import eval_prep
from autoft.wildscheck import WILDS_SPLITS, class_names_from, fmow_class_names, wilds_checks, wilds_folder

log = logging.getLogger(__name__)
# loader name -> WILDS split. "val_ood" is the (small) OOD validation set the search scores on.
EVAL_SPLITS = {"val_id": "id_val", "val_ood": "val", "test_id": "id_test", "test_ood": "test"}


def _class_ranks(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each example's position in its class's random order, plus a jitter in [0, 0.5) that interleaves classes."""
    rank = np.empty(len(labels))
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for members in by_class:
        rank[members] = np.arange(len(members)) + rng.random(len(members)) * 0.5
    return rank


def subsample(labels: np.ndarray, size: int | None, balanced: bool, seed: int) -> np.ndarray:
    """Positions of a seeded subset of ``size`` examples; class-balanced if asked.

    Balanced: classes take turns, each contributing its examples in random order, so every
    class gets ``size // K`` where it has that many and the rest spill to the larger classes.
    """
    n = len(labels)
    rng = np.random.default_rng(seed)
    if size is None or size >= n:
        return np.arange(n)
    if not balanced:
        return np.sort(rng.permutation(n)[:size])
    return np.sort(np.argsort(_class_ranks(labels, rng), kind="stable")[:size])


def k_shot(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Positions of a seeded k-shot set: ``k`` random examples of every class (all of a smaller class).

    The same draw as :func:`subsample` balanced to ``k * K`` examples when every class has ``k``:
    a class's first k in its random order.
    """
    if k < 1:
        raise UserError(f"shots must be a positive number of examples per class, got {k}")
    return np.flatnonzero(_class_ranks(labels, np.random.default_rng(seed)) < k)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded class-stratified split into parts of the given fractions (each class cut the same way)."""
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise UserError(f"split fractions must be positive and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _avg_over_groups(v: torch.Tensor, g: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """wilds' ``avg_over_groups`` without torch_scatter: per-group mean of ``v`` (0 where a group is empty)."""
    from wilds.common.utils import get_counts

    counts = get_counts(g, n_groups)
    sums = torch.zeros(n_groups, dtype=v.dtype, device=v.device).index_add_(0, g, v)
    return sums / counts.clamp(min=1).to(v.dtype), counts


class _ISO8601Pandas:
    """pandas as wilds' FMoW module sees it: ``to_datetime`` parses ISO 8601 of mixed precision."""

    def __getattr__(self, name: str):
        return getattr(pd, name)

    @staticmethod
    def to_datetime(arg, **kwargs):
        return pd.to_datetime(arg, **({"format": "ISO8601"} | kwargs))


def _patch_wilds() -> None:
    import wilds.common.metrics.metric as metric
    import wilds.datasets.fmow_dataset as fmow

    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        metric.avg_over_groups = _avg_over_groups
    fmow.pd = _ISO8601Pandas()


_patch_wilds()


@dataclass
class WildsSource:
    """A WILDS dataset read and checked (files, metadata, class names) before any model exists."""

    name: str
    folder: Path
    dataset: Any                # wilds' dataset object
    class_names: list[str]


def open_wilds(name: str, root: str | Path, class_names: Sequence[str] | None = None) -> WildsSource:
    """Check a WILDS folder (:func:`wilds_checks`), then read it with ``wilds.get_dataset(download=False)``."""
    folder = wilds_folder(name, root)
    for check in wilds_checks(name, root, class_names).checks.values():
        check()
    import wilds

    try:
        dataset = wilds.get_dataset(name, root_dir=str(root), download=False)
    except (FileNotFoundError, KeyError, ValueError, TypeError, AssertionError) as e:
        raise UserError(f"{name}: cannot read {folder}: {type(e).__name__}: {e}") from None
    if class_names:
        names = list(class_names)
    else:
        names = fmow_class_names() if name == "fmow" else class_names_from(folder)
    if len(names) < dataset.n_classes:
        raise UserError(f"{name}: {len(names)} class names for {dataset.n_classes} classes")
    return WildsSource(name, folder, dataset, names)


def wilds_image_path(dataset, row: int) -> Path:
    """The file wilds reads for row ``row`` of its dataset object (FMoW's rows skip the CSV's seq rows)."""
    if dataset.dataset_name == "fmow":
        return Path(dataset.root) / "images" / f"rgb_img_{dataset.full_idxs[row]}.png"
    return Path(dataset.data_dir) / "train" / dataset._input_array[row]


def wilds_image(dataset, row: int, what: str):
    """wilds' image of ``row``, decoded in full: a bad file is a BadImage naming it and ``what``."""
    return decode(lambda: dataset.get_input(row), lambda: str(wilds_image_path(dataset, row)), what)


class _WildsSubset(WILDSSubset):
    """A WILDS subset (image, label, metadata) whose images are decoded in full where they are read
    (:func:`wilds_image`: iWildCam's ``get_input`` leaves that to the transform, where a truncated file
    failed without its name)."""

    def __init__(self, dataset, indices: np.ndarray, transform: Callable | None, what: str):
        super().__init__(dataset, indices, transform)
        self.what = what

    def __getitem__(self, idx: int):
        row = int(self.indices[idx])
        x = wilds_image(self.dataset, row, self.what)
        return (x if self.transform is None else self.transform(x)), self.dataset.y_array[row], \
            self.dataset.metadata_array[row]


class _WildsInputs(Dataset):
    """The PIL images of some rows of a WILDS dataset (what the cache decodes)."""

    def __init__(self, dataset, indices: np.ndarray, what: str):
        self.dataset, self.indices, self.what = dataset, indices, what

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return wilds_image(self.dataset, int(self.indices[i]), self.what)


class WildsDataModule(CachedLoaders, pl.LightningDataModule):
    """Train / ID-val / OOD-val / ID-test / OOD-test loaders for one WILDS dataset.

    ``shots``: train on a seeded k-shot subset (k examples per class) instead of the whole train split.
    ``cache``: read images from the preprocessing cache (whole WILDS splits, so any subset reuses
    them), labels and metadata from the wilds subsets as before; ``dataset.eval`` is unchanged.
    ``on_bad_image``: ``error`` or ``skip`` (see :mod:`autoft.imagecheck`); skipped examples are
    counted in ``skipped`` per loader. ``source``: the dataset already opened (:func:`open_wilds`).
    """

    def __init__(self, name: str, root: str | Path, train_transform: Callable, eval_transform: Callable,
                 batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0,
                 ood_val_size: int | None = None, ood_val_balanced: bool = False, subset_seed: int = 0,
                 class_names: Sequence[str] | None = None, shots: int | None = None, cache: bool = False,
                 on_bad_image: str = "error", source: WildsSource | None = None):
        super().__init__()
        source = source or open_wilds(name, root, class_names)
        self.name, self.folder, self.dataset, self.class_names = name, source.folder, source.dataset, source.class_names
        self.on_bad_image = check_policy(on_bad_image)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        train = self.dataset.get_subset("train")
        indices = train.indices[k_shot(train.y_array.numpy(), shots, subset_seed)] if shots else train.indices
        self.subsets = {"train": _WildsSubset(self.dataset, indices, train_transform, self._what("train"))}
        for key, split in EVAL_SPLITS.items():
            indices = self.dataset.get_subset(split).indices
            if key == "val_ood":
                labels = self.dataset.y_array[indices].numpy()
                indices = indices[subsample(labels, ood_val_size, ood_val_balanced, subset_seed)]
            self.subsets[key] = _WildsSubset(self.dataset, indices, eval_transform, self._what(split))
        self.prep = eval_prep(eval_transform) if cache else None
        if cache and self.prep is None:
            log.warning("dataset.cache: eval transform %s has no cacheable form; reading image files", eval_transform)
        # each WILDS split's rows: what the cache decodes (less the bad ones under skip)
        self.rows = {s: np.flatnonzero(self.dataset.split_array == self.dataset.split_dict[s]) for s in WILDS_SPLITS}
        self.skipped: dict[str, int] = {}
        if self.on_bad_image == "skip":
            self._drop_bad_images()
        self._setup_cache(self._cache_splits() if self.prep is not None else {}, train_transform)

    @staticmethod
    def _split_of(key: str) -> str:
        return "train" if key == "train" else EVAL_SPLITS[key]

    def _what(self, split: str) -> str:
        return f"{self.name} split '{split}'"

    def _signature(self, split: str, rows: np.ndarray) -> dict[str, Any]:
        """What identifies some rows of a split's images: folder, split, rows, metadata files' size and mtime."""
        return {"dataset": self.name, "folder": str(self.folder.resolve()), "split": split, "rows": rows_hash(rows),
                "metadata": {p.name: file_stat(p) for p in sorted(self.folder.glob("*.csv"))}}

    def _drop_bad_images(self) -> None:
        """``on_bad_image=skip``: the rows each loader reads (with the cache, its whole split, which the cache
        decodes) checked once (:func:`~autoft.imagecheck.bad_items`), and the bad ones dropped."""
        for key, subset in self.subsets.items():
            split = self._split_of(key)
            rows = self.rows[split] if self.prep is not None else np.asarray(subset.indices)
            paths = [wilds_image_path(self.dataset, int(r)) for r in rows]
            bad = rows[sorted(bad_items(f"{self.name}-{split}", self._signature(split, rows), file_items(paths),
                                        self._what(split)))]
            if self.prep is not None:
                self.rows[split] = np.setdiff1d(rows, bad)
            keep = ~np.isin(subset.indices, bad)
            if not keep.any():
                raise UserError(f"{self._what(split)}: every image is bad (dataset.on_bad_image=skip left none)")
            self.skipped[key] = int((~keep).sum())
            self.subsets[key] = _WildsSubset(self.dataset, np.asarray(subset.indices)[keep], subset.transform,
                                             subset.what)

    def _cache_splits(self) -> dict[str, CachedImages]:
        """Each loader's rows in the cache of its whole WILDS split (written when first read)."""
        out = {}
        for key, subset in self.subsets.items():
            split = self._split_of(key)
            full = self.rows[split]
            file = CacheFile(f"{self.name}-{split}", self._signature(split, full),
                             _WildsInputs(self.dataset, full, self._what(split)), self.prep, self.num_workers)
            indices = np.asarray(subset.indices)
            rows = np.searchsorted(full, indices)
            out[key] = CachedImages(file, rows, self.dataset.y_array[indices], self.dataset.metadata_array[indices])
        return out

    def _eval_dataset(self, key: str) -> Dataset:
        subset = self.subsets[key]
        return _WildsSubset(self.dataset, subset.indices, self.eval_transform, subset.what)

    def evaluate(self, y_pred: torch.Tensor, y_true: torch.Tensor,
                 metadata: torch.Tensor) -> dict[str, float]:
        """The dataset's own metrics (``dataset.eval``) on one split."""
        results, _ = self.dataset.eval(y_pred, y_true, metadata)
        return {k: float(v) for k, v in results.items()}

    def train_dataloader(self):
        if "train" in self.cached:
            return self._cached_loader("train")
        train = self.subsets["train"]  # a k-shot set can be smaller than one batch: keep it
        return get_train_loader("standard", train, batch_size=self.batch_size, num_workers=self.num_workers,
                                drop_last=len(train) > self.batch_size, persistent_workers=self.num_workers > 0)

    def _eval(self, keys: Sequence[str]):
        return [self._cached_loader(k) if k in self.cached else
                get_eval_loader("standard", self.subsets[k], batch_size=self.eval_batch_size,
                                num_workers=self.num_workers) for k in keys]

    def val_dataloader(self):
        return self._eval(self.val_keys)

    def test_dataloader(self):
        return self._eval(("test_id", "test_ood"))
