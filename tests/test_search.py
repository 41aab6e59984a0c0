"""The AutoFT search through the project's sweeper on the real fine-tuning app, and final training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from autoft.finetune import CONF_DIR
from tests import forkserver
from tests.conftest import overrides, trial_states
from tests.inprocess import call_main, subprocess_in_process

ROOT = Path(__file__).resolve().parents[1]
TINY_SEARCH = ["search=embedded", "search.inner_steps=4", "search.eval_every=2"]


def _overrides() -> list[str]:
    """The tiny world's overrides less conftest's trainer.max_steps: a search's budget is search.inner_steps."""
    return [o for o in overrides() if not o.startswith("trainer.max_steps=")]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}


def _search(sweep_dir: Path, *extra: str, n_trials: int = 3) -> int:
    """The search command, run in this process (tests/inprocess.py: the same main and argv without ~12 s of imports
    per process); its exit status. The killed search and the CLI error below keep their own process."""
    import autoft.finetune

    argv = ["-m", *TINY_SEARCH, *_overrides(), f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.n_trials={n_trials}",
            *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(sweep_dir.parent)
        return call_main(autoft.finetune.main, argv, prog=autoft.finetune.__file__)


def _study(sweep_dir: Path, name: str = "autoft-embedded-seed0") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


# make test runs the suite on 2 pytest-xdist workers (--dist loadgroup): the tests that read one search share a
# worker, so it runs once
shared_search = pytest.mark.xdist_group("searched")


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("search") / "sweep"
    assert _search(sweep) == 0
    return sweep


@shared_search
def test_search_writes_best_params_and_counts_trials(searched):
    study = _study(searched)
    assert len(_finished(study)) == 3
    best = yaml.safe_load((searched / "best_params.yaml").read_text())
    assert best["best_value"] == pytest.approx(study.best_value)
    space = {"optim.lr", "optim.weight_decay", "seed"} | {f"objective.weights.{t}" for t in
                                                           ("hinge", "entropy", "dcm", "flyp", "l1init", "l2init",
                                                            "l1zero", "l2zero")}
    assert set(best["best_params"]) == space
    assert 1e-6 <= best["best_params"]["optim.lr"] <= 1e-2
    for t in study.trials:  # every trial reported its OOD validation metric through the storage
        assert t.intermediate_values and t.user_attrs["inner_steps"] == 4
        # ... and logged an offline W&B run of its own, grouped by study, named after the trial, with its params
        record = next((searched / str(t.number) / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
        assert b"autoft-embedded-seed0" in record and f"trial-{t.number}".encode() in record
        assert b"objective.weights.hinge" in record


@shared_search
def test_same_seed_same_trials(searched, tmp_path):
    again = tmp_path / "sweep"
    assert _search(again) == 0
    a, b = _study(searched).trials, _study(again).trials
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.value for t in a] == pytest.approx([t.value for t in b], abs=1e-6)


def test_pruning_stops_trials_early(tmp_path):
    """A 6-step budget validated every 2 steps: trials the pruner stops end before step 6, the others run all 6."""
    sweep = tmp_path / "sweep"
    assert _search(sweep, "hydra/sweeper/pruner=percentile", "hydra.sweeper.pruner.percentile=1.0",
                   "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0",
                   "search.inner_steps=6", n_trials=4) == 0
    trials = _study(sweep).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 4
    assert all(t.user_attrs["inner_steps"] == 6 and max(t.intermediate_values) == 6 for t in complete)
    for t in pruned:  # stopped at the validation the pruner refused: no step after it
        assert t.user_attrs["inner_steps"] == max(t.intermediate_values) < 6, (t.number, t.intermediate_values)


@pytest.mark.long(16)
def test_killed_search_resumes_to_exactly_n_trials(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "autoft.finetune", "-m", *TINY_SEARCH, *_overrides(), f"hydra.sweep.dir={sweep}",
           "hydra.sweeper.n_trials=4", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    proc = forkserver.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once one trial is done and the next is running
        states = trial_states(sweep / "optuna.db")
        if sum(s.startswith("COMPLETE") for s in states) >= 1 and "RUNNING+beat" in states:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # what the kill left (the process is gone: these states are final): a trial cut short while it ran
    killed = trial_states(sweep / "optuna.db", exited=True)
    assert killed.count("RUNNING+beat") == 1, killed
    time.sleep(3.5)  # past the grace period: the dead process's RUNNING trial is stale
    proc = forkserver.run(cmd, cwd=tmp_path, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(sweep)
    assert len(_finished(study)) == 4
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    # the killed trial failed as stale and its params ran again, once
    cut = [t for t in study.trials if t.state == TrialState.FAIL]
    retries = [t for t in study.trials if "failed_trial" in t.system_attrs]
    assert len(cut) == 1 and len(retries) == 1 and retries[0].system_attrs["failed_trial"] == cut[0].number
    assert retries[0].params == cut[0].params and retries[0].state == TrialState.COMPLETE
    assert yaml.safe_load((sweep / "best_params.yaml").read_text())["best_value"] == pytest.approx(study.best_value)


@shared_search
def test_final_training_uses_the_best_params_and_wise_ft_grid(searched, tmp_path, monkeypatch):
    """In-process (the command line's main is run by tests/test_ddp.py): the searched lr, weight decay and
    loss weights reach the optimizer and the objective of the final run."""
    import autoft.finetune as ft
    from autoft.best_params import load_best_params
    from autoft.final import final_train

    best = yaml.safe_load((searched / "best_params.yaml").read_text())["best_params"]
    params = load_best_params(str(searched / "best_params.yaml"))
    assert params == best
    seen: dict = {}

    class Spy(ft.FineTuner):
        def on_train_start(self) -> None:
            group = self.trainer.optimizers[0].param_groups[0]
            seen.update(lr=group["initial_lr"], weight_decay=group["weight_decay"],
                        weights=dict(self.objective.weights))

    monkeypatch.setattr(ft, "FineTuner", Spy)
    out = tmp_path / "final"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("final", overrides=[*overrides(), "trainer.max_epochs=2", "trainer.max_steps=-1",
                                          "optim.warmup_steps=2", "logger=csv", f"output_dir={out}"])
    assert cfg.optim.schedule == "cosine" and cfg.optim.lr != best["optim.lr"]
    final = final_train(cfg, params, out)
    assert seen["lr"] == best["optim.lr"] and seen["weight_decay"] == best["optim.weight_decay"]
    searched_terms = {k.rsplit(".", 1)[1]: v for k, v in best.items() if k.startswith("objective.weights.")}
    assert {k: seen["weights"][k] for k in searched_terms} == searched_terms
    assert json.loads((out / "final.json").read_text())["params"] == best
    assert [w["alpha"] for w in final["wise"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert final["wise"][-1]["ood"] == pytest.approx(final["results"]["test_ood/F1-macro_all"])
    assert Path(final["best_checkpoint"]).is_file() and (out / "finetuned.pt").is_file()
    metrics = (next(out.glob("csv/version_*/metrics.csv"))).read_text()
    assert "val_id/F1-macro_all" in metrics


def test_final_rejects_a_missing_best_file(tmp_path):
    proc = forkserver.run([sys.executable, "-m", "autoft.final", "best=/no/such/best_params.yaml"], cwd=tmp_path,
                          env=_env(), timeout=300)
    assert proc.returncode == 2 and "error: best-params file not found: /no/such/best_params.yaml" in proc.stderr


def test_multi_objective_search_reports_a_pareto_front(tmp_path):
    sweep = tmp_path / "sweep"
    assert _search(sweep, "returns=[val_id,val_ood]", "hydra.sweeper.direction=[maximize,maximize]", n_trials=2) == 0
    front = yaml.safe_load((sweep / "best_params.yaml").read_text())["pareto_front"]
    assert front and all(len(t["values"]) == 2 for t in front)


def test_main_job_end_to_end_writes_the_report(tmp_path, monkeypatch):
    """`make run`'s pipeline on the tiny world: search, final trainings, WiSE-FT, report files. In this process,
    the search it launches too (tests/inprocess.py)."""
    import autoft.methods
    import autoft.pipeline

    out = tmp_path / "main"
    argv = ["--trials", "2", "--epochs", "1", "--out", str(out), "--search-override", "search.inner_steps=4",
            "--search-override", "search.eval_every=2", *overrides(), "logger=csv"]
    monkeypatch.setattr(autoft.methods, "subprocess", subprocess_in_process())
    monkeypatch.chdir(tmp_path)
    assert call_main(autoft.pipeline.main, argv, prog=autoft.pipeline.__file__) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"zero-shot", "fine-tuning (ce)", "FT + WiSE-FT (alpha 0.5)", "AutoFT",
                                      "AutoFT + WiSE-FT (alpha 0.5)"}
    assert report["best"]["trials"] == 2 and "optim.lr" in report["best"]["params"]
    # zero-shot is the alpha-0 end of the plain fine-tuning's WiSE-FT curve
    assert report["results"]["zero-shot"]["ood"] == report["wise"]["FT + WiSE-FT"][0]["ood"]
    for name in ("results.md", "effective_robustness.png", "optimization_history.png"):
        assert (out / name).stat().st_size > 0, name
    assert "AutoFT + WiSE-FT (alpha 0.5)" in (out / "results.md").read_text()
