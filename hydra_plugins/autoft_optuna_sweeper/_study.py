"""The study: open or create it (refusing one made for another search), warm starts, what counts towards n_trials,
and the jobs' way back to their trial (``trial_from_config``)."""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from hydra_plugins.autoft_optuna_sweeper._lock import StudyLock
from hydra_plugins.autoft_optuna_sweeper._outcome import ERROR_ATTR, SweepError
from hydra_plugins.autoft_optuna_sweeper._search_space import SearchSpace, contains, first_line, space_diff, space_json
from hydra_plugins.autoft_optuna_sweeper.config import WarmStartConf, build

log = logging.getLogger(__name__)

# Study user attr holding the pruner config, so that trial_from_config rebuilds the same pruner in any process.
PRUNER_ATTR = "autoft_pruner"
# Study user attr holding the search space the study was created with (param -> distribution JSON).
SPACE_ATTR = "autoft_space"
# Trial user attr naming the sweeper process (host:pid) that asked the trial.
WORKER_ATTR = "worker"


def safe_url(url: str) -> str:
    """The storage URL without its password, for logs and error lines."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def n_counted(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Trials that use up the budget: COMPLETE, PRUNED, and the FAILs this sweeper recorded (they carry
    ``error``). Stale trials failed by the heartbeat carry none: they are retried, not counted; nor are the
    trials that bad input aborted (they carry ``aborted``). Optuna's MaxTrialsCallback counts by state alone."""
    budget = (TrialState.COMPLETE, TrialState.PRUNED)
    return sum(t.state in budget or (t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs) for t in trials)


def open_study(lock: StudyLock, name: str | None, directions: list[str], space: SearchSpace, pruner: dict[str, Any],
               first: list[dict[str, Any]], heartbeat_interval: int, grace_period: int | None,
               ) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create the study, or load it after checking it is this search's (nothing is written before that); under the
    study lock, so that workers starting together create it once and enqueue its first trials once. A study_name of
    None makes a new study each time, named by Optuna."""
    try:
        with lock, quiet():
            storage = optuna.storages.RDBStorage(
                lock.url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                # A stale trial never ran to the end: run its params again, once.
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
            configured = space_json(space.distributions)
            try:
                study_id = storage.get_study_id_from_name(name) if name is not None else None
            except KeyError:
                study_id = None
            # the configured pruner: the jobs run in this process prune through this study's trials (running_here)
            pruned_by = build(pruner, "pruner")
            if study_id is None:
                study = optuna.create_study(storage=storage, study_name=name, directions=directions, pruner=pruned_by)
            else:
                _check_study(storage, study_id, f"study '{name}' in {safe_url(lock.url)}", directions, configured)
                study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(),
                                          pruner=pruned_by)
            if SPACE_ATTR not in study.user_attrs:
                study.set_user_attr(SPACE_ATTR, configured)
            study.set_user_attr(PRUNER_ATTR, pruner)
            if not study.get_trials(deepcopy=False):  # a restart or another worker must not enqueue them again
                for params in first:
                    study.enqueue_trial(params)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, OSError) as e:
        hint = " (pip install psycopg2-binary)" if isinstance(e, ImportError) else ""
        raise SweepError(f"hydra.sweeper.storage: cannot open {safe_url(lock.url)}: {first_line(e)}{hint}") from None
    return study, storage


def _check_study(storage: optuna.storages.RDBStorage, study_id: int, where: str, directions: list[str],
                 configured: dict[str, str]) -> None:
    """Refuse a study created for another search (the same name in the same storage): resuming it with another
    space or direction would mix incomparable trials."""
    fix = "use another hydra.sweeper.study_name or hydra.sweep.dir"
    stored_dirs = [d.name.lower() for d in storage.get_study_directions(study_id)]
    if stored_dirs != directions:
        raise SweepError(f"{where} was created to {stored_dirs}, not {directions}: {fix}")
    stored = storage.get_study_user_attrs(study_id).get(SPACE_ATTR)
    if stored is None:  # made before this attr existed, or by other code: its trials tell its space
        sampled = next((t for t in storage.get_all_trials(study_id, deepcopy=False) if t.distributions), None)
        stored = space_json(sampled.distributions) if sampled is not None else None
    if stored is not None and stored != configured:
        raise SweepError(f"{where} holds another search space ({space_diff(stored, configured)}): {fix}")


def warm_start_params(ws: WarmStartConf, space: SearchSpace) -> list[dict[str, Any]]:
    """Best params of another study, restricted to this space (read-only: nothing is written here)."""
    if ws.storage is None:
        return []
    if ws.storage.startswith("sqlite:///") and not Path(ws.storage.removeprefix("sqlite:///")).is_file():
        raise ValueError(f"hydra.sweeper.warm_start.storage: no database at {ws.storage}")
    try:
        source = optuna.load_study(study_name=ws.study_name, storage=ws.storage)
    except KeyError:
        raise ValueError(f"hydra.sweeper.warm_start: no study '{ws.study_name}' in {safe_url(ws.storage)}") from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
        raise ValueError(f"hydra.sweeper.warm_start.storage: cannot open {safe_url(ws.storage)}: "
                         f"{first_line(e)}") from None
    if len(source.directions) > 1:
        best = source.best_trials
    else:
        complete = source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        maximize = source.direction == optuna.study.StudyDirection.MAXIMIZE
        best = sorted(complete, key=lambda t: t.value, reverse=maximize)
    picked = [{n: v for n, v in t.params.items() if n in space.distributions and contains(space.distributions[n], v)}
              for t in best[: ws.top_k]]
    log.info("warm start: %d trials from study '%s' in %s", len(picked), source.study_name, safe_url(ws.storage))
    return [p for p in picked if p]


def fail_orphans(study: optuna.Study, storage: optuna.storages.RDBStorage, grace: int) -> None:
    """Fail RUNNING trials that no sweeper owns: asked by a process killed before it named itself (it asks,
    beats and names itself under the lock, so another process sees such a trial only if its asker died).
    They never ran: FAIL, not counted, nothing to retry. Call it under the lock with ``grace`` 0; without a lock
    (a backend that has none) another sweeper may be between its ask and its name for up to ``grace`` seconds."""
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start or now
        if WORKER_ATTR not in t.user_attrs and (now - started).total_seconds() > grace:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_user_attr(t._trial_id, "orphaned", "its sweeper died before running it")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                log.warning("trial #%d was left RUNNING by a dead sweeper before it started: failed", t.number)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide Optuna's experimental-feature warnings and its 'heartbeat is meant for optimize()' warning:
    this sweeper records the heartbeats of its ask/tell trials itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        yield


# The trials the sweepers of this process are running, by (storage URL, study name, trial id): a job that Hydra's
# launcher runs in the sweeper's own process (the basic launcher) takes the sweeper's trial object itself.
_RUNNING_HERE: dict[tuple[str, str, int], optuna.trial.Trial] = {}


@contextlib.contextmanager
def running_here(storage_url: str, study_name: str | None, trials: Sequence[optuna.trial.Trial]) -> Iterator[None]:
    """While a batch of trials is launched, a job in this process finds its trial without the storage."""
    keys = [(storage_url, str(study_name), t._trial_id) for t in trials]
    _RUNNING_HERE.update(zip(keys, trials, strict=True))
    try:
        yield
    finally:
        for key in keys:
            _RUNNING_HERE.pop(key, None)


@functools.cache
def _job_storage(url: str) -> optuna.storages.RDBStorage:
    """One engine per storage URL per process, however many jobs run in it."""
    return optuna.storages.RDBStorage(url)


def trial_from_config(cfg: DictConfig) -> optuna.trial.Trial | None:
    """Rebuild the job's RUNNING trial from ``cfg.optuna_trial`` so a job in any process can report and prune.

    A job in the sweeper's own process gets the sweeper's trial (:func:`running_here`): five storage queries a
    trial fewer. Elsewhere everything goes through the storage: the study, and its pruner from the study's
    ``autoft_pruner`` user attr. Returns None when no trial was passed (``pass_trial`` off, or not run by this
    sweeper).
    """
    ref = OmegaConf.select(cfg, "optuna_trial")
    if ref is None:
        return None
    here = _RUNNING_HERE.get((str(ref.storage), str(ref.study_name), int(ref.trial_id)))
    if here is not None:
        return here
    storage = _job_storage(ref.storage)
    spec = storage.get_study_user_attrs(storage.get_study_id_from_name(ref.study_name))[PRUNER_ATTR]
    study = optuna.load_study(
        study_name=ref.study_name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(),  # jobs report and prune; they do not sample
        pruner=build(spec, "pruner"),
    )
    return optuna.trial.Trial(study, int(ref.trial_id))
