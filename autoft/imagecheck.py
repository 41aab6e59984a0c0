"""Bad image files: found before a run (``autoft-data check``) or met during one (``dataset.on_bad_image``).

PIL opens an image lazily: ``Image.open`` reads the header, and a truncated or corrupt file fails only
when it is decoded, inside a DataLoader worker, as an ``OSError`` that does not name the file. Here:

* :func:`verify_file` is the check: the file's structure (``Image.verify``: headers, PNG chunk
  checksums), then a full decode (``Image.load``), which is where truncation shows;
* :func:`scan` verifies many items in threads (PIL releases the GIL while it decodes), with a
  progress bar, and returns each bad item with what is wrong;
* at run time every image is decoded in full where it is read (:func:`decode`), so a bad file
  becomes :class:`BadImage`, one line naming the file and the split. ``dataset.on_bad_image``
  chooses what a run does: ``error`` (default) ends it with that line, ``skip`` scans the splits
  it reads first (:func:`bad_items`, remembered in ``$AUTOFT_CACHE/imagecheck``) and drops the bad
  examples, each logged once; the data modules count them per split (``<split>/skipped_images``).

Items are named by their file where they have one (:func:`item_path` knows the torchvision datasets
the project reads), else by their source file and position (arrays, HDF5).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from autoft import UserError, atomic_write

log = logging.getLogger(__name__)
POLICIES = ("error", "skip")
# What decoding a broken file raises in PIL (truncation, unknown format, bad checksums, bad headers)
# and in h5py (OSError); a missing file is an OSError too.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
_CHUNK = 32  # items per thread task: few enough futures for 200k items, small enough for a smooth bar


class BadImage(UserError):
    """An image that cannot be read in full, named with its file and split.

    Raised in a DataLoader worker, it reaches the main process as ``BadImage(<worker traceback>)``
    (torch re-raises the worker's exception type with its formatted traceback as the message); only
    the last line, this exception's own message, is kept.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if last.startswith(f"{__name__}.BadImage: ") else last
        super().__init__(message)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise UserError(f"dataset.on_bad_image must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def describe(error: BaseException) -> str:
    """What is wrong, in a few words."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    return f"{type(error).__name__}: {error}"


def bad_image(name: str, problem: str, what: str) -> BadImage:
    return BadImage(f"bad image {name} ({what}): {problem}; find all with autoft-data check, or drop them "
                    f"with dataset.on_bad_image=skip")


def verify_file(path: str | os.PathLike) -> str | None:
    """What is wrong with an image file, or None: its structure (``verify``), then a full decode (``load``)."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except DECODE_ERRORS as e:
        return describe(e)
    return None


def _load(item) -> None:
    image = item[0] if isinstance(item, tuple) else item
    if isinstance(image, Image.Image):
        image.load()


def decode(read: Callable[[], Any], name: Callable[[], str], what: str):
    """``read()`` (an image, or a tuple whose first item is one), decoded in full; a failure is a
    :class:`BadImage` naming the item (``name()``, computed only then) and ``what`` (dataset, split)."""
    try:
        item = read()
        _load(item)
    except DECODE_ERRORS as e:
        raise bad_image(name(), describe(e), what) from None
    return item


def read_problem(read: Callable[[], Any]) -> str | None:
    """What is wrong with the item ``read()`` returns (decoded in full), or None."""
    try:
        _load(read())
    except DECODE_ERRORS as e:
        return describe(e)
    return None


# ---------------------------------------------------------------------------------------- naming items

def item_path(dataset: Dataset, i: int) -> str | None:
    """The file that item ``i`` of ``dataset`` is read from (through Subset and ConcatDataset), for the
    torchvision datasets the project reads; None for items without a file of their own (arrays, HDF5)."""
    while isinstance(dataset, (Subset, ConcatDataset)):
        if isinstance(dataset, Subset):
            dataset, i = dataset.dataset, int(dataset.indices[i])
        else:
            k = bisect.bisect_right(dataset.cumulative_sizes, i)
            i -= dataset.cumulative_sizes[k - 1] if k else 0
            dataset = dataset.datasets[k]
    for attr in ("samples", "_samples"):  # ImageFolder (ImageNet and its shifts), StanfordCars, RenderedSST2
        if hasattr(dataset, attr):
            return str(getattr(dataset, attr)[i][0])
    if hasattr(dataset, "_image_files"):  # Flowers102
        return str(dataset._image_files[i])
    if type(dataset).__name__ == "Caltech101":  # torchvision builds the path in __getitem__
        return os.path.join(dataset.root, "101_ObjectCategories", dataset.categories[dataset.y[i]],
                            f"image_{dataset.index[i]:04d}.jpg")
    return None


def item_name(dataset: Dataset, i: int, source: str) -> str:
    """Item ``i``'s file, else ``<source> [item i]``."""
    return item_path(dataset, i) or f"{source} [item {i}]"


@dataclass(frozen=True)
class Items:
    """``n`` items, each named (its file, or its source and position) and checked on demand: ``check(i)``
    says what is wrong with item i, or None. Lazy, so that a million-image split costs no memory."""

    n: int
    name: Callable[[int], str]
    check: Callable[[int], str | None]

    def __len__(self) -> int:
        return self.n

    def take(self, positions: Sequence[int]) -> Items:
        pos = [int(p) for p in positions]
        return Items(len(pos), lambda i: self.name(pos[i]), lambda i: self.check(pos[i]))


def file_items(paths: Sequence[str | os.PathLike]) -> Items:
    """Image files, each verified (:func:`verify_file`)."""
    return Items(len(paths), lambda i: str(paths[i]), lambda i: verify_file(paths[i]))


def dataset_items(dataset: Dataset, source: str) -> Items:
    """Every item of ``dataset``: its file verified where it has one, else read through the dataset."""
    def check(i: int) -> str | None:
        path = item_path(dataset, i)
        return verify_file(path) if path is not None else read_problem(lambda: dataset[i])

    return Items(len(dataset), lambda i: item_name(dataset, i, source), check)


# ------------------------------------------------------------------------------------------ scanning

def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def scan(items: Items, workers: int | None = None, desc: str = "checking images",
         progress: bool | None = None) -> dict[int, str]:
    """Positions of the bad items among ``items``, with what is wrong, checked by ``workers`` threads
    (default: every available CPU). ``progress``: a bar on stderr (None: only on a terminal)."""
    from tqdm import tqdm

    workers = max(1, workers or available_cpus())
    chunks = [range(s, min(s + _CHUNK, len(items))) for s in range(0, len(items), _CHUNK)]

    def check(chunk: range) -> list[tuple[int, str | None]]:
        return [(i, items.check(i)) for i in chunk]

    bad: dict[int, str] = {}
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(items), desc=desc, unit="img", file=sys.stderr,
                                                   disable=None if progress is None else not progress,
                                                   dynamic_ncols=True) as bar:
        for results in pool.map(check, chunks):
            bad.update((i, problem) for i, problem in results if problem is not None)
            bar.update(len(results))
    return bad


def bad_items(name: str, signature: dict[str, Any], items: Items, what: str,
              workers: int | None = None) -> dict[int, str]:
    """What :func:`scan` finds in ``items``, scanned once per ``signature`` (what identifies the items:
    folder, split, rows, metadata) and remembered in ``$AUTOFT_CACHE/imagecheck``; the items remembered
    as bad are verified again (a replaced file is good again). Each bad one is logged, naming ``what``."""
    from autoft.world import cache_dir, config_hash

    path = cache_dir() / "imagecheck" / f"{name}-{config_hash(signature)}.json"
    if path.is_file():
        remembered = {int(k): v for k, v in json.loads(path.read_text())["bad"].items()}
        bad = {i: p for i in remembered if (p := items.check(i)) is not None}
    else:
        log.info("dataset.on_bad_image=skip: checking the %d images of %s once", len(items), what)
        bad = scan(items, workers, desc=f"checking {what}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"signature": signature, "bad": bad}, indent=1))
    for i, problem in sorted(bad.items()):
        log.warning("skipping bad image %s (%s): %s", items.name(i), what, problem)
    return bad


def skip_counts(skipped: dict[str, int]) -> dict[str, int]:
    """What a run with ``on_bad_image=skip`` adds to its results: the examples dropped from each split
    (``<split>/skipped_images``, beside that split's metrics, which exclude them) and from all of them
    (``data/skipped_images``). Nothing under ``error``, which drops none."""
    if not skipped:
        return {}
    return {"data/skipped_images": sum(skipped.values())} | {f"{k}/skipped_images": n for k, n in skipped.items()}
