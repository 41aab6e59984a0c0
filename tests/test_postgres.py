"""Many workers, one study: separate sweeper processes running the same search against one PostgreSQL database
(and, on one machine, one SQLite file) share it without duplicated, lost or surplus trials.

The server: ``AUTOFT_TEST_POSTGRES`` (a SQLAlchemy URL) if set; otherwise a throwaway server started here from
``initdb``/``pg_ctl`` (on PATH or in /usr/lib/postgresql/*/bin) on a free loopback port. ``.ci/run`` installs the
binaries on a clean machine. Skipped, saying why, only when there are no PostgreSQL binaries (or no psycopg2).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests import forkserver
from tests.test_faults import app, app_cmd, corrupted, env  # noqa: F401  (app is a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(user: str | None, *cmd: str) -> list[str]:
    """initdb and postgres refuse to run as root: run them as an unprivileged user."""
    if user is None:
        return list(cmd)
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *cmd]
    return ["su", user, "-s", "/bin/sh", "-c", " ".join(cmd)]


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A SQLAlchemy URL of a PostgreSQL database the tests may create studies in."""
    pytest.importorskip("psycopg2", reason="psycopg2 not installed: pip install 'autoft[postgres]'")
    url = os.environ.get("AUTOFT_TEST_POSTGRES")
    if url:
        yield url
        return
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL: set AUTOFT_TEST_POSTGRES=<SQLAlchemy URL> or install postgresql (initdb, pg_ctl)")
    user = None
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        assert user is not None, "running as root and no 'postgres' or 'nobody' user to run the server as"
    base = Path(tempfile.mkdtemp(prefix="autoft-pg-"))  # not pytest's tmp dir: the server's user must reach it
    data, port = base / "data", _free_port()
    if user is not None:
        shutil.chown(base, user)
    base.chmod(0o700)
    subprocess.run(_as_user(user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                            "-E", "UTF8", "--no-sync"), check=True, capture_output=True, cwd=base)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c max_connections=200"
    subprocess.run(_as_user(user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"),
                            "-w", "start"), check=True, capture_output=True, cwd=base)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_user(user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                       capture_output=True, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _workers(app_dir: Path, sweep_dir: Path, storage: str, study: str, n: int, n_trials: int, marks: Path,
             sleep: float = 0.2) -> list[subprocess.Popen]:
    """``n`` sweeper processes started together, the same command each (one sweep dir: job dirs are trial numbers)."""
    marks.mkdir(parents=True, exist_ok=True)
    cmd = app_cmd(app_dir, sweep_dir, f"hydra.sweeper.storage='{storage}'", f"hydra.sweeper.study_name={study}",
                  f"hydra.sweeper.n_trials={n_trials}", f"marks='{marks}'", f"sleep={sleep}",
                  "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")
    logs = sweep_dir.parent
    return [forkserver.Popen(cmd, cwd=app_dir, env=env(), stdout=open(logs / f"w{i}.out", "w"),  # noqa: SIM115
                             stderr=subprocess.STDOUT) for i in range(n)]


def _census(study: optuna.Study, marks: Path, n_trials: int) -> dict:
    """Totals, duplicates and losses of a shared study, from the storage and from the jobs' own marks."""
    trials = study.trials
    ran = Counter(p.name for p in marks.iterdir())  # a trial id run twice could not create its mark again
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    params = Counter(tuple(sorted(t.params.items())) for t in trials if t.state == TrialState.COMPLETE)
    return {
        "total_trials": len(trials),
        "finished": len(finished),
        "n_trials": n_trials,
        "duplicate_numbers": len(trials) - len({t.number for t in trials}),
        "duplicate_params": sum(c - 1 for c in params.values()),
        "duplicate_runs": sum(c - 1 for c in ran.values()),
        # lost: unfinished trials, or finished ones whose job never ran
        "lost": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
        + sum(str(t._trial_id) not in ran for t in finished),
        "workers": len({t.user_attrs.get("worker") for t in finished}),
        "retried": sum("failed_trial" in t.system_attrs for t in trials),
    }


@pytest.mark.long(14)
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_four_workers_share_one_study(request, app, tmp_path, backend):  # noqa: F811
    storage = request.getfixturevalue("postgres") if backend == "postgresql" else f"sqlite:///{tmp_path}/optuna.db"
    study_name, n_trials = f"workers-{uuid.uuid4().hex[:8]}", 40
    tic = time.perf_counter()
    procs = _workers(app, tmp_path / "sweep", storage, study_name, 4, n_trials, tmp_path / "marks")
    codes = [p.wait(timeout=300) for p in procs]
    seconds = time.perf_counter() - tic
    outs = [(tmp_path / f"w{i}.out").read_text()[-3000:] for i in range(4)]
    assert codes == [0, 0, 0, 0], outs
    study = optuna.load_study(study_name=study_name, storage=storage)
    census = _census(study, tmp_path / "marks", n_trials)
    census.update(backend=backend, worker_processes=4, seconds=round(seconds, 1))
    print(f"\n4 workers on one {backend} study: {json.dumps(census)}")
    (tmp_path.parent / f"workers_{backend}.json").write_text(json.dumps(census, indent=1))
    assert census["total_trials"] == census["finished"] == n_trials
    assert census["duplicate_numbers"] == census["duplicate_params"] == census["duplicate_runs"] == 0
    assert census["lost"] == 0
    assert census["workers"] >= 2  # the study really was shared
    assert sorted(t.number for t in study.trials) == list(range(n_trials))
    best = yaml.safe_load((tmp_path / "sweep" / "best_params.yaml").read_text())
    assert best["best_value"] == study.best_value and not corrupted(tmp_path / "sweep")


@pytest.mark.long(14)
def test_killed_worker_trial_is_rerun_by_the_others(postgres, app, tmp_path):  # noqa: F811
    """kill -9 one of 3 workers while it runs a trial: a surviving worker re-runs that trial once its heartbeat is
    stale, and the study still ends with exactly n_trials finished."""
    study_name, n_trials = f"killed-{uuid.uuid4().hex[:8]}", 16
    procs = _workers(app, tmp_path / "sweep", postgres, study_name, 3, n_trials, tmp_path / "marks", sleep=1.0)
    storage = optuna.storages.RDBStorage(postgres)
    deadline = time.time() + 120
    victim = None
    while victim is None and time.time() < deadline:  # a RUNNING trial of the first worker, after a few finished
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            continue
        trials = study.get_trials(deepcopy=False)
        if sum(t.state == TrialState.COMPLETE for t in trials) < 3:
            continue
        victim = next((t for t in trials if t.state == TrialState.RUNNING
                       and t.user_attrs.get("worker", "").endswith(f":{procs[0].pid}")), None)
    assert victim is not None, "the first worker never ran a trial"
    procs[0].send_signal(signal.SIGKILL)
    assert [p.wait(timeout=300) for p in procs[1:]] == [0, 0]
    study = optuna.load_study(study_name=study_name, storage=postgres)
    census = _census(study, tmp_path / "marks", n_trials)
    print(f"\n3 workers, one killed mid-trial: {json.dumps(census)}")
    stale = study.trials[victim.number]
    assert stale.state == TrialState.FAIL and "error" not in stale.user_attrs
    rerun = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(rerun) == 1 and rerun[0].params == victim.params and rerun[0].state == TrialState.COMPLETE
    assert census["finished"] == n_trials and census["total_trials"] == n_trials + 1  # + the killed one
    assert census["duplicate_numbers"] == census["duplicate_params"] == 0
    # the killed trial's job had started (its mark exists); it is counted once, by its re-run
    assert census["duplicate_runs"] == 0 and census["lost"] == 0
