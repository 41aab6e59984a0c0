"""Bad image files: what the checker finds, what a run does with them (dataset.on_bad_image), on the exact
on-disk layouts of tests/test_datasets.py's fixtures with one image truncated or replaced by junk."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader, Dataset

from autoft.datacheck import main as datacheck
from autoft.finetune import build, finetune
from autoft.imagecheck import BadImage, decode, item_path, verify_file
from autoft.trial import run
from tests import forkserver
from tests.test_datasets import (
    FM,
    IW,
    _cfg,
    _data,
    _logits,
    _write,
    presence_instead_of_md5,  # noqa: F401  (autouse: fixtures have no real md5)
)


def _truncate(path: Path, fmt: str | None = None) -> Path:
    """Rewrite ``path`` (in ``fmt``, default its current format) and cut it in half, as an interrupted copy would."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB").resize((64, 48)))
        fmt = fmt or im.format
    Image.fromarray(pixels).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ------------------------------------------------------------------------------------------ verify

@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_verify_names_truncated_junk_empty_and_missing_files(tmp_path, fmt):
    good = tmp_path / f"good.{fmt.lower()}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(good, format=fmt)
    assert verify_file(good) is None
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    assert "truncated" in verify_file(cut).lower()
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    assert "cannot identify image file" in verify_file(tmp_path / "junk.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert "cannot identify image file" in verify_file(tmp_path / "empty.jpg")
    assert verify_file(tmp_path / "nope.jpg") == "file not found"


class _BadInWorker(Dataset):
    def __init__(self, path: Path):
        self.path = path

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return np.asarray(decode(lambda: Image.open(self.path), lambda: str(self.path), "toy split 'test'"))


def test_a_bad_image_met_in_a_dataloader_worker_is_still_one_line(tmp_path):
    path = _truncate(_write_png(tmp_path / "x.png"))
    with pytest.raises(BadImage) as e:
        next(iter(DataLoader(_BadInWorker(path), num_workers=1)))
    assert str(e.value).startswith(f"bad image {path} (toy split 'test'): OSError: ") and "\n" not in str(e.value)


def _write_png(path: Path) -> Path:
    Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------- naming items by their file

@pytest.mark.parametrize("dataset", ["imagenet", "sst2_fewshot", "caltech101", "stanford_cars", "flowers102",
                                     "cifar10", "pcam_fewshot"])
def test_each_item_is_named_by_the_file_it_is_read_from(tmp_path, dataset):
    _write(tmp_path, dataset)
    data = _data(tmp_path, dataset)
    for key, split in data.splits.items():
        for i in range(len(split.labels)):
            path = item_path(split.images, i)
            if dataset in ("cifar10", "pcam_fewshot"):  # arrays and HDF5: no file per image
                assert path is None
                continue
            with Image.open(path) as im:
                assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(split.images[i][0])), (key, i)


# ------------------------------------------------------------------------------------------- checker

def test_checker_names_each_bad_image_with_its_split_and_exits_1(tmp_path, capsys):
    _write(tmp_path, "iwildcam")
    jpeg = _truncate(tmp_path / "data" / IW / "train" / "test_2.png", "JPEG")  # iWildCam's images are JPEGs
    png = _truncate(tmp_path / "data" / IW / "train" / "train_0.png")
    args = ["check", "dataset=iwildcam", f"dataset.root={tmp_path / 'data'}"]
    assert datacheck(args) == 1
    out = capsys.readouterr().out
    assert f"bad image   {jpeg}  OSError: image file is truncated" in out and "[split test]" in out
    assert f"bad image   {png}" in out and "[split train]" in out
    assert "30 images checked: 2 bad" in out and "2 problem(s): 2 bad image" in out
    assert datacheck([*args, "--sample", "0"]) == 0  # metadata only
    assert datacheck([*args, "--sample", "5", "--workers", "1"]) in (0, 1)
    assert "checking a random 5 of the 30 images" in capsys.readouterr().out


def test_checker_finds_bad_images_of_fmow_and_of_torchvision_folders(tmp_path, capsys):
    _write(tmp_path, "fmow")
    png = _truncate(tmp_path / "data" / FM / "images" / "rgb_img_7.png")
    assert datacheck(["check", "dataset=fmow", f"dataset.root={tmp_path / 'data'}"]) == 1
    assert f"bad image   {png}" in capsys.readouterr().out
    _write(tmp_path, "imagenet")
    sketch = next((tmp_path / "data" / "sketch").rglob("*.JPEG"))
    sketch.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a header and nothing behind it
    assert datacheck(["check", "dataset=imagenet", f"dataset.root={tmp_path / 'data'}",
                      "dataset.class_names=[a,b,c,d]", "dataset.corruptions=[fog,snow]"]) == 1
    out = capsys.readouterr().out
    assert f"bad image   {sketch}" in out and "[split test_imagenet_sketch]" in out


def test_checker_command_line_shows_progress_and_no_traceback(tmp_path):
    _write(tmp_path, "iwildcam")
    bad = _truncate(tmp_path / "data" / IW / "train" / "val_1.png", "JPEG")
    proc = forkserver.run([sys.executable, "-m", "autoft.datacheck", "check", "dataset=iwildcam",
                           f"dataset.root={tmp_path / 'data'}", "--workers", "2"], timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "split val: 100%" in proc.stderr and str(bad) in proc.stdout


# -------------------------------------------------------------------------------------- run: error

@pytest.mark.parametrize("cache", [False, True])
def test_a_run_ends_with_one_line_naming_the_bad_file_and_its_split(tmp_path, cache):
    _write(tmp_path, "iwildcam")
    bad = _truncate(tmp_path / "data" / IW / "train" / "test_2.png", "JPEG")
    out = tmp_path / "run"
    proc = forkserver.run(
        [sys.executable, "-m", "autoft.finetune", "dataset=iwildcam", f"dataset.root={tmp_path / 'data'}",
         "model=tiny_clip", "model.pretrained=null", "~model.pretrain", "trainer.max_steps=1", "dataset.batch_size=8",
         "dataset.eval_batch_size=8", "dataset.num_workers=2", "dataset.ood_val_size=4", "logger=csv",
         f"dataset.cache={str(cache).lower()}", f"hydra.run.dir={out}"],
        timeout=300, env=os.environ | {"AUTOFT_CACHE": str(tmp_path / "cache")})
    errors = [line for line in proc.stderr.splitlines() if line.strip()]  # Lightning's notices: in the run's log
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: bad image {bad} (iwildcam split 'test'): OSError"), errors
    assert not (out / "results.json").exists()
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # the half-written cache file is gone


@pytest.mark.parametrize("dataset,broken,split", [
    ("fmow", FM / "images" / "rgb_img_0.png", "train"),  # CSV row 0: a 2002 train image
    ("sst2_fewshot", Path("rendered-sst2/test/positive/1.png"), "test_id"),
    ("caltech101", None, "test_id"),  # split by a seeded draw: an image the data module puts in test
])
def test_every_data_module_names_the_bad_file(tmp_path, dataset, broken, split):
    _write(tmp_path, dataset)
    cfg = _cfg(tmp_path, dataset)
    if broken is None:
        broken = item_path(_data(tmp_path, dataset).splits[split].images, 0)
    bad = _truncate(tmp_path / "data" / broken)
    with pytest.raises(BadImage, match=rf"^bad image {bad} \({cfg.dataset.name} split '{split}'\): "):
        run(cfg)
    assert not (tmp_path / "out" / "results.json").exists()


# --------------------------------------------------------------------------------------- run: skip

@pytest.mark.parametrize("cache", [False, True])
def test_skip_drops_the_bad_example_logs_it_once_and_counts_it(tmp_path, caplog, cache):
    truth = _write(tmp_path, "iwildcam")
    bad = _truncate(tmp_path / "data" / IW / "train" / "test_2.png", "JPEG")
    cfg = _cfg(tmp_path, "iwildcam", "dataset.on_bad_image=skip", f"dataset.cache={str(cache).lower()}")
    with caplog.at_level(logging.WARNING, logger="autoft.imagecheck"):
        run(cfg)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad image")]
    assert len(logged) == 1 and logged[0].startswith(f"skipping bad image {bad} (iwildcam split 'test'): OSError: ")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data/skipped_images"] == 1 and results["test_ood/skipped_images"] == 1
    assert results["test_id/skipped_images"] == results["train/skipped_images"] == 0
    if not cache:  # the OOD test metric is over the 5 readable images (recomputed here from the files)
        model, data = build(cfg)
        results = finetune(cfg, model, data).results
        assert len(data.subsets["test_ood"]) == 5 and results["test_ood/skipped_images"] == 1
        df = truth["df"]
        rows = df[(df["split"] == "test") & (df["filename"] != "test_2.png")]
        pred = _logits(model, data.eval_transform,
                       [Image.open(truth["folder"] / "train" / f) for f in rows["filename"]]).argmax(-1).numpy()
        assert results["test_ood/F1-macro_all"] == pytest.approx(
            f1_score(rows["y"], pred, average="macro", labels=np.unique(rows["y"])))


def test_skip_scans_once_and_sees_a_replaced_file(tmp_path, monkeypatch):
    _write(tmp_path, "imagenet")
    bad = _truncate(next((tmp_path / "data" / "imagenet" / "val").rglob("*.JPEG")))
    args = ("dataset.on_bad_image=skip",)
    assert _data(tmp_path, "imagenet", *args).skipped["test_id"] == 1
    monkeypatch.setattr("autoft.imagecheck.scan", lambda *a, **k: pytest.fail("scanned again"))
    again = _data(tmp_path, "imagenet", *args)
    assert again.skipped == {"train": 0, "val_id": 0, "val_ood": 0, "test_id": 1, "test_imagenet_v2": 0,
                             "test_imagenet_r": 0, "test_imagenet_sketch": 0, "test_objectnet": 0,
                             "test_imagenet_a": 0}
    assert len(again.splits["test_id"].labels) == 7
    _write_png(bad)  # a good file where the bad one was: remembered as bad, checked again, kept
    assert _data(tmp_path, "imagenet", *args).skipped["test_id"] == 0
