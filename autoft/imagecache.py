"""The preprocessing cache: each image decoded and resized once, kept as uint8 in a memory-mapped file.

A search reads the same images in every trial. The cache runs the deterministic part of the model's
eval transform (:func:`autoft.tensorprep.eval_prep`: decode, resize, center crop) once per image and
keeps the result as uint8 [N, H, W, 3] in a memory-mapped .npy under $AUTOFT_CACHE/images/, keyed by
the dataset's identity (folder, split, rows, metadata file size and mtime) and by that transform part.
Loaders then read whole batches with one fancy index, and the rest of the transform runs on the batch
on the training device (:func:`autoft.tensorprep.model_input`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from autoft import UserError
from autoft.prefetch import PrefetchLoader, read_ahead
from autoft.tensorprep import TensorPrep, model_input, train_prep

log = logging.getLogger(__name__)


class _Prepped(Dataset):
    """``prep(load(i))`` as uint8 [H, W, 3]: what the cache stores (built in DataLoader workers)."""

    def __init__(self, images: Dataset, pil: Callable):
        self.images, self.pil = images, pil

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.pil(self.images[i]).convert("RGB"), dtype=np.uint8)


def _stack(items: list[np.ndarray]) -> list[np.ndarray]:
    return items


def image_cache_path(name: str, signature: dict[str, Any], prep: TensorPrep) -> Path:
    from autoft.world import cache_dir, config_hash

    return cache_dir() / "images" / f"{name}-{config_hash({'images': signature, 'prep': prep.key})}.npy"


@dataclass(eq=False)
class CacheFile:
    """A cache file not necessarily written yet: :func:`image_cache`'s arguments, run on first use, so a
    run caches only the splits it reads (a search never reads the test splits)."""

    name: str
    signature: dict[str, Any]
    images: Dataset
    prep: TensorPrep
    num_workers: int = 0

    @property
    def path(self) -> Path:
        return image_cache_path(self.name, self.signature, self.prep)

    def write(self) -> Path:
        return image_cache(self.name, self.signature, self.images, self.prep, self.num_workers)

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the cached images, without writing the file."""
        if self.path.is_file():
            return tuple(np.load(self.path, mmap_mode="r").shape[1:3])
        return tuple(np.asarray(self.prep.pil(self.images[0])).shape[:2])


def image_cache(name: str, signature: dict[str, Any], images: Dataset, prep: TensorPrep,
                num_workers: int = 0) -> Path:
    """The cache file of ``images`` (PIL images) after ``prep.pil``, written once (atomically) and reused.

    ``signature`` identifies the images (dataset folder, split, rows, metadata stat); the file name is
    ``<name>-<hash of signature and prep>.npy``, a uint8 array [N, H, W, 3].
    """
    path = image_cache_path(name, signature, prep)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    source = _Prepped(images, prep.pil)
    first = source[0]
    log.info("caching %d %s images as uint8 %s into %s", len(source), name, list(first.shape), path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(source), *first.shape))
        # its own generator: written inside a trial, the cache must not draw from the trial's seeded RNG
        loader = DataLoader(source, batch_size=64, num_workers=num_workers, collate_fn=_stack,
                            generator=torch.Generator())
        start = 0
        for batch in loader:
            for offset, image in enumerate(batch):
                if image.shape != first.shape:
                    raise UserError(f"{name}: image {start + offset} is {list(image.shape)} after "
                                    f"{prep.key}, not {list(first.shape)}: images of one size are needed to "
                                    f"cache them (set dataset.cache=false)")
                out[start + offset] = image
            start += len(batch)
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def file_stat(path: Path) -> list[int]:
    """Size and mtime of a file, for cache keys (0, 0 when missing)."""
    try:
        st = path.stat()
    except OSError:
        return [0, 0]
    return [st.st_size, st.st_mtime_ns]


def rows_hash(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


class CachedImages(Dataset):
    """One split from the cache: ``(uint8 [H, W, 3], label, metadata)``; a batch of indices is read with
    one fancy index (``__getitems__``). ``file``: a written cache file, or a :class:`CacheFile` written
    on first use. The array is opened lazily, once per process (workers too)."""

    def __init__(self, file: Path | CacheFile, rows: np.ndarray, y: torch.Tensor, metadata: torch.Tensor):
        self.file = file
        self.path = file.path if isinstance(file, CacheFile) else Path(file)
        self.rows, self.y, self.metadata = np.asarray(rows, dtype=np.int64), y, metadata
        self._array: np.ndarray | None = None

    def __getstate__(self):  # workers open the written file themselves, never receive its bytes
        return self.__dict__ | {"_array": None, "file": self.path}

    def ensure(self) -> CachedImages:
        """Write the cache file if it is not there yet."""
        if isinstance(self.file, CacheFile) and not self.path.is_file():
            self.file.write()
        return self

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.ensure().path, mmap_mode="r")
        return self._array

    @property
    def image_size(self) -> tuple[int, int]:
        if self._array is None and isinstance(self.file, CacheFile):
            return self.file.image_size()
        return tuple(self.array.shape[1:3])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.array[self.rows[i]])), self.y[i], self.metadata[i]

    def __getitems__(self, indices: list[int]):
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.array[self.rows[idx]]), self.y[idx], self.metadata[idx]


def _batch(batch):
    return batch  # CachedImages.__getitems__ already returns a batch


class CachedLoaders:
    """Loaders over :class:`CachedImages` splits for a Lightning data module (mixed in).

    ``self.cached`` maps loader names to cached splits; a name not in it uses the module's own loader.
    Loaders are built once and reused by every trial of a search (persistent workers when
    ``num_workers > 0``: they only read the memory map, all randomness (order, crops) is drawn in the
    main process and on the device from the trial's seed). ``on_after_batch_transfer`` turns uint8
    batches into the model's input on the device.
    """

    cached: dict[str, CachedImages]
    val_keys: tuple[str, ...] = ("val_id", "val_ood")  # what val_dataloader returns (a search trial: val_ood)
    prep: TensorPrep | None = None
    train_prep: TensorPrep | None = None

    def _setup_cache(self, cached: dict[str, CachedImages], train_transform: Callable) -> None:
        self.cached, self._loaders = cached, {}
        if "train" in cached:
            self.train_prep = train_prep(train_transform, self.prep, cached["train"].image_size)
            if self.train_prep is None:  # an augmentation the tensor path does not have: train from files
                log.info("dataset.cache: train transform %s has no tensor form; training reads image files",
                         train_transform)
                del self.cached["train"]

    def _cached_loader(self, key: str) -> DataLoader:
        if key not in self._loaders:
            data, train = self.cached[key].ensure(), key == "train"
            bs = self.batch_size if train else self.eval_batch_size
            self._loaders[key] = PrefetchLoader(
                data, batch_size=bs, shuffle=train, drop_last=train and len(data) > bs, collate_fn=_batch,
                num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(), prepare=self._prepare(train))
        return self._loaders[key]

    def start_train_epoch(self) -> None:
        """Start the training loader's next epoch now (:meth:`PrefetchLoader.start_epoch`), once it exists: a
        search trial's first batch is then made while the trial sets up."""
        loader = self._loaders.get("train")
        if isinstance(loader, PrefetchLoader):
            loader.start_epoch()

    def _prepare(self, train: bool) -> Callable | None:
        """What a cached loader's thread does ahead of the loop (see autoft.prefetch): on the CPU the train
        loader makes the model's input; on a GPU every loader reads and pins; else nothing is ahead."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device.type if trainer is not None else None
        if device == "cpu":
            return self._train_input if train else None
        return read_ahead if device == "cuda" else None

    def _train_input(self, batch, generator: torch.Generator):
        x, y, meta = batch
        return model_input(x, self.train_prep, train=True, generator=generator), y, meta

    def _eval_dataset(self, key: str) -> Dataset:
        """Split ``key`` read from its files through the eval transform (the train split too)."""
        raise NotImplementedError

    def plain_batches(self, key: str, device: torch.device | str = "cpu"):
        """``(x, y, metadata)`` batches of any split, the train split included, un-augmented and in
        order, as model inputs on ``device``: what a linear probe's frozen features are computed from.
        Works outside a trainer (the cached path applies the eval preprocessing here)."""
        if key in self.cached:
            loader = DataLoader(self.cached[key].ensure(), batch_size=self.eval_batch_size, collate_fn=_batch,
                                num_workers=self.num_workers)
        else:
            loader = DataLoader(self._eval_dataset(key), batch_size=self.eval_batch_size, num_workers=self.num_workers)
        for x, y, meta in loader:
            x = x.to(device)
            if x.dtype == torch.uint8 and self.prep is not None:
                x = model_input(x, self.prep)
            yield x, y, meta

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, meta = batch
        if x.dtype != torch.uint8 or self.prep is None:
            return batch
        training = self.trainer is not None and self.trainer.training
        return model_input(x, self.train_prep if training else self.prep, train=training), y, meta
