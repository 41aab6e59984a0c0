"""The budgets' batch sizes: ``dataset.budget.inner_batch_size`` reaches the search's trials and
``final_batch_size`` final training (the methods suite's and ``python -m autoft.final``'s), read from the trainer's
train dataloader."""

from __future__ import annotations

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import autoft.final
from autoft.finetune import CONF_DIR, build, finetune
from autoft.methods import search_overrides
from tests.conftest import TINY_PRETRAIN, TINY_WORLD

TINY = [*(f"dataset.world.{k}={v}" for k, v in TINY_WORLD.items()),
        *(f"model.pretrain.{k}={v}" for k, v in TINY_PRETRAIN.items()), "dataset.ood_val_size=40", "logger=csv"]


def _benchmark(tmp_path, *extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("benchmark", overrides=["study=test", *TINY, *extra])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "out")
    return cfg


def test_every_budget_names_both_batch_sizes():
    import glob
    from pathlib import Path

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for path in glob.glob(f"{CONF_DIR}/dataset/*.yaml"):
            budget = compose("benchmark", overrides=[f"dataset={Path(path).stem}", "study=x"]).dataset.budget
            assert budget.inner_batch_size > 0 and budget.final_batch_size > 0, path


def test_a_search_trial_trains_at_the_budgets_inner_batch_size(tmp_path):
    cfg = _benchmark(tmp_path, "method=autoft", "dataset.budget.inner_batch_size=24")
    got = search_overrides(cfg, [])
    assert "dataset.batch_size=24" in got
    assert "dataset.batch_size=7" in search_overrides(cfg, ["dataset.batch_size=7"])  # the job's own wins
    trial = [o for o in got if not o.startswith("hydra.")]  # the sweeper's settings are not the trial's config
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        trial_cfg = compose("finetune", overrides=[*trial, *TINY, "search.inner_steps=1", "test=false"])
    with open_dict(trial_cfg):
        trial_cfg.output_dir = str(tmp_path / "trial")
    model, data = build(trial_cfg)
    module = finetune(trial_cfg, model, data)
    assert module.trainer.train_dataloader.batch_size == 24  # search=embedded itself says 128


def _record_train_batch_size(monkeypatch) -> list[int]:
    """The batch size of each final training's train dataloader, as the trainer sees it."""
    seen: list[int] = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, module):
            seen.append(trainer.train_dataloader.batch_size)

    def spy(cfg, model, data, logger=None, callbacks=None, **kwargs):
        return finetune(cfg, model, data, logger, [*(callbacks or []), Record()], **kwargs)

    monkeypatch.setattr(autoft.final, "finetune", spy)
    return seen


def test_final_training_of_the_methods_suite_uses_the_final_batch_size(tmp_path, monkeypatch):
    from autoft.methods import run

    seen = _record_train_batch_size(monkeypatch)
    cfg = _benchmark(tmp_path, "method=ft", "dataset.budget.final_batch_size=40", "trainer.max_steps=1",
                     "wise_alphas=[1.0]")
    assert cfg.dataset.batch_size == 40
    run(cfg, [])
    assert seen == [40]


def test_final_training_app_uses_the_final_batch_size(tmp_path, monkeypatch):
    """conf/final.yaml (python -m autoft.final) takes the dataset's final budget, as conf/benchmark.yaml does."""
    seen = _record_train_batch_size(monkeypatch)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("final", overrides=[*TINY, "dataset.budget.final_batch_size=40", "trainer.max_steps=1",
                                          "wise_alphas=[1.0]", f"output_dir={tmp_path / 'out'}"])
    assert cfg.dataset.batch_size == 40 and cfg.trainer.max_epochs == cfg.dataset.budget.final_epochs
    autoft.final.final_train(cfg, {}, tmp_path / "out")
    assert seen == [40]
