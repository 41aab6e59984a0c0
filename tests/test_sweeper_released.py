"""A drop-in for the released hydra-optuna-sweeper: its example apps (re-created in tests/sweeper_apps, the sweeper
name the only change) run as its own tests run them, and write ``optimization_results.yaml`` in its shape; its
config keys keep their defaults; max_failure_rate means what it means there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests import forkserver

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "tests" / "sweeper_apps"


def run_app(script: str, sweep_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, str(APPS / script), "--multirun", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    proc = forkserver.run(cmd, cwd=APPS, env=env, timeout=300)  # its own process, forked (tests/forkserver.py)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def results(sweep_dir: Path) -> dict:
    return yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("with_commandline", [False, True])
def test_sphere_example_finds_a_good_point_with_tpe(with_commandline, tmp_path):
    storage, name = f"sqlite:///{tmp_path}/test.db", "test-optuna-example"
    extra = ["x=choice(0, 1, 2)", "y=0"] if with_commandline else []
    run_app("sphere.py", tmp_path / "sweep", "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
            "hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={name}",
            "hydra/sweeper/sampler=tpe", "hydra.sweeper.sampler.seed=123", "~z", *extra)
    best = optuna.load_study(storage=storage, study_name=name).best_trial
    got = results(tmp_path / "sweep")
    assert got == {"name": "optuna", "best_params": best.params, "best_value": best.value}
    assert ("y" in got["best_params"]) != with_commandline  # a fixed y is no param
    assert got["best_value"] <= 2.27  # the released test's bound: TPE's 95th percentile over 1000 seeds


@pytest.mark.parametrize("with_commandline", [False, True])
def test_multi_objective_example_writes_a_pareto_front(with_commandline, tmp_path):
    extra = ["x=range(0, 5)", "y=range(0, 3)"] if with_commandline else []
    run_app("multi-objective.py", tmp_path, "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
            "hydra.sweeper.n_jobs=1", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123", *extra)
    got = results(tmp_path)
    assert got["name"] == "optuna" and got["solutions"]
    steps = {0} if with_commandline else {0, 0.5}
    for a in got["solutions"]:
        assert a["params"]["x"] % 1 in steps and a["params"]["y"] % 1 in steps
        assert not any(dominates(b["values"], a["values"]) for b in got["solutions"])
    if with_commandline:  # range's end is in the space: x reaches 5
        study = optuna.load_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="multi-objective")
        assert study.trials[0].distributions["x"] == optuna.distributions.IntDistribution(0, 5)


def test_multi_objective_example_as_configured_nsgaii(tmp_path):
    run_app("multi-objective.py", tmp_path, "hydra.sweeper.n_trials=8")
    assert results(tmp_path)["solutions"]


def test_motpe_is_tpe_on_several_objectives(tmp_path):
    proc = run_app("multi-objective.py", tmp_path, "--config-dir=test-conf", "--config-name=motpe",
                   "hydra.sweeper.n_trials=6")
    assert "sampler TPESampler" in proc.stdout
    assert results(tmp_path)["solutions"]


def test_custom_search_space_example(tmp_path):
    run_app("custom-search-space-objective.py", tmp_path, "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
            "hydra.sweeper.n_jobs=1", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123",
            "max_z_difference_from_x=0.3")
    best = results(tmp_path)["best_params"]
    assert abs(best["x"] - best["z"]) <= 0.3
    assert 0 <= best["+w"] <= 1  # the name as the function suggested it
    assert (tmp_path / "0" / ".hydra" / "overrides.yaml").read_text().count("+w=") == 1


def test_custom_search_space_may_not_suggest_a_fixed_key(tmp_path):
    proc = run_app("custom-search-space-objective.py", tmp_path, "z=1.0", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: hydra.sweeper.custom_search_space custom-search-space-objective.configure: ValueError: it suggested "
        "['z'], fixed by an override")
    study = optuna.load_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="custom-search-space")
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # nothing left RUNNING


@pytest.mark.parametrize("n_trials", [20, 1])
def test_grid_walks_its_whole_space_then_stops(n_trials, tmp_path):
    run_app("sphere.py", tmp_path, "--config-dir=test-conf", "--config-name=grid", f"hydra.sweeper.n_trials={n_trials}")
    study = optuna.load_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="sphere")
    points = {(t.params["x"], t.params["y"], t.params["z"]) for t in study.trials}
    assert len(study.trials) == len(points) == min(n_trials, 12)  # 2 x 3 x 2, y's range end included
    got = results(tmp_path)
    if n_trials >= 12:
        assert got["best_value"] == 1 and abs(got["best_params"]["x"]) == 1 and got["best_params"]["y"] == 0
    assert got["best_params"]["z"] in ("foo", "bar")


@pytest.mark.parametrize(("max_failure_rate", "n_jobs"), [(0.5, 2), (1.0, 2), (0.0, 1)])
def test_failure_rate_judges_each_batch(max_failure_rate, n_jobs, tmp_path):
    proc = run_app("sphere.py", tmp_path, "hydra.sweeper.n_trials=6", f"hydra.sweeper.n_jobs={n_jobs}",
                   "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123",
                   f"hydra.sweeper.max_failure_rate={max_failure_rate}", "error=true", check=False)
    study = optuna.load_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="sphere")
    if max_failure_rate < 1.0:  # the first batch fails entirely: the search ends there, with the job's error
        assert proc.returncode == 2 and "RuntimeError: cfg.error is True" in proc.stderr.splitlines()[-1]
        assert len(study.trials) == n_jobs
    else:
        assert proc.returncode == 0 and "RuntimeError: cfg.error is True" not in proc.stderr
        assert len(study.trials) == 6
    assert all(t.state == TrialState.FAIL for t in study.trials)


def test_config_keys_keep_the_released_defaults(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose(overrides=["hydra/sweeper=autoft_optuna"], return_hydra_config=True).hydra.sweeper
    assert cfg.sampler._target_ == "optuna.samplers.TPESampler" and cfg.sampler.seed is None
    assert (cfg.direction, cfg.n_trials, cfg.n_jobs, cfg.max_failure_rate) == ("minimize", 20, 2, 0.0)
    assert cfg.params is None and cfg.custom_search_space is None
    # ours, with defaults that change nothing a released config says
    assert cfg.pruner._target_ == "optuna.pruners.NopPruner"
    assert cfg.pass_trial is False and cfg.failure_rate_min_trials is None and not cfg.enqueue


def test_the_plugin_is_discovered_and_imports_nothing_from_the_app():
    code = ("import sys; from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]; "
            "assert 'AutoftOptunaSweeper' in names, names; assert 'autoft' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=APPS)
