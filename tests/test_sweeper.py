"""The autoft_optuna Hydra sweeper: real sweeps of a tiny app (the syntax: test_sweeper_space). The app's command runs
in this process (tests/inprocess.py) unless the claim is the process's: its exit status, launchers that start their
own processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from hydra_plugins.autoft_optuna_sweeper import trial_from_config
from tests import forkserver
from tests.conftest import FAKE_APP_HYDRA
from tests.inprocess import run_script

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
x: 0.0
y: 0.0
mode: quad
""" + FAKE_APP_HYDRA

APP = """\
import os
import time

import hydra
import optuna

from hydra_plugins.autoft_optuna_sweeper import trial_from_config


@hydra.main(version_base=None, config_path=".", config_name="config")
def main(cfg):
    value = -((cfg.x - 2) ** 2) - (cfg.y - 1) ** 2
    if cfg.get("record_pid"):  # which process ran the job, and when
        trial_from_config(cfg).set_user_attr("pid", os.getpid())
        time.sleep(1.0)
    if not isinstance(cfg.get("act", ""), str):  # a string choice must reach the job as a string
        raise TypeError(f"act={cfg.act!r}")
    if cfg.mode == "fail" and cfg.x > 0:
        raise RuntimeError("boom")
    if cfg.mode == "multi":
        return [-((cfg.x - 2) ** 2), -((cfg.y - 1) ** 2)]
    if cfg.mode == "prune":
        trial = trial_from_config(cfg)
        for step in range(3):
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return value


if __name__ == "__main__":
    main()
"""

QUICK = ["hydra.sweeper.sampler.n_startup_trials=3"]  # TPE after 3 random trials: exercise TPE itself
# Command-line sweeps join the config's space; a fixed override passes through.
EXTRA = ["y=choice(0.5,1.0)", "+act=choice(relu,'1')", "+lr=tag(log,interval(1e-5,1e-3))", "mode=quad"]


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("app")
    (path / "config.yaml").write_text(CONFIG)
    (path / "my_app.py").write_text(APP)
    return path


def sweep_cli(app: Path, sweep_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """The app's sweep as a command, in its own process: for exit statuses and launchers that start processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "my_app.py", *_argv(sweep_dir, overrides)]
    proc = forkserver.run(cmd, cwd=app, env=env, timeout=120)  # its own process, forked (tests/forkserver.py)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def sweep(app: Path, sweep_dir: Path, *overrides: str) -> None:
    """The same command run in this process (tests/inprocess.py): what the sweep records is the claim, and a process
    start (~2.5 s of imports and plugin discovery) was most of a small sweep's time."""
    assert run_script(app / "my_app.py", _argv(sweep_dir, overrides)) == 0


def _argv(sweep_dir: Path, overrides: tuple[str, ...]) -> list[str]:
    return ["-m", "hydra/sweeper=autoft_optuna", f"hydra.sweep.dir='{sweep_dir}'", *overrides]


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="autoft", storage=f"sqlite:///{sweep_dir}/optuna.db")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.is_finished()]


# the tests that read the basic sweep share a worker (make test: --dist loadgroup), so it runs once
uses_basic = pytest.mark.xdist_group("sweeper-basic")


@pytest.fixture(scope="module")
def basic(app, tmp_path_factory) -> Path:
    """One 6-trial sweep with command-line params, shared by the tests that only read it."""
    sweep_dir = tmp_path_factory.mktemp("basic") / "sweep"
    sweep(app, sweep_dir, "hydra.sweeper.n_trials=6", *QUICK, *EXTRA)
    return sweep_dir


def test_cli_bad_space_exits_nonzero_and_writes_nothing(app, tmp_path):
    proc = sweep_cli(app, tmp_path / "sweep", "x=interval(1,0)", check=False)
    assert proc.returncode != 0
    assert "invalid search space for 'x'" in proc.stderr
    assert not (tmp_path / "sweep" / "optuna.db").exists()


@uses_basic
def test_sweep_records_n_trials_and_the_best(basic):
    study = load(basic)
    trials = finished(study)
    assert len(trials) == len(study.trials) == 6
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:  # command-line sweeps join the space; jobs got the sampled floats exactly
        assert set(t.params) == {"x", "y", "+act", "+lr"}  # names keep their + (the jobs got +act=...)
        assert t.distributions["y"] == CategoricalDistribution([0.5, 1.0])
        assert t.distributions["+lr"] == FloatDistribution(1e-5, 1e-3, log=True)
        assert t.value == -((t.params["x"] - 2) ** 2) - (t.params["y"] - 1) ** 2
    best = yaml.safe_load((basic / "best_params.yaml").read_text())
    assert best["best_trial"] == study.best_trial.number
    assert best["best_value"] == study.best_value
    assert best["best_params"] == study.best_params
    released = yaml.safe_load((basic / "optimization_results.yaml").read_text())
    assert released == {"name": "optuna", "best_params": study.best_params, "best_value": study.best_value}
    with open(basic / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


@uses_basic
def test_same_seed_same_params_other_seed_other_params(app, basic, tmp_path):
    sweep(app, tmp_path / "same", "hydra.sweeper.n_trials=6", *QUICK, *EXTRA)
    sweep(app, tmp_path / "other", "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.seed=1", *QUICK, *EXTRA)
    params = [[t.params for t in load(d).trials] for d in (basic, tmp_path / "same", tmp_path / "other")]
    assert params[0] == params[1]
    assert params[0] != params[2]


def test_rerun_finishes_the_same_study(app, tmp_path):
    sweep(app, tmp_path, "hydra.sweeper.n_trials=3")
    sweep(app, tmp_path, "hydra.sweeper.n_trials=5")
    trials = load(tmp_path).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({(t.params["x"], t.params["y"]) for t in trials}) == 5  # the resumed sampler does not replay


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage")
def test_trial_left_running_by_a_dead_process_is_failed_and_retried(app, tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="autoft", direction="maximize")
    space = {"x": FloatDistribution(-5.0, 5.0), "y": FloatDistribution(-5.0, 5.0)}
    dead = study.ask(space)
    storage.record_heartbeat(dead._trial_id)  # it ran for a while, then its process died
    time.sleep(2.5)  # past the grace period (SQLite timestamps have 1 s resolution)
    sweep(app, tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweeper.grace_period=1")
    trials = load(tmp_path).trials
    assert trials[0].state == TrialState.FAIL and "error" not in trials[0].user_attrs
    assert trials[1].params == dead.params and trials[1].system_attrs["failed_trial"] == 0
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 3


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage")
def test_trial_asked_by_a_sweeper_killed_before_it_named_itself_is_failed_at_once(app, tmp_path):
    """Under the study's lock nobody else can be between its ask and its name: such a trial is an orphan, failed
    at the first look even though its heartbeat is fresh, and a resumed search quicker than the grace period ends
    with nothing RUNNING."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=60)
    study = optuna.create_study(storage=storage, study_name="autoft", direction="maximize")
    dead = study.ask({"x": FloatDistribution(-5.0, 5.0), "y": FloatDistribution(-5.0, 5.0)})
    storage.record_heartbeat(dead._trial_id)  # its sweeper beat, then died before naming itself the trial's worker
    sweep(app, tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.heartbeat_interval=1",
          "hydra.sweeper.grace_period=60")
    trials = load(tmp_path).trials
    assert trials[0].state == TrialState.FAIL and "orphaned" in trials[0].user_attrs
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2  # not run again: it never ran
    assert not any("failed_trial" in t.system_attrs for t in trials)


def test_jobs_prune_through_the_storage(app, tmp_path):
    pruner = ["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2"]
    sweep(app, tmp_path, "mode=prune", "hydra.sweeper.n_trials=6", *pruner)
    study = load(tmp_path)
    states = [t.state for t in study.trials]
    assert len(states) == 6 and TrialState.PRUNED in states and TrialState.RUNNING not in states

    # This test process is not the sweeper: the trial and its median pruner come from the config keys alone.
    running = study.ask()
    keys = {"storage": f"sqlite:///{tmp_path}/optuna.db", "study_name": "autoft", "trial_id": running._trial_id}
    trial = trial_from_config(OmegaConf.create({"x": 1.0, "optuna_trial": keys}))
    assert trial is not None and trial.number == running.number
    trial.report(-1e9, 0)
    assert trial.should_prune()
    assert trial_from_config(OmegaConf.create({"x": 1.0})) is None


def test_a_job_in_the_sweepers_process_takes_the_sweepers_trial_without_the_storage(app, tmp_path, monkeypatch):
    """Hydra's basic launcher runs each job in the sweeper's process: its trial is the one the sweeper asked (no
    storage queries), so with the jobs' storage path broken the sweep still reports and prunes."""
    from hydra_plugins.autoft_optuna_sweeper import _study

    def no_storage(url):
        raise AssertionError(f"a job in the sweeper's process opened the storage {url}")

    monkeypatch.setattr(_study, "_job_storage", no_storage)
    pruner = ["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2"]
    sweep(app, tmp_path, "mode=prune", "hydra.sweeper.n_trials=6", *pruner)
    trials = load(tmp_path).trials
    assert [t.state for t in trials].count(TrialState.PRUNED) >= 1 and all(t.intermediate_values for t in trials)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert _study._RUNNING_HERE == {}  # the batch's trials are forgotten once it is launched


def test_failing_job_fails_its_trial_and_the_sweep_goes_on(app, tmp_path):
    sweep(app, tmp_path, "mode=fail", "hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=random")
    trials = load(tmp_path).trials
    assert len(trials) == 4
    for t in trials:
        if t.params["x"] > 0:
            assert t.state == TrialState.FAIL and t.user_attrs["error"] == "RuntimeError: boom"
        else:
            assert t.state == TrialState.COMPLETE
    assert any(t.state == TrialState.FAIL for t in trials) and any(t.state == TrialState.COMPLETE for t in trials)


def test_multi_objective_writes_the_pareto_front(app, tmp_path):
    sweep(app, tmp_path, "mode=multi", "hydra.sweeper.direction=[maximize,maximize]", "hydra.sweeper.n_trials=4")
    study = load(tmp_path)
    assert len(finished(study)) == 4
    front = yaml.safe_load((tmp_path / "best_params.yaml").read_text())["pareto_front"]
    assert front == [{"trial": t.number, "values": t.values, "params": t.params} for t in study.best_trials]
    released = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert released == {"name": "optuna", "solutions": [{"params": t.params, "values": t.values}
                                                         for t in study.best_trials]}


@uses_basic
def test_warm_start_and_enqueue_come_first(app, basic, tmp_path):
    source = load(basic)
    top = sorted(source.trials, key=lambda t: t.value, reverse=True)[:2]
    sweep(
        app,
        tmp_path,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.enqueue=[{x:1.0,y:1.5}]",
        f"hydra.sweeper.warm_start.storage='sqlite:///{basic}/optuna.db'",
        "hydra.sweeper.warm_start.top_k=2",
    )
    trials = load(tmp_path).trials
    assert trials[0].params == {"x": 1.0, "y": 1.5}
    # only params of this space come over (the source also searched act and lr)
    assert [t.params for t in trials[1:3]] == [{"x": t.params["x"], "y": t.params["y"]} for t in top]
    assert len(finished(load(tmp_path))) == 4


def test_joblib_launcher_runs_each_batch_in_parallel_processes(app, tmp_path):
    """hydra/launcher=parallel (conf/hydra/launcher/parallel.yaml: the joblib launcher, n_jobs from the sweeper)."""
    sweep_cli(app, tmp_path, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", f"hydra.searchpath=[file://{ROOT}/conf]",
          "hydra/launcher=parallel", "+record_pid=true")
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    sweeper_pid = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    job_pids = {str(t.user_attrs["pid"]) for t in trials}
    assert len(sweeper_pid) == 1 and not job_pids & sweeper_pid  # the jobs ran in the pool's processes
    assert all((tmp_path / str(t.number) / ".hydra" / "overrides.yaml").is_file() for t in trials)


def test_submitit_local_launcher_runs_trials(app, tmp_path):
    """The submitit launcher (the SLURM launcher's local twin: same pickling, job dirs and JobReturns): one job
    returns its value, the other raises (x > 0 fails in mode=fail); each outcome reaches its own trial."""
    sweep_cli(app, tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=submitit_local",
          "mode=fail", "hydra.sweeper.enqueue=[{x:-1.0,y:0.5},{x:3.0,y:2.0}]")
    trials = load(tmp_path).trials
    assert [(t.params["x"], t.state) for t in trials] == [(-1.0, TrialState.COMPLETE), (3.0, TrialState.FAIL)]
    assert trials[0].value == -((-1.0 - 2) ** 2) - (0.5 - 1) ** 2
    assert trials[1].user_attrs["error"] == "RuntimeError: boom"


@pytest.mark.parametrize(
    ("launcher", "target", "parallel_key"),
    [("slurm", "submitit_launcher.SlurmLauncher", "array_parallelism"), ("parallel", "joblib_launcher.JoblibLauncher",
                                                                         "n_jobs")],
)
def test_launcher_configs_compose_and_instantiate(launcher, target, parallel_key):
    """SLURM cannot run here: its config must compose with the search and build the launcher, sized by n_jobs."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=["search=embedded", f"hydra/launcher={launcher}", "hydra.sweeper.n_jobs=8"],
                      return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith(target)
        assert cfg.hydra.launcher[parallel_key] == 8
        assert type(instantiate(cfg.hydra.launcher)).__name__ == target.rsplit(".", 1)[1]


@pytest.mark.parametrize("search", ["autoft", "embedded"])
def test_project_search_configs_resolve_before_hydra_sets_its_config(search):
    """Hydra builds the sweeper, and the sweeper reads the sweep dir, before HydraConfig is set (multirun sets it
    per job): those keys cannot use the ${hydra:...} resolver, which crashed search=autoft at its start."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[f"search={search}"], return_hydra_config=True)
    HydraConfig.instance().cfg = None
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["study_name"] == ("autoft-embedded-tiny_clip" if search == "autoft" else "autoft-embedded-seed0")
    assert str(cfg.hydra.sweep.dir).startswith("outputs/search/embedded-")
