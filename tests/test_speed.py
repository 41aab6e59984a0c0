"""Speed work that must not change results: short caption tokens, the preprocessing cache, trials without reload,
batches made ahead on a thread, W&B runs written after their trial."""

from __future__ import annotations

import json
import sys

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
import wandb
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.utils.data import DataLoader

import autoft.finetune as ft
import autoft.trial as trial
from autoft.data import WildsDataModule
from autoft.datasets import ArrayImages, ClassificationDataModule, Split
from autoft.imagecache import CachedLoaders
from autoft.loggers import wait_for_runs
from autoft.model import CLIPClassifier, load_clip
from autoft.prefetch import PrefetchLoader, read_ahead
from autoft.tensorprep import eval_prep, model_input, random_resized_crop
from tests import forkserver
from tests.conftest import overrides

NAMES = ["fox", "deer", "great blue heron", "red-tailed hawk"]


@pytest.mark.parametrize("name", ["autoft-tiny", "ViT-B-16"])
def test_caption_tokens_cut_after_end_of_text_encode_to_the_same_features(name):
    torch.manual_seed(0)
    clip, _, _, tok = load_clip(name, None)  # random weights: the equality does not depend on them
    clf = CLIPClassifier(clip, tok, NAMES, ["a photo of a {}."], train_text=True)
    full = tok([f"a photo of a {n}." for n in NAMES])
    assert clf.prefix_text and clf.caption_tokens.shape[1] < full.shape[1]
    assert torch.equal(clf.caption_tokens, full[:, : clf.caption_tokens.shape[1]])
    assert not full[:, clf.caption_tokens.shape[1]:].any()  # only padding was cut
    with torch.no_grad():
        torch.testing.assert_close(clf.encode_captions(clf.caption_tokens), clip.encode_text(full),
                                   rtol=1e-5, atol=1e-5)


def test_trained_text_tower_encodes_each_class_once_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    clip, _, _, tok = load_clip("autoft-tiny", None)
    clf = CLIPClassifier(clip, tok, NAMES, ["a photo of a {}."], train_text=True)
    labels = torch.tensor([0, 3, 3, 1, 0, 2, 3])  # more images than classes: the gather path
    weights = torch.randn(len(labels), 64)  # a fixed linear loss of the features

    def grads(features):
        clf.zero_grad()
        (features * weights).sum().backward()
        return {n: p.grad.clone() for n, p in clf.named_parameters() if p.grad is not None}

    gathered = clf.caption_features(labels)
    g1 = grads(gathered)
    per_image = F.normalize(clf.encode_captions(clf.caption_tokens[labels]), dim=-1)
    torch.testing.assert_close(gathered, per_image)
    g2 = grads(per_image)
    assert g1.keys() == g2.keys() and any(n.startswith("clip.transformer.") for n in g1)
    for n in g1:  # equal up to float summation order, relative to each gradient's scale
        assert (g1[n] - g2[n]).abs().max() <= 1e-4 * g2[n].abs().max(), n


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    clip, _, _, tok = load_clip("autoft-tiny", None)
    clf = CLIPClassifier(clip, tok, NAMES, ["a photo of a {}."])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = clf(x)
        after = clf.use_channels_last()(x)
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def _transforms():
    _, train_tf, eval_tf, _ = load_clip("autoft-tiny", None)
    return train_tf, eval_tf


def test_cached_evaluation_batches_equal_the_pil_path_and_the_cache_is_written_once(tiny_world, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("AUTOFT_CACHE", str(tmp_path))
    _, root = tiny_world
    train_tf, eval_tf = _transforms()
    cached = WildsDataModule("iwildcam", root, train_tf, eval_tf, ood_val_size=40, cache=True)
    assert sorted(cached.cached) == ["test_id", "test_ood", "train", "val_id", "val_ood"]
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())  # written when read
    plain = WildsDataModule("iwildcam", root, train_tf, eval_tf, ood_val_size=40)
    for key in ("val_id", "val_ood", "test_id", "test_ood"):
        (x, y, meta), = list(cached._eval([key])[0])
        (want, y0, meta0), = list(plain._eval([key])[0])
        assert x.dtype == torch.uint8 and torch.equal(y, y0) and torch.equal(meta, meta0), key
        torch.testing.assert_close(model_input(x, cached.prep), want, rtol=0, atol=1e-6)
    assert cached._eval(["val_ood"])[0] is cached._eval(["val_ood"])[0]  # loaders built once, reused by trials
    files = sorted((tmp_path / "images").glob("iwildcam-*.npy"))
    assert {f.name.split("-")[1] for f in files} == {"id_val", "val", "id_test", "test"}  # one per WILDS split
    assert not list((tmp_path / "images").glob(".*.tmp"))  # written atomically
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = WildsDataModule("iwildcam", root, train_tf, eval_tf, ood_val_size=20, subset_seed=3, cache=True)
    assert len(list(again._eval(["val_ood"])[0])[0][0]) == 20
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # another subset of the same split: same file
    x, _, _ = next(iter(again.train_dataloader()))
    assert x.shape == (128, 32, 32, 3) and len(list((tmp_path / "images").glob("iwildcam-train-*.npy"))) == 1
    assert again.train_prep.crop == ((32, 32), (0.9, 1.0), (0.75, 4 / 3), "bicubic")  # open_clip's train transform


def test_classification_data_module_caches_too(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {k: rng.integers(0, 256, (n, 40, 48, 3), dtype=np.uint8) for k, n in
              (("train", 12), ("val_id", 6), ("val_ood", 6), ("test_id", 6))}
    splits = {}
    for k, a in arrays.items():
        path = tmp_path / f"{k}.npy"
        np.save(path, a)
        splits[k] = Split(ArrayImages(a), rng.integers(0, 3, len(a)), str(path), 3)
    train_tf, eval_tf = _transforms()
    cached = ClassificationDataModule(splits, ["a", "b", "c"], train_tf, eval_tf, batch_size=4, cache=True)
    plain = ClassificationDataModule(splits, ["a", "b", "c"], train_tf, eval_tf, batch_size=4)
    for key in ("val_id", "test_id"):
        (x, y, meta), = list(cached._eval([key])[0])
        (want, y0, meta0), = list(plain._eval([key])[0])
        assert torch.equal(y, y0) and torch.equal(meta, meta0)
        torch.testing.assert_close(model_input(x, cached.prep), want, rtol=0, atol=1e-6)


def test_random_resized_crop_on_tensors():
    x = torch.rand(4, 3, 16, 16) * 255
    torch.manual_seed(0)
    same = random_resized_crop(x, (16, 16), (1.0, 1.0), (1.0, 1.0), "bilinear")
    torch.testing.assert_close(same, x, rtol=0, atol=1e-3)  # the whole image at its own size
    flipped = random_resized_crop(x, (16, 16), (1.0, 1.0), (1.0, 1.0), "bilinear", flip=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), rtol=0, atol=1e-3)
    torch.manual_seed(1)
    a = random_resized_crop(x, (8, 8), (0.2, 0.5), (0.75, 4 / 3), "bicubic", flip=0.5)
    torch.manual_seed(1)
    assert a.shape == (4, 3, 8, 8) and torch.equal(a, random_resized_crop(x, (8, 8), (0.2, 0.5), (0.75, 4 / 3),
                                                                          "bicubic", flip=0.5))
    assert not torch.allclose(a[0], F.interpolate(x[:1], size=(8, 8), mode="bilinear")[0], atol=1.0)


def test_uncacheable_transforms_fall_back_to_files():
    from torchvision import transforms as T

    assert eval_prep(T.Compose([T.ColorJitter(0.5), T.ToTensor()])) is None
    assert eval_prep(lambda image: image) is None
    prep = eval_prep(T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()]))
    assert prep.mean == (0.0, 0.0, 0.0) and prep.std == (1.0, 1.0, 1.0)


def _cfg(tmp_path, *extra: str):
    with initialize_config_dir(config_dir=ft.CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=overrides() + ["logger=csv", "test=false", *extra])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
        cfg.logger.save_dir = str(tmp_path)
    return cfg


def test_second_trial_in_one_process_reuses_the_model_and_equals_a_fresh_run(tmp_path, monkeypatch):
    loads = []
    real = ft.load_clip
    monkeypatch.setattr(ft, "load_clip", lambda *a, **k: loads.append(a) or real(*a, **k))
    first = _cfg(tmp_path / "a", "objective=robust", "optim.lr=1e-3", "seed=1")  # l2init, flyp: moves theta
    second = _cfg(tmp_path / "b", "+objective.weights.l1init=0.01", "optim.lr=5e-4", "seed=2")
    ft._BUILT.clear()
    trial.run(first)
    model = next(iter(ft._BUILT.values()))[0]
    trial.run(second)
    assert len(loads) == 1 and next(iter(ft._BUILT.values()))[0] is model  # no reload: same model object
    reused = json.loads((tmp_path / "b" / "results.json").read_text())
    reused_state = {k: v.clone() for k, v in model.state_dict().items()}
    ft._BUILT.clear()  # a fresh process: nothing kept
    trial.run(_cfg(tmp_path / "c", "+objective.weights.l1init=0.01", "optim.lr=5e-4", "seed=2"))
    assert len(loads) == 2
    fresh = json.loads((tmp_path / "c" / "results.json").read_text())
    assert reused == fresh and "val_ood/neg_ce" in fresh  # a continuous metric: any difference would show
    fresh_state = next(iter(ft._BUILT.values()))[0].state_dict()
    assert all(torch.equal(v, fresh_state[k]) for k, v in reused_state.items())  # the same weights, bit for bit


def test_trials_leave_the_model_on_its_device_and_drop_the_optimizer_state(tmp_path, monkeypatch):
    """Lightning's teardown copies the module (with theta0) and AdamW's state to the host after every fit,
    and the next trial's fit copies the module back; the trials' trainer leaves them where they are."""
    moves = []
    real = ft.FineTuner.cpu
    monkeypatch.setattr(ft.FineTuner, "cpu", lambda self: moves.append(self) or real(self))
    cfg = _cfg(tmp_path, "trainer.max_steps=2", "objective=robust")
    model, data = ft.build(cfg)
    module = ft.finetune(cfg, model, data)  # Lightning's own teardown, for contrast
    assert moves and module.trainer.optimizers[0].state
    moves.clear()
    module = ft.finetune(cfg, model, data, **trial.trainer_overrides({"devices": 1, "accelerator": "cpu"}))
    assert isinstance(module.trainer.strategy, trial.KeepOnDevice) and module.trainer.global_step == 2
    assert not moves and not module.trainer.optimizers[0].state
    ft._BUILT.clear()
    trial.run(cfg)  # a search trial
    assert not moves
    # only a plain one-device trainer gets it; DDP, several devices and other accelerators keep their own
    assert trial._single_device({"devices": 1, "accelerator": "cpu"}) == torch.device("cpu")
    for other in ({"devices": 2}, {"devices": 1, "strategy": "ddp"}, {"devices": 1, "num_nodes": 2},
                  {"devices": 1, "accelerator": "mps"}):
        assert trial._single_device({"accelerator": "auto"} | other) is None


def test_search_trials_validate_only_what_they_are_scored_on(tmp_path):
    cfg = _cfg(tmp_path)
    assert trial.validation_keys(cfg, search=False) == ("val_id", "val_ood")
    assert trial.validation_keys(cfg, search=True) == ("val_ood",)
    with open_dict(cfg):
        cfg.returns = ["val_id", "val_ood"]
    assert trial.validation_keys(cfg, search=True) == ("val_id", "val_ood")


@pytest.mark.parametrize("steps, every, validated", [(3, 2, [2, 3]), (2, 25, [2]), (4, 2, [2, 4])])
def test_a_run_is_validated_after_its_last_step_whatever_the_interval(tmp_path, monkeypatch, steps, every, validated):
    """inner_steps=3 under eval_every=2 was scored at step 2; inner_steps=2 under 25 never validated (no value)."""
    seen = []
    real = ft.FineTuner.on_validation_epoch_end
    monkeypatch.setattr(ft.FineTuner, "on_validation_epoch_end",
                        lambda self: seen.append(self.global_step) or real(self))
    trial.run(_cfg(tmp_path, f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}"))
    assert seen == validated


def test_trainers_of_a_search_process_scan_the_installed_packages_once_and_still_call_the_factories(monkeypatch):
    """Lightning reads every installed package's entry points for external callbacks in each pl.Trainer(); in a
    search process (autoft.trial imported) the scan is made once, and each Trainer still calls the factories."""
    import importlib.metadata

    from lightning_fabric.utilities import registry

    class Probe(importlib.metadata.Distribution):  # an installed package with a callbacks factory
        def read_text(self, filename: str) -> str | None:
            return {"METADATA": "Name: autoft-probe\nVersion: 0\n",
                    "entry_points.txt": "[pytorch_lightning.callbacks_factory]\nprobe = autoft.trial:_probe\n"
                    }.get(filename)

        def locate_file(self, path):
            return None

    scans, made = [], []
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: scans.append(1) or [Probe()])
    monkeypatch.setattr(trial, "_probe", lambda: made.append(1) or [trial.ValidateAtEnd(1)], raising=False)
    registry.entry_points.cache_clear()
    try:
        trainers = [ft.pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
                    for _ in range(3)]
    finally:
        registry.entry_points.cache_clear()  # the next Trainer scans the real packages
    assert len(scans) == 1 and len(made) == 3
    assert all(sum(isinstance(c, trial.ValidateAtEnd) for c in t.callbacks) == 1 for t in trainers)


def _noisy(batch, generator):
    """A stand-in for the crop: the batch plus noise from the loader's generator."""
    return batch + torch.rand(batch.shape, generator=generator)


def test_prefetched_batches_follow_the_seed_alone_and_equal_the_same_work_done_in_order():
    data = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    loader = PrefetchLoader(data, batch_size=4, shuffle=True, prepare=_noisy)
    torch.manual_seed(3)
    ahead = [b.clone() for b in loader]
    torch.manual_seed(3)
    again = list(loader)
    # the same work in the main thread: one draw from the seeded global RNG, then shuffle and noise from it
    torch.manual_seed(3)
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    order = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))
    crops = torch.Generator().manual_seed(seed + 1)
    in_order = [_noisy(b, crops) for b in order]
    assert len(ahead) == 5 and all(torch.equal(a, b) for a, b in zip(ahead, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ahead, in_order, strict=True))
    torch.manual_seed(4)
    assert not torch.equal(next(iter(loader)), ahead[0])


def test_an_epoch_started_early_is_the_plain_epoch_and_is_dropped_once_the_rng_moved():
    """A search trial starts its first epoch right after seeding (PrefetchLoader.start_epoch); iter() takes it only
    if the global RNG did not move since, and either way batches and the global RNG follow as without it."""
    data = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    loader = PrefetchLoader(data, batch_size=4, shuffle=True, prepare=_noisy)
    torch.manual_seed(3)
    plain, after_plain = list(loader), torch.rand(3)
    torch.manual_seed(3)
    loader.start_epoch()
    started = loader._early[1]
    epoch = iter(loader)
    assert epoch is started  # taken: nothing drew from the global RNG in between
    assert all(torch.equal(a, b) for a, b in zip(epoch, plain, strict=True))
    assert torch.equal(torch.rand(3), after_plain)  # the global RNG drew once, as a plain iter() does
    torch.manual_seed(5)
    moved = [b.clone() for b in loader]
    torch.manual_seed(5)
    loader.start_epoch()
    early = loader._early[1]
    torch.manual_seed(5)  # reseeded to the same state: equal state, the same epoch
    assert iter(loader) is early
    torch.manual_seed(3)
    loader.start_epoch()
    dropped = loader._early[1]
    torch.manual_seed(5)  # something reseeded (or drew) after the early start: the early epoch is not this one
    epoch = iter(loader)
    assert epoch is not dropped and not dropped.thread.is_alive()
    assert all(torch.equal(a, b) for a, b in zip(epoch, moved, strict=True))


def test_prefetch_thread_stops_when_an_epoch_is_left_and_raises_in_the_main_thread():
    data = torch.zeros(64, 2)
    batches = iter(PrefetchLoader(data, batch_size=2, prepare=_noisy))
    next(batches)  # Lightning leaves the epoch at max_steps, mid-way
    thread = batches.thread
    del batches
    thread.join(timeout=5)
    assert not thread.is_alive()

    def broken(batch, generator):
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        next(iter(PrefetchLoader(data, batch_size=2, prepare=broken)))


@pytest.mark.parametrize("device, train, expected", [
    ("cpu", True, "_train_input"), ("cpu", False, None), ("cuda", True, "read_ahead"), ("cuda", False, "read_ahead"),
    (None, True, None)])
def test_cached_loaders_read_ahead_on_a_gpu_and_make_the_train_input_ahead_on_cpu(device, train, expected):
    """What each cached loader's thread does, by the trainer's device (None: no trainer, nothing ahead)."""
    class Strategy:
        root_device = torch.device(device) if device else None

    loaders = CachedLoaders()
    if device:
        loaders.trainer = type("Trainer", (), {"strategy": Strategy()})()
    prepare = loaders._prepare(train)
    assert (prepare.__name__ if prepare else None) == expected


_EXIT_WITH_A_THREAD_MID_BATCH = """
import sys, time
from pathlib import Path
import torch
from autoft.prefetch import PrefetchLoader

def slow(batch, generator):
    time.sleep(0.5)
    with Path(sys.argv[1]).open("a") as f:
        f.write("prepared\\n")
    return batch

batches = iter(PrefetchLoader(torch.zeros(64, 2), batch_size=2, prepare=slow))
next(batches)  # the thread is preparing the next batch when the process ends, the iterator still held
"""


def test_a_process_ends_only_after_its_prefetch_threads_stopped(tmp_path):
    """A daemon thread still inside a torch call at interpreter shutdown aborts the process (the H200 check:
    exit 134 after a finished search); the thread is stopped and joined at exit, its batch finished."""
    marker, script = tmp_path / "prepared.txt", tmp_path / "exit_mid_batch.py"
    script.write_text(_EXIT_WITH_A_THREAD_MID_BATCH)
    done = forkserver.run([sys.executable, str(script), str(marker)], timeout=120)  # its own process, forked
    assert done.returncode == 0, done.stderr
    # the thread was mid-way through the second batch (a slow exit could let it begin a third); killed, it ends at one
    lines = marker.read_text().splitlines()
    assert len(lines) >= 2 and set(lines) == {"prepared"}, lines


def test_read_ahead_batches_equal_the_plain_loader_s():
    """A loader that only reads ahead (a GPU's) gives the batches, in the order, of one that does not."""
    data = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    torch.manual_seed(5)
    ahead = list(PrefetchLoader(data, batch_size=4, shuffle=True, prepare=read_ahead))
    torch.manual_seed(5)
    plain = list(PrefetchLoader(data, batch_size=4, shuffle=True))
    assert len(ahead) == 5 and all(torch.equal(a, b) for a, b in zip(ahead, plain, strict=True))


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def _wandb_runs(folder) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))]


def test_each_search_trial_has_its_own_wandb_run_pruned_or_not(tmp_path, monkeypatch):
    """A trial's W&B run is written after the trial (grouped by study, named after the trial, its params in
    the config, its final metrics in the summary); a pruned trial's run is closed too, so the next trial
    does not log into it."""
    cfg = _cfg(tmp_path, "logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=1")
    study = optuna.create_study(study_name="speed-study", direction="maximize")
    trials = []
    monkeypatch.setattr(trial, "trial_from_config", lambda cfg: trials[-1])
    trials.append(study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}))
    value = trial.run(cfg)
    study.tell(trials[-1], value)
    study.pruner = _AlwaysPrune()
    trials.append(study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}))
    with pytest.raises(optuna.TrialPruned):
        trial.run(cfg)
    wait_for_runs()
    wandb.teardown()  # W&B's service closes each run's file after finish returns: wait for it (exit does too)
    first, pruned = sorted(_wandb_runs(tmp_path), key=lambda record: b"trial-1" in record)
    for number, record in enumerate((first, pruned)):
        assert b"speed-study" in record and f"trial-{number}".encode() in record and b"optim.lr" in record
        assert b"val_ood/F1-macro_all" in record and b"train/loss" in record
    assert b"finished" in first and b"pruned" in pruned and b"trial-0" not in pruned


def test_a_trial_run_is_written_once_the_next_trial_trains_or_when_asked(monkeypatch):
    """The background writer waits WRITE_AFTER_S before writing a run (the next trial's set-up and the write would
    take turns on the GIL); wait_for_runs() cuts the wait short, and every run is written in order."""
    import time

    import autoft.loggers as loggers

    written = []
    monkeypatch.setattr(loggers, "WRITE_AFTER_S", 20.0)
    monkeypatch.setattr(loggers, "_write", lambda offline, save_dir, init, *a, **k: written.append(init["name"]))
    for name in ("trial-0", "trial-1"):
        loggers.write_run(True, None, {"name": name}, {}, [], {})
    time.sleep(0.2)
    assert written == []  # not while the next trial sets up
    start = time.perf_counter()
    wait_for_runs()
    assert written == ["trial-0", "trial-1"] and time.perf_counter() - start < 15
