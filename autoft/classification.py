"""Loaders for every non-WILDS benchmark: a :class:`Split` per loader, one Lightning data module.

A split is a dataset of ``(PIL image, anything)`` items with its labels, the file or folder it was
read from (for messages) and its label space. :class:`ClassificationDataModule` gives the fine-tuner
the same interface as :class:`~autoft.data.WildsDataModule`: k-shot and subset selection, the
preprocessing cache, the bad-image policy (:mod:`autoft.imagecheck`) and top-1 accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from autoft import MissingData, UserError
from autoft.data import k_shot, subsample
from autoft.imagecache import CachedImages, CachedLoaders, CacheFile, file_stat, rows_hash
from autoft.imagecheck import bad_items, check_policy, dataset_items, decode, item_name
from autoft.tensorprep import eval_prep


@dataclass(eq=False)
class Split:
    """One split: item i of ``images`` is ``(PIL image, anything)``; its label is ``labels[i]``."""

    images: Dataset
    labels: np.ndarray
    source: str                              # the file or folder it was read from, for messages
    n_labels: int                            # size of its label space
    groups: torch.Tensor | None = None       # [n_labels, g] model classes pooled into each label
    meta: np.ndarray | None = None           # an integer per item (e.g. the corruption) for evaluate
    prep: Callable | None = None             # applied to the image before the transform

    def take(self, positions: np.ndarray) -> Split:
        positions = np.asarray(positions, dtype=np.int64)
        return replace(self, images=Subset(self.images, positions.tolist()), labels=self.labels[positions],
                       meta=None if self.meta is None else self.meta[positions])

    def check(self, key: str) -> None:
        """One clear error for an empty split or a label outside its label space."""
        if not len(self.labels):
            raise MissingData(f"{self.source}: no examples for {key}")
        bad = (self.labels < 0) | (self.labels >= self.n_labels)
        if bad.any():
            raise UserError(f"{self.source}: label {int(self.labels[bad][0])} out of range 0..{self.n_labels - 1}")


def split_image(split: Split, i: int, what: str) -> Image.Image:
    """Item ``i``'s image decoded in full, after the split's ``prep``: a bad file is a
    :class:`~autoft.imagecheck.BadImage` naming it and ``what`` (dataset and split)."""
    image = decode(lambda: split.images[i], lambda: item_name(split.images, i, split.source), what)[0]
    return image if split.prep is None else split.prep(image)


class Examples(Dataset):
    """``(transform(image), label, metadata)`` triples of a split, as the fine-tuner's loaders yield them."""

    def __init__(self, split: Split, transform: Callable, what: str = "a split"):
        self.split, self.transform, self.what = split, transform, what

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        meta = 0 if self.split.meta is None else int(self.split.meta[i])
        return self.transform(split_image(self.split, i, self.what)), int(self.split.labels[i]), torch.tensor([meta])


class _SplitImages(Dataset):
    """A split's PIL images after its ``prep`` (what the cache decodes)."""

    def __init__(self, split: Split, what: str):
        self.split, self.what = split, what

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        return split_image(self.split, i, self.what)


def _split_signature(split: Split, key: str) -> dict:
    """What identifies a split's images for the cache: its source (and stat), rows and labels."""
    images, rows = split.images, np.arange(len(split.labels))
    while isinstance(images, Subset):  # rows of the underlying dataset, through every take()
        rows, images = np.asarray(images.indices)[rows], images.dataset
    prep = None if split.prep is None else getattr(split.prep, "__qualname__", type(split.prep).__name__)
    return {"source": str(Path(split.source).resolve()), "stat": file_stat(Path(split.source)), "key": key,
            "dataset": type(images).__name__, "rows": rows_hash(rows), "labels": rows_hash(split.labels),
            "prep": prep}


class ClassificationDataModule(CachedLoaders, pl.LightningDataModule):
    """Loaders with the interface of :class:`~autoft.data.WildsDataModule` for any :class:`Benchmark`.

    Test loaders: ``test_id``, then every OOD test set (``test_keys`` names them; with several, the
    fine-tuner logs each under its own name and their mean as ``test_ood``). ``class_groups`` maps a
    loader to the model classes of each of its labels. ``cache``: images from the preprocessing cache
    (each split as used, after k-shot or subset selection). ``on_bad_image``: ``error`` or ``skip`` (see
    :mod:`autoft.imagecheck`); skipped examples are counted in ``skipped`` per loader. ``name``: the
    dataset's, for messages.
    """

    def __init__(self, splits: Mapping[str, Split], class_names: Sequence[str], train_transform: Callable,
                 eval_transform: Callable, batch_size: int = 128, eval_batch_size: int = 512,
                 num_workers: int = 0, ood_val_size: int | None = None, ood_val_balanced: bool = False,
                 subset_seed: int = 0, shots: int | None = None, ood_val_shots: int | None = None,
                 cache: bool = False, on_bad_image: str = "error", name: str = "dataset"):
        super().__init__()
        self.name, self.on_bad_image = name, check_policy(on_bad_image)
        self.class_names = list(class_names)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        splits = dict(splits)
        for key, split in splits.items():
            split.check(key)
        if shots:
            splits["train"] = splits["train"].take(k_shot(splits["train"].labels, shots, subset_seed))
        ood = splits["val_ood"]
        keep = (k_shot(ood.labels, ood_val_shots, subset_seed) if ood_val_shots
                else subsample(ood.labels, ood_val_size, ood_val_balanced, subset_seed))
        splits["val_ood"] = ood.take(keep)
        self.splits = splits
        self.skipped: dict[str, int] = {}
        if self.on_bad_image == "skip":
            self._drop_bad_images()
        self.test_keys = ("test_id", *(k for k in splits if k.startswith("test_") and k != "test_id"))
        self.class_groups = {k: s.groups for k, s in splits.items() if s.groups is not None}
        self.prep = eval_prep(eval_transform) if cache else None
        cached = {}
        if self.prep is not None:
            for key, split in splits.items():
                file = CacheFile(f"{Path(split.source).name}-{key}", _split_signature(split, key),
                                 _SplitImages(split, self._what(key)), self.prep, num_workers)
                meta = np.zeros(len(split.labels), np.int64) if split.meta is None else split.meta
                cached[key] = CachedImages(file, np.arange(len(split.labels)), torch.as_tensor(split.labels),
                                           torch.as_tensor(meta, dtype=torch.int64)[:, None])
        self._setup_cache(cached, train_transform)

    def _what(self, key: str) -> str:
        return f"{self.name} split '{key}'"

    def _drop_bad_images(self) -> None:
        """``on_bad_image=skip``: each split's images (as used: after k-shot or subset selection) checked
        once (:func:`~autoft.imagecheck.bad_items`), and the bad ones dropped."""
        for key, split in self.splits.items():
            bad = bad_items(f"{Path(split.source).name}-{key}", _split_signature(split, key),
                            dataset_items(split.images, split.source), self._what(key))
            keep = np.setdiff1d(np.arange(len(split.labels)), list(bad))
            if not len(keep):
                raise UserError(f"{self._what(key)}: every image is bad (dataset.on_bad_image=skip left none)")
            self.skipped[key] = len(bad)
            if bad:
                self.splits[key] = split.take(keep)

    def _eval_dataset(self, key: str) -> Dataset:
        return Examples(self.splits[key], self.eval_transform, self._what(key))

    def evaluate(self, y_pred: torch.Tensor, y_true: torch.Tensor, metadata: torch.Tensor) -> dict[str, float]:
        """Top-1 accuracy (the paper's metric for every non-WILDS benchmark)."""
        return {"acc": (y_pred == y_true).float().mean().item()}

    def train_dataloader(self):
        if "train" in self.cached:
            return self._cached_loader("train")
        train = Examples(self.splits["train"], self.train_transform, self._what("train"))
        return DataLoader(train, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=len(train) > self.batch_size, persistent_workers=self.num_workers > 0)

    def _eval(self, keys: Sequence[str]):
        return [self._cached_loader(k) if k in self.cached else
                DataLoader(Examples(self.splits[k], self.eval_transform, self._what(k)),
                           batch_size=self.eval_batch_size, num_workers=self.num_workers) for k in keys]

    def val_dataloader(self):
        return self._eval(self.val_keys)

    def test_dataloader(self):
        return self._eval(self.test_keys)
