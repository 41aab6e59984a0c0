"""The inner loop end to end: Hydra composition, Lightning fit, metrics, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from autoft.finetune import CONF_DIR, VAL_KEYS, FineTuner, build, evaluate, finetune
from autoft.objective import CompositeObjective
from autoft.trial import run
from tests import forkserver
from tests.conftest import overrides


def _cfg(tmp_path, *extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=overrides() + list(extra))
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
        cfg.logger.save_dir = str(tmp_path)
    return cfg


def test_run_logs_every_prefix_and_returns_the_ood_metric(tmp_path, monkeypatch):
    import autoft.trial

    built = []
    monkeypatch.setattr(autoft.trial, "build", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    cfg = _cfg(tmp_path, "objective=robust", "logger=csv")
    value = run(cfg)
    # the trained model's OOD validation metric, as an evaluation of that model here gives it
    model, data = built[0]
    again = evaluate(cfg, model, data, VAL_KEYS)
    assert again["val_ood/F1-macro_all"] != again["val_id/F1-macro_all"]  # the premise: the splits tell apart
    assert value == pytest.approx(again["val_ood/F1-macro_all"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["val_ood/F1-macro_all"] == value
    for prefix in ("val_id", "val_ood", "test_id", "test_ood"):
        assert f"{prefix}/F1-macro_all" in results and f"{prefix}/acc_avg" in results
    metrics = pd.read_csv(next(tmp_path.glob("csv/version_*/metrics.csv")))
    for col in ("train/loss", "train/ce", "train/flyp", "train/l2init", "val_ood/F1-macro_all",
                "test_ood/F1-macro_all"):
        assert col in metrics.columns, col


def test_terms_are_logged_on_the_steps_lightning_writes_with_that_steps_values(tmp_path, monkeypatch):
    """Written rows are steps 3 and 7 (log every 4), each with its own step's values: the norm term too (it once
    came from the step after the last row, so the first row's l2init was theta0's 0.0), and the terms are passed
    to self.log only on those steps (each call costs about 0.6 ms on CPU)."""
    calls = []
    real = FineTuner.log_dict

    def spy(self, values, **kwargs):
        calls.append(self.global_step)
        return real(self, values, **kwargs)

    monkeypatch.setattr(FineTuner, "log_dict", spy)
    cfg = _cfg(tmp_path, "objective=robust", "logger=csv", "trainer.max_steps=8", "trainer.log_every_n_steps=4",
               "trainer.val_check_interval=8", "test=false", "+trainer.enable_progress_bar=false")
    from autoft.loggers import make_logger

    model, data = build(cfg)
    finetune(cfg, model, data, make_logger(cfg, None))
    metrics = pd.read_csv(next(tmp_path.glob("csv/version_*/metrics.csv")))
    rows = metrics.dropna(subset=["train/loss"]).set_index("step")
    assert list(rows.index) == [3, 7] and (rows["train/l2init"] > 0).all(), rows
    assert [step for step in calls if step < 8] == [3, 7], calls  # the training steps' log_dict calls


def test_step_budget_and_weights_move(tmp_path):
    cfg = _cfg(tmp_path, "trainer.max_steps=3", "test=false")
    model, data = build(cfg)
    before = model.head.weight.detach().clone()
    module = finetune(cfg, model, data)
    assert module.trainer.global_step == 3
    assert not torch.equal(before, model.head.weight)
    assert "test_ood/F1-macro_all" not in module.results


def test_zero_lr_leaves_the_model_and_zero_shot_eval_agrees(tmp_path):
    cfg = _cfg(tmp_path, "optim.lr=0.0", "optim.weight_decay=0.0", "test=false")
    model, data = build(cfg)
    zero_shot = evaluate(cfg, model, data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(cfg, model, data)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert evaluate(cfg, model, data) == zero_shot


def test_cosine_schedule_warms_up_then_decays(tmp_path):
    cfg = _cfg(tmp_path, "trainer.max_steps=10", "optim.schedule=cosine", "optim.warmup_steps=2", "test=false")
    model, data = build(cfg)
    lrs = []

    class Spy(FineTuner):
        def on_train_batch_start(self, batch, batch_idx):
            lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    objective = CompositeObjective({"ce": 1.0}, model.trainable())
    module = Spy(model, objective, data.evaluate, **cfg.optim)
    from autoft.finetune import make_trainer

    make_trainer(cfg).fit(module, datamodule=data)
    peak = cfg.optim.lr
    assert lrs[0] == pytest.approx(peak / 2) and lrs[1] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] < 0.1 * peak


def test_non_finite_loss_stops_before_its_optimizer_step(tmp_path):
    """The loss is checked after backward (so the GPU is not left waiting), still before the step: the
    diverged step changes no weight."""
    from autoft.finetune import make_trainer

    cfg = _cfg(tmp_path, "trainer.max_steps=5", "test=false")
    model, data = build(cfg)
    heads = []

    class NanAtThirdStep(CompositeObjective):
        def forward(self, *args, **kwargs):
            total, values = super().forward(*args, **kwargs)
            return (total * float("nan") if len(heads) == 3 else total), values

    class Spy(FineTuner):
        def on_train_batch_start(self, batch, batch_idx):
            heads.append(model.head.weight.detach().clone())

    objective = NanAtThirdStep({"ce": 1.0, "l2init": 0.1}, model.trainable(), closed_form_norms=True)
    module = Spy(model, objective, data.evaluate, **cfg.optim)
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 2"):
        make_trainer(cfg).fit(module, datamodule=data)
    assert not torch.equal(heads[1], heads[2])  # the steps before it trained
    assert torch.equal(model.head.weight, heads[2])


@pytest.mark.xdist_group("compiled")  # torch.compile's first compile in a process (about 12 s cold): on one worker
def test_norm_gradients_are_compiled_with_the_model_or_on_their_own(tmp_path, monkeypatch):
    import autoft.finetune as ft

    model, data = build(_cfg(tmp_path))
    seen = []

    class Built(Exception):
        pass

    def objective(*args, **kwargs):
        seen.append(kwargs["compile_norm_grads"])
        raise Built

    monkeypatch.setattr(ft, "CompositeObjective", objective)
    cases = [([], False), (["model.compile=true"], True), (["model.compile_norm_grads=true"], True),
             (["model.compile=true", "model.compile_norm_grads=false"], False)]
    for extra, expected in cases:
        with pytest.raises(Built):
            finetune(_cfg(tmp_path, *extra), model, data)
        assert seen.pop() is expected, extra


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "autoft.finetune", *args], cwd=cwd, timeout=300)


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    proc = _cli("dataset=no_such_dataset", cwd=tmp_path)
    assert proc.returncode != 0 and "no_such_dataset" in proc.stderr
    proc = _cli("dataset.world=null", "dataset.root=/no/such/root", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: iwildcam: data folder /no/such/root")
    assert "Traceback" not in proc.stderr
    proc = _cli("+objective.weights.foo=1", *overrides(), cwd=tmp_path)
    assert proc.returncode == 2 and "error: objective: unknown loss term 'foo'" in proc.stderr


def test_wandb_runs_offline_without_login_and_writes_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    cfg = _cfg(tmp_path, "logger=wandb", "trainer.max_steps=2")
    run(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A checkpoint write that dies midway leaves the previous checkpoint intact and no stray file."""
    from autoft.finetune import AtomicCheckpointIO, make_trainer

    trainer = make_trainer(_cfg(tmp_path))
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO)
    path = tmp_path / "ckpt" / "best.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.ckpt"]
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
