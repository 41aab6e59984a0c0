"""Fault injection: each fault of a long search is injected into real sweeps and counted. A sweep runs in its own
process where the claim is the command's (exit status, one error line, kill -9), else in the test process
(tests/inprocess.py: the same command without a process start).

Faults: exceptions, out-of-memory errors and non-finite losses inside trials, a search where most trials fail,
bad input (invalid search spaces, a study name holding another space, a corrupt storage, a missing data root, an
unknown config name, a corrupt image) and kill -9 at random moments. Counted over the module: faults injected,
searches that finished, trials lost (must be 0) and files corrupted (must be 0); printed at the end (``pytest -s``)
and written to ``fault_counts.json`` in pytest's base temp dir.

Most sweeps run a fast fake task through the project's sweeper; the real fine-tuning app runs where it is what is
tested (a non-finite loss, data errors). ``AUTOFT_FAULTS_REAL=1`` runs the kill -9 rounds on the real app too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hydra_plugins.autoft_optuna_sweeper._study import WORKER_ATTR
from tests import forkserver
from tests.conftest import FAKE_APP_HYDRA, overrides, trial_states
from tests.inprocess import run_module, run_script

ROOT = Path(__file__).resolve().parents[1]
COUNTS: Counter[str] = Counter()
KILLS: list[dict] = []

CONFIG = """\
x: 0.0
y: 0.0
fault: none
sleep: 0.0
marks: ''
""" + FAKE_APP_HYDRA

# A fast stand-in for a fine-tuning job: the faults are raised where a real job would raise them.
APP = """\
import os
import time

import hydra
from omegaconf import OmegaConf


@hydra.main(version_base=None, config_path=".", config_name="config")
def main(cfg):
    if cfg.marks:  # one file per run of a trial: a trial run twice would fail here, and be counted
        trial_id = OmegaConf.select(cfg, "optuna_trial.trial_id")
        with open(os.path.join(cfg.marks, str(trial_id)), "x") as f:
            f.write(f"{os.getpid()}\\n")
    time.sleep(cfg.sleep)
    if cfg.fault == "mixed" and cfg.x > 2:
        raise RuntimeError("boom")
    if cfg.fault == "mixed" and cfg.x < -2:
        raise MemoryError("out of memory (injected)")
    if cfg.fault == "always":
        raise RuntimeError("always broken")
    if cfg.fault == "bad_input":
        from autoft import UserError

        raise UserError("data folder /nowhere does not exist")
    return -((cfg.x - 2) ** 2) - (cfg.y - 1) ** 2


if __name__ == "__main__":
    main()
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "HYDRA_FULL_ERROR": "0"}


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fault-app")
    (path / "config.yaml").write_text(CONFIG)
    (path / "my_app.py").write_text(APP)
    return path


def app_cmd(app: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(app / "my_app.py"), "-m", "hydra/sweeper=autoft_optuna",
            f"hydra.sweep.dir='{sweep_dir}'", *extra]


def real_cmd(sweep_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autoft.finetune", "-m", "search=embedded", "search.inner_steps=3",
            "search.eval_every=3", "logger=csv", *overrides(), f"hydra.sweep.dir={sweep_dir}", *extra]


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The command in its own process, forked by the worker's fork server (tests/forkserver.py)."""
    return forkserver.run(cmd, cwd=cwd, env=env(), timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2, alone: bool = True) -> str:
    """The command failed with exit ``code`` and one line 'error: ...', last on stderr and no traceback; with
    ``alone`` the only line there (jobs that ran may print library warnings before it)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and lines and lines[-1].startswith("error: "), (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and (len(lines) == 1 or not alone), proc.stderr[-3000:]
    return lines[-1]


def load(sweep_dir: Path, name: str = "autoft") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db")


def counted(study: optuna.Study) -> int:
    """Trials that used the budget, as the sweeper counts them."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and "error" in t.user_attrs) for t in study.trials)


def lost(study: optuna.Study, n_trials: int | None = None) -> int:
    """Trials left unfinished (RUNNING or WAITING), plus budget missing or overshot when n_trials is given."""
    unfinished = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in study.trials)
    return unfinished + (abs(counted(study) - n_trials) if n_trials is not None else 0)


def corrupted(sweep_dir: Path) -> list[str]:
    """The files the search writes that do not parse (or do not hold what they should)."""
    bad = []
    for path in sweep_dir.rglob("*"):
        try:
            if path.name == "best_params.yaml":
                data = yaml.safe_load(path.read_text())
                assert isinstance(data, dict) and ({"best_params", "pareto_front"} & set(data))
            elif path.name == "trials.csv":
                with open(path) as f:
                    rows = list(csv.DictReader(f))
                assert rows and {"number", "state"} <= set(rows[0])
            elif path.name == "multirun.yaml":
                assert isinstance(yaml.safe_load(path.read_text()), dict)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:
            bad.append(str(path.relative_to(sweep_dir)))
    return bad


def account(sweep_dir: Path, study: optuna.Study, n_trials: int | None, finished: bool) -> None:
    """Add one search to the module's counts, and require nothing lost or corrupted."""
    n_lost, bad = lost(study, n_trials), corrupted(sweep_dir)
    COUNTS["searches"] += 1
    COUNTS["searches_finished"] += finished
    COUNTS["trials_lost"] += n_lost
    COUNTS["files_corrupted"] += len(bad)
    assert n_lost == 0, [(t.number, t.state.name) for t in study.trials]
    assert not bad, bad


def digests(folder: Path) -> dict[str, str]:
    """Every file's hash, but the sweeper's empty lock file (creating it overwrites nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "optuna.db.lock"}


@pytest.fixture(scope="module", autouse=True)
def fault_counts(tmp_path_factory):
    yield COUNTS
    summary = {k: COUNTS[k] for k in ("faults_injected", "searches", "searches_finished", "trials_lost",
                                      "files_corrupted")}
    summary["by_fault"] = {k.removeprefix("fault:"): v for k, v in sorted(COUNTS.items()) if k.startswith("fault:")}
    summary["kill_9_rounds"] = KILLS
    out = tmp_path_factory.getbasetemp() / "fault_counts.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"\nfault injection counts ({out}):\n{json.dumps(summary, indent=1)}")


def injected(kind: str, n: int = 1) -> None:
    COUNTS["faults_injected"] += n
    COUNTS[f"fault:{kind}"] += n


def run_here(cmd: list[str]) -> None:
    """``app_cmd``'s command, run to success in this process (tests/inprocess.py): for sweeps whose claim is what
    they record, not their process (a process start, ~2.5 s, was most of a small fake sweep's time)."""
    assert cmd[0] == sys.executable and run_script(Path(cmd[1]), cmd[2:]) == 0


@pytest.fixture(scope="module")
def finished_sweep(app, tmp_path_factory) -> Path:
    """A finished 4-trial search whose files the bad-input tests must leave exactly as they are."""
    sweep_dir = tmp_path_factory.mktemp("finished") / "sweep"
    run_here(app_cmd(app, sweep_dir, "hydra.sweeper.n_trials=4"))
    return sweep_dir


# the bad-input tests against the finished search share a worker (make test: --dist loadgroup), so it runs once
against_finished = pytest.mark.xdist_group("finished-sweep")


def test_exceptions_and_oom_fail_their_trials_and_the_search_goes_on(app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_here(app_cmd(app, sweep_dir, "fault=mixed", "hydra.sweeper.n_trials=10", "hydra/sweeper/sampler=random",
                     "hydra.sweeper.max_failure_rate=1.0"))
    study = load(sweep_dir)
    errors = Counter(t.user_attrs.get("error") for t in study.trials if t.state == TrialState.FAIL)
    assert errors["RuntimeError: boom"] >= 1 and errors["MemoryError: out of memory (injected)"] >= 1, errors
    assert set(errors) == {"RuntimeError: boom", "MemoryError: out of memory (injected)"}
    for t in study.trials:  # every trial is where its params put it
        assert (t.state == TrialState.FAIL) == (abs(t.params["x"]) > 2)
    assert len(study.trials) == 10 and counted(study) == 10
    injected("exception", errors["RuntimeError: boom"])
    injected("out_of_memory", errors["MemoryError: out of memory (injected)"])
    account(sweep_dir, study, 10, finished=True)


def test_non_finite_loss_prunes_the_trial_with_its_reason(tmp_path):
    """The real inner loop: lr 1e30 makes the loss non-finite; FineTuner raises, the sweeper prunes the trial."""
    sweep_dir = tmp_path / "sweep"
    # the search in this process (tests/inprocess.py: the same command without ~12 s of imports); the resumed one
    # below, whose claim is the command's exit status and error line, in its own
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert run_module(real_cmd(sweep_dir, "hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=random",
                                   "optim.lr=choice(1e-4,1e30)")).returncode == 0
    study = load(sweep_dir, "autoft-embedded-seed0")
    diverged = [t for t in study.trials if t.params["optim.lr"] == 1e30]
    assert diverged and len(diverged) < 4  # random sampler seed 0 draws both
    for t in study.trials:
        if t.params["optim.lr"] == 1e30:
            assert t.state == TrialState.PRUNED
            assert t.user_attrs["error"].startswith("diverged: FloatingPointError: non-finite loss")
        else:
            assert t.state == TrialState.COMPLETE and "error" not in t.user_attrs
    best = yaml.safe_load((sweep_dir / "best_params.yaml").read_text())
    assert best["best_params"]["optim.lr"] == 1e-4
    injected("non_finite_loss", len(diverged))
    account(sweep_dir, study, 4, finished=True)

    # The same search resumed with a data root that does not exist: one line, exit 2, reports untouched.
    before = digests(sweep_dir)
    missing = tmp_path / "no-such-root"
    proc = run(real_cmd(sweep_dir, "hydra.sweeper.n_trials=6", "hydra/sweeper/sampler=random",
                        "optim.lr=choice(1e-4,1e30)", f"dataset.root={missing}"), tmp_path)
    line = one_error_line(proc, alone=False)
    assert line.startswith("error: trial #4: ") and str(missing) in line
    after = digests(sweep_dir)
    for name in ("best_params.yaml", "trials.csv", "multirun.yaml"):
        assert after[name] == before[name], name
    study = load(sweep_dir, "autoft-embedded-seed0")
    assert study.trials[-1].state == TrialState.FAIL and "aborted" in study.trials[-1].user_attrs
    assert counted(study) == 4  # the aborted trial is not counted: a fixed re-run runs 2 more
    injected("missing_data_root")
    account(sweep_dir, study, 4, finished=False)


def test_too_many_failures_end_the_search_with_one_line(app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run(app_cmd(app, sweep_dir, "fault=always", "hydra.sweeper.n_trials=20",
                       "hydra.sweeper.failure_rate_min_trials=3"), app)
    line = one_error_line(proc)
    assert "3 of the 3 trials of this run failed" in line and "always broken" in line
    study = load(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    assert (sweep_dir / "trials.csv").is_file()  # the report still says what happened
    injected("failure_rate", 3)
    account(sweep_dir, study, 3, finished=False)


def test_bad_input_in_a_job_ends_the_search_at_once(app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    line = one_error_line(run(app_cmd(app, sweep_dir, "fault=bad_input", "hydra.sweeper.n_trials=5"), app))
    assert line == "error: trial #0: data folder /nowhere does not exist"
    study = load(sweep_dir)
    assert len(study.trials) == 1 and study.trials[0].user_attrs["aborted"].startswith("UserError")
    assert not (sweep_dir / "multirun.yaml").exists() and not (sweep_dir / "best_params.yaml").exists()
    injected("user_error_in_job")
    account(sweep_dir, study, 0, finished=False)


@against_finished
@pytest.mark.parametrize(
    "space",  # on the command line, or in the config's hydra.sweeper.params (as conf/search/*.yaml have them)
    ["x=interval(1,0)", "x=tag(log,interval(0,1))", "x=range(5,1)",
     "hydra.sweeper.params.x='choice()'", "hydra.sweeper.params.y='tag(log, interval(-1, 1))'"],
)
def test_invalid_search_space_is_refused_and_nothing_is_touched(app, finished_sweep, space):
    before = digests(finished_sweep)
    line = one_error_line(run(app_cmd(app, finished_sweep, "hydra.sweeper.n_trials=8", space), app))
    assert line.startswith(f"error: invalid search space for '{space.split('=')[0].rsplit('.')[-1]}': ")
    assert digests(finished_sweep) == before
    injected("invalid_search_space")


@against_finished
@pytest.mark.parametrize(
    ("extra", "message"),
    [(["+z=choice(a,b)"], "holds another search space (+z not searched before)"),
     (["x=interval(0,1)"], "holds another search space (x float[-5.0, 5.0] now float[0.0, 1.0])"),
     (["hydra.sweeper.direction=minimize"], "was created to ['maximize'], not ['minimize']")],
)
def test_study_holding_another_space_is_refused(app, finished_sweep, extra, message):
    before = digests(finished_sweep)
    line = one_error_line(run(app_cmd(app, finished_sweep, "hydra.sweeper.n_trials=8", *extra), app))
    assert line.startswith(f"error: study 'autoft' in sqlite:///{finished_sweep}/optuna.db {message}")
    assert digests(finished_sweep) == before
    injected("study_name_clash")


def test_corrupt_or_unreachable_storage_is_one_line(app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "optuna.db").write_bytes(b"this is not a database" * 100)
    before = digests(sweep_dir)
    line = one_error_line(run(app_cmd(app, sweep_dir, "hydra.sweeper.n_trials=2"), app))
    assert line.startswith(f"error: hydra.sweeper.storage: cannot open sqlite:///{sweep_dir}/optuna.db: ")
    assert digests(sweep_dir) == before
    injected("corrupt_storage")
    pytest.importorskip("psycopg2")
    line = one_error_line(run(app_cmd(app, tmp_path / "pg", "hydra.sweeper.storage='postgresql://u:secret@127.0.0.1:1/x'"),
                              app))
    assert line.startswith("error: hydra.sweeper.storage: cannot open postgresql://u:***@127.0.0.1:1/x: ")
    assert "secret" not in line and not (tmp_path / "pg" / "multirun.yaml").exists()
    injected("unreachable_storage")


def test_unknown_config_names_are_hydra_one_liners(tmp_path):
    """Hydra's own error for a mistyped group option: its first line names it, exit 1, nothing written."""
    for args in (["-m", "search=embedded", "dataset=nope", f"hydra.sweep.dir={tmp_path / 's'}"],
                 ["objective=nope", f"hydra.run.dir={tmp_path / 'r'}"]):
        proc = run([sys.executable, "-m", "autoft.finetune", *args], tmp_path)
        assert proc.returncode == 1 and proc.stderr.startswith("In 'finetune': Could not find"), proc.stderr
        injected("unknown_name")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def corrupt_world(tiny_world, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the tiny world with one training image (read by every trial: search trials skip ID validation)
    overwritten by noise."""
    root = tmp_path_factory.mktemp("corrupt-world")
    shutil.copytree(tiny_world[1], root, dirs_exist_ok=True)
    image = root / "iwildcam_v2.0" / "train" / "train_00000.png"
    image.write_bytes(os.urandom(200))
    return root, image.name


def test_corrupt_image_fails_the_search_with_one_line(corrupt_world, tmp_path):
    root, image = corrupt_world
    sweep_dir = tmp_path / "sweep"
    proc = run(real_cmd(sweep_dir, "hydra.sweeper.n_trials=3", f"dataset.root={root}",
                        "hydra.sweeper.failure_rate_min_trials=1"), tmp_path)
    assert image in one_error_line(proc, alone=False)
    study = load(sweep_dir, "autoft-embedded-seed0")
    assert len(study.trials) == 1 and study.trials[0].state == TrialState.FAIL
    injected("corrupt_image")
    account(sweep_dir, study, None, finished=False)


def test_corrupt_image_in_a_single_run_is_one_line(corrupt_world, tmp_path):
    root, image = corrupt_world
    proc = run([sys.executable, "-m", "autoft.finetune", "logger=csv", *overrides(), f"dataset.root={root}",
                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0 and image in proc.stderr
    assert image in one_error_line(proc, alone=False)


def _running_launched(db: Path) -> int:
    """RUNNING trials with a heartbeat that the sweeper handed to a worker (its ``worker`` user attr), read after the
    process is gone."""
    with sqlite3.connect(f"file:{db}?mode=rw", uri=True) as con:
        return con.execute(
            "SELECT COUNT(*) FROM trials t WHERE t.state = 'RUNNING' "
            "AND EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id) "
            "AND EXISTS (SELECT 1 FROM trial_user_attributes u WHERE u.trial_id = t.trial_id AND u.key = ?)",
            (WORKER_ATTR,)).fetchone()[0]


@pytest.mark.long(36)
def test_kill_9_at_random_moments_then_resume_to_exactly_n_trials(app, tmp_path):
    """5 rounds: start a search, kill -9 it at a random moment (seeded) once it runs trials (in a job, between
    jobs, while it writes), run the same command again: the study ends with exactly n_trials finished, nothing
    RUNNING, a valid report, and each trial the kill cut short while it ran (RUNNING with a heartbeat and handed to a
    worker) run again. A trial killed between its first heartbeat and its worker mark was never launched: the resumed
    sweeper fails it as an orphan, uncounted, and does not run it again."""
    real = os.environ.get("AUTOFT_FAULTS_REAL") == "1"
    n_trials, rng = (3 if real else 8), random.Random(17)
    rounds = []
    for round_ in range(5):
        sweep_dir = tmp_path / f"round{round_}"
        extra = [f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.heartbeat_interval=1",
                 "hydra.sweeper.grace_period=2"]
        # the real app: 60 steps a trial (seconds; the 4 of overrides() are over in a blink)
        cmd = real_cmd(sweep_dir, *extra, "trainer.max_steps=60") if real else app_cmd(app, sweep_dir, "sleep=0.25",
                                                                                      *extra)
        proc = forkserver.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tic = time.perf_counter()
        if real:  # a running trial, the first, second or third, at a random moment of its first second
            nth = rng.randrange(n_trials)
            while proc.poll() is None and not (
                    (states := trial_states(sweep_dir / "optuna.db")).count("RUNNING+beat")
                    and sum(s.startswith("COMPLETE") for s in states) >= nth):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # start-up done (the first trial runs), then any moment up to about when the search would be done
            while not trial_states(sweep_dir / "optuna.db") and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, n_trials * 0.3))
        moment = time.perf_counter() - tic
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        states = trial_states(sweep_dir / "optuna.db", exited=True)  # the process is gone: what the kill left
        launched = _running_launched(sweep_dir / "optuna.db")
        injected("kill_9")
        tic = time.perf_counter()
        ok(run(cmd, tmp_path))
        name = "autoft-embedded-seed0" if real else "autoft"
        study = load(sweep_dir, name)
        finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        report = yaml.safe_load((sweep_dir / "best_params.yaml").read_text())
        assert len(finished) == n_trials and report["best_value"] == study.best_value
        retried = sum("failed_trial" in t.system_attrs for t in study.trials)
        assert retried == launched and launched <= states.count("RUNNING+beat"), (states, launched, retried)
        rounds.append({"killed_after_s": round(moment, 2), "states_at_kill": dict(Counter(states)),
                       "finished": len(finished), "retried": retried,
                       "resume_s": round(time.perf_counter() - tic, 1),
                       # a write cut short leaves its temporary file, never a half-written report
                       "tmp_files_left": len(list(sweep_dir.rglob(".*.tmp")))})
        KILLS.append(rounds[-1])
        account(sweep_dir, study, n_trials, finished=True)
    assert any(r["retried"] for r in rounds), rounds  # some kill did land in a running trial


HOT_JOURNAL_WRITER = """
import os, signal, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.execute("PRAGMA cache_size=5")  # spill pages to the file mid-transaction: the journal becomes hot
con.execute("CREATE TABLE trials (trial_id INTEGER PRIMARY KEY, state TEXT)")
con.execute("CREATE TABLE trial_heartbeats (trial_id INTEGER)")
con.execute("INSERT INTO trials VALUES (0, 'COMPLETE'), (1, 'RUNNING')")
con.execute("INSERT INTO trial_heartbeats VALUES (1)")
con.commit()
con.execute("BEGIN")
con.executemany("INSERT INTO trials (state) VALUES (?)", [("RUNNING",)] * 20000)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_states_after_a_kill_during_a_write_are_read_through_the_hot_journal(tmp_path):
    """The kill tests' reading of what a kill -9 left: a write cut short leaves a hot journal, and the states read
    are those committed before it (read-only, SQLite would refuse, and the kill test once read that as no trials)."""
    db = tmp_path / "optuna.db"
    proc = subprocess.run([sys.executable, "-c", HOT_JOURNAL_WRITER, str(db)])
    assert proc.returncode == -signal.SIGKILL and (tmp_path / "optuna.db-journal").exists()
    assert trial_states(db, exited=True) == ["COMPLETE", "RUNNING+beat"]
