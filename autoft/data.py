"""Datasets as Lightning data modules, built on the datasets' own loaders.

WILDS datasets go through ``wilds.get_dataset(..., download=False)``, its subsets, its
``get_train_loader``/``get_eval_loader`` and its ``dataset.eval`` metrics, so the numbers are
the benchmark's own. Training uses the model's augmenting transform; every evaluation split
uses the eval transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from wilds.common.data_loaders import get_eval_loader, get_train_loader
from wilds.datasets.wilds_dataset import WILDSSubset

from autoft import UserError

# loader name -> WILDS split. "val_ood" is the (small) OOD validation set the search scores on.
EVAL_SPLITS = {"val_id": "id_val", "val_ood": "val", "test_id": "id_test", "test_ood": "test"}
WILDS_FOLDERS = {"iwildcam": "iwildcam_v2.0", "fmow": "fmow_v1.1"}


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
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rank = np.empty(n)  # position of each example in its class's random order
    for members in by_class:
        rank[members] = np.arange(len(members)) + rng.random(len(members)) * 0.5
    return np.sort(np.argsort(rank, kind="stable")[:size])


def class_names_from(folder: Path) -> list[str]:
    """Class names from the dataset's ``categories.csv`` (columns ``y`` and ``name``)."""
    path = folder / "categories.csv"
    if not path.is_file():
        raise UserError(f"{path} not found: class names are needed for the zero-shot head "
                        f"(or set dataset.class_names)")
    df = pd.read_csv(path)
    if not {"y", "name"} <= set(df.columns):
        raise UserError(f"{path}: expected columns 'y' and 'name', found {list(df.columns)}")
    return [str(n) for n in df.sort_values("y")["name"]]


def wilds_folder(name: str, root: str | Path) -> Path:
    """The dataset's folder under ``root``, or one clear error if it is not there."""
    if name not in WILDS_FOLDERS:
        raise UserError(f"unknown WILDS dataset '{name}'; known: {', '.join(WILDS_FOLDERS)}")
    folder = Path(root) / WILDS_FOLDERS[name]
    if not folder.is_dir():
        raise UserError(f"{name}: data folder {folder} does not exist (set dataset.root "
                        f"to the folder that holds {WILDS_FOLDERS[name]}/)")
    return folder


class WildsDataModule(pl.LightningDataModule):
    """Train / ID-val / OOD-val / ID-test / OOD-test loaders for one WILDS dataset."""

    def __init__(self, name: str, root: str | Path, train_transform: Callable, eval_transform: Callable,
                 batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0,
                 ood_val_size: int | None = None, ood_val_balanced: bool = False, subset_seed: int = 0,
                 class_names: Sequence[str] | None = None):
        super().__init__()
        self.folder = wilds_folder(name, root)
        import wilds

        try:
            self.dataset = wilds.get_dataset(name, root_dir=str(root), download=False)
        except (FileNotFoundError, KeyError, ValueError, AssertionError) as e:
            raise UserError(f"{name}: cannot read {self.folder}: {type(e).__name__}: {e}") from None
        self.class_names = list(class_names) if class_names else class_names_from(self.folder)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.subsets = {"train": self.dataset.get_subset("train", transform=train_transform)}
        for key, split in EVAL_SPLITS.items():
            subset = self.dataset.get_subset(split, transform=eval_transform)
            if key == "val_ood":
                keep = subsample(subset.y_array.numpy(), ood_val_size, ood_val_balanced, subset_seed)
                subset = WILDSSubset(self.dataset, subset.indices[keep], eval_transform)
            self.subsets[key] = subset

    def evaluate(self, y_pred: torch.Tensor, y_true: torch.Tensor,
                 metadata: torch.Tensor) -> dict[str, float]:
        """The dataset's own metrics (``dataset.eval``) on one split."""
        results, _ = self.dataset.eval(y_pred, y_true, metadata)
        return {k: float(v) for k, v in results.items()}

    def train_dataloader(self):
        return get_train_loader("standard", self.subsets["train"], batch_size=self.batch_size,
                                num_workers=self.num_workers, drop_last=True,
                                persistent_workers=self.num_workers > 0)

    def _eval(self, keys: Sequence[str]):
        return [get_eval_loader("standard", self.subsets[k], batch_size=self.eval_batch_size,
                                num_workers=self.num_workers) for k in keys]

    def val_dataloader(self):
        return self._eval(("val_id", "val_ood"))

    def test_dataloader(self):
        return self._eval(("test_id", "test_ood"))
