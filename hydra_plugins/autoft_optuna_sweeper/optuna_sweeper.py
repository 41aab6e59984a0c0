"""Hydra sweeper on current Optuna (>=4).

The released hydra-optuna-sweeper pins optuna<3, so this keeps its search-space syntax and adds what a
long search needs: a persistent study that a re-run finishes instead of restarting, recovery of trials
left RUNNING by a dead process, warm starts from another study, and real pruning from inside jobs.

Reliability: a job that raises fails (or, diverged, prunes) its own trial with the reason in the trial's ``error``
user attr and the search goes on, until more than ``max_failure_rate`` of this run's trials failed; bad input (an
invalid space, a study holding another space, an unreachable storage, a job's ``autoft.UserError``) ends the command
with one ``error:`` line and exit code 2 before anything already written is touched. Several sweeper processes (on
several machines, against one PostgreSQL database) can run the same command: a lock held around "count, then ask"
makes them share the study without overshooting ``n_trials``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import hashlib
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, QuotedString, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from autoft import UserError, atomic_write

log = logging.getLogger(__name__)

# Study user attr holding the pruner spec, so trial_from_config can rebuild the same pruner in any process.
PRUNER_ATTR = "autoft_pruner"
# Trial user attr with the reason a job failed or diverged; it also marks the FAILs that count towards n_trials.
ERROR_ATTR = "error"
# Trial user attr with the bad-input error that ended the command (FAIL, not counted: a fixed re-run runs it again).
ABORT_ATTR = "aborted"
# Trial user attr naming the sweeper process (host:pid) that asked the trial.
WORKER_ATTR = "worker"
# Study user attr holding the search space the study was created with (param -> distribution JSON).
SPACE_ATTR = "autoft_space"
# Exceptions a job raises when its run diverged (a non-finite loss): the trial is PRUNED, with the reason, so that
# TPE ranks it among the bad trials (it ignores FAILs and would sample the divergent region again).
DIVERGED: tuple[type[BaseException], ...] = (FloatingPointError,)

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "qmc": optuna.samplers.QMCSampler,
    "gp": optuna.samplers.GPSampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "percentile": optuna.pruners.PercentilePruner,
}


@dataclass
class SamplerConf:
    """Optuna sampler by name; seeded by default so a search is reproducible."""

    name: str = "tpe"
    seed: int | None = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerConf:
    """Optuna pruner by name; jobs use it through trial.should_prune()."""

    name: str = "none"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class WarmStartConf:
    """Another study whose best top_k trials become this study's first trials (off while storage is None)."""

    storage: str | None = None
    study_name: str | None = None
    top_k: int = 5


@dataclass
class AutoftOptunaSweeperConf:
    """Config of ``hydra/sweeper=autoft_optuna``."""

    _target_: str = "hydra_plugins.autoft_optuna_sweeper.optuna_sweeper.AutoftOptunaSweeper"
    sampler: SamplerConf = field(default_factory=SamplerConf)
    # "maximize", "minimize", or a list of them for a multi-objective study.
    direction: Any = "maximize"
    study_name: str = "autoft"
    # Any SQLAlchemy URL; None means sqlite:///<hydra.sweep.dir>/optuna.db.
    storage: str | None = None
    # Trials the study must hold at the end, counted across restarts (COMPLETE, PRUNED, failed jobs).
    n_trials: int = 20
    # Trials asked and launched together per batch.
    n_jobs: int = 1
    # Search space in hydra-optuna-sweeper syntax; sweep overrides on the command line add to it.
    params: dict[str, Any] = field(default_factory=dict)
    # Params of trials to run first (each dict a subset of the search space).
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    warm_start: WarmStartConf = field(default_factory=WarmStartConf)
    # Give each job ++optuna_trial.{storage,study_name,trial_id} so it can report and prune.
    pass_trial: bool = True
    pruner: PrunerConf = field(default_factory=PrunerConf)
    heartbeat_interval: int = 60
    # Seconds without heartbeat before a RUNNING trial is failed as stale; None means 2 * heartbeat_interval.
    grace_period: int | None = None
    # End the search (exit 2) once more than this fraction of this run's trials failed or diverged ...
    max_failure_rate: float = 0.5
    # ... counted from this many trials of this run on (1.0 never ends it).
    failure_rate_min_trials: int = 5


ConfigStore.instance().store(
    group="hydra/sweeper", name="autoft_optuna", node=AutoftOptunaSweeperConf, provider="autoft"
)


@dataclass
class SearchSpace:
    """A parsed sweep: what Optuna samples, and what every job gets unchanged."""

    distributions: dict[str, BaseDistribution]
    keys: dict[str, str]  # param name -> override key, keeping a leading + or ++
    fixed: list[str]  # override lines passed through as written


@functools.cache
def _parser() -> OverridesParser:
    """One parser per process: building it costs about 0.1 s."""
    return OverridesParser.create()


def _first_line(error: BaseException | str) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def parse_search_space(overrides: Sequence[str]) -> SearchSpace:
    """Parse ``key=value`` lines into a search space; a later line for the same key wins (command line over config).

    Raises ValueError with a one-line message naming the parameter, before anything is written.
    """
    parsed: dict[str, Override] = {}
    for line in overrides:
        name = line.split("=", 1)[0].lstrip("+~")
        try:
            parsed[name] = _parser().parse_override(line)
        except HydraException as e:
            raise ValueError(f"invalid search space for '{name}': {_first_line(e)}") from None
    space = SearchSpace({}, {}, [])
    for name, override in parsed.items():
        if not override.is_sweep_override():
            space.fixed.append(str(override.input_line))
            continue
        try:
            space.distributions[name] = _distribution(override)
        except (HydraException, TypeError, ValueError) as e:
            raise ValueError(f"invalid search space for '{name}': {_first_line(e)}") from None
        space.keys[name] = override.get_key_element()
    return space


def _distribution(override: Override) -> BaseDistribution:
    """Map one sweep override to an Optuna distribution (ranges exclude stop, as in Hydra's basic sweeper)."""
    value = override.value()
    if not isinstance(value, IntervalSweep | ChoiceSweep | RangeSweep):
        raise ValueError(f"unsupported sweep '{override.get_value_element_as_str()}'")
    unknown = set(value.tags) - {"log"}
    if unknown:
        raise ValueError(f"unknown tag(s) {sorted(unknown)}: only 'log' is supported")
    log_scale = "log" in value.tags
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if not low < high:
            raise ValueError(f"empty interval({low}, {high}): the lower bound must be below the upper one")
        if log_scale and low <= 0:
            raise ValueError(f"a log interval needs a positive lower bound, got {low}")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(low, high, log=log_scale)
    if log_scale:
        raise ValueError("tag(log, ...) applies to interval(...) only")
    if isinstance(value, ChoiceSweep):
        choices = [c.text if isinstance(c, QuotedString) else c for c in value.list]
        if not choices or not all(isinstance(c, str | int | float | bool) for c in choices):
            raise ValueError("choice(...) takes one or more str, int, float or bool values")
        return CategoricalDistribution(choices)
    values = list(value.range())
    if not values:
        raise ValueError(f"empty range({value.start}, {value.stop}, {value.step})")
    low, high, step = min(values), max(values), abs(value.step)
    if all(isinstance(v, int) for v in values) and isinstance(step, int):
        return IntDistribution(low, high, step=step)
    return FloatDistribution(low, high, step=step)


def _contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether an enqueued or warm-start value fits; Optuna itself would run an out-of-space value with a warning."""
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    kind = int if isinstance(distribution, IntDistribution) else int | float
    return isinstance(value, kind) and not isinstance(value, bool) and distribution.low <= value <= distribution.high


def _parses_to(text: str, value: Any) -> bool:
    """Round-trip check: the job must see the very value Optuna recorded (e.g. the string '1', not the int 1)."""
    try:
        override = _parser().parse_override(f"k={text}")
    except HydraException:
        return False
    parsed = override.value()
    return not override.is_sweep_override() and type(parsed) is type(value) and parsed == value


def _format_value(value: Any) -> str:
    """Override text that Hydra parses back to exactly ``value`` (floats keep repr precision)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    for text in (str(value), "'" + str(value).replace("'", "\\'") + "'"):
        if _parses_to(text, value):
            return text
    raise ValueError(f"cannot pass {value!r} through a Hydra override")


def _build(kind: str, registry: dict[str, type], name: str, kwargs: dict[str, Any], **extra: Any) -> Any:
    """Instantiate a sampler or pruner by name, turning bad names and kwargs into one-line ValueErrors."""
    if name not in registry:
        raise ValueError(f"unknown {kind} '{name}': expected one of {', '.join(registry)}")
    try:
        return registry[name](**extra, **kwargs)
    except TypeError as e:
        raise ValueError(f"{kind} '{name}': {e}") from None


@functools.cache
def _job_storage(url: str) -> optuna.storages.RDBStorage:
    """One engine per storage URL per process, however many jobs run in it."""
    return optuna.storages.RDBStorage(url)


def trial_from_config(cfg: DictConfig) -> optuna.trial.Trial | None:
    """Rebuild the job's RUNNING trial from ``cfg.optuna_trial`` so a job in any process can report and prune.

    Everything goes through the storage: the study, and its pruner from the study's ``autoft_pruner`` user
    attr. Returns None when no trial was passed (``pass_trial=false``, or not run by this sweeper).
    """
    ref = OmegaConf.select(cfg, "optuna_trial")
    if ref is None:
        return None
    storage = _job_storage(ref.storage)
    spec = storage.get_study_user_attrs(storage.get_study_id_from_name(ref.study_name))[PRUNER_ATTR]
    study = optuna.load_study(
        study_name=ref.study_name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(),  # jobs report and prune; they do not sample
        pruner=_build("pruner", PRUNERS, spec["name"], spec["kwargs"]),
    )
    return optuna.trial.Trial(study, int(ref.trial_id))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide Optuna's experimental-feature warnings and its 'heartbeat is meant for optimize()' warning:
    this sweeper records the heartbeats of its ask/tell trials itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        yield


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> Iterator[None]:
    """Beat for the running batch: Optuna only beats inside optimize(), and a trial that never had a
    heartbeat is never failed as stale, so a killed sweep would leave it RUNNING forever."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                for trial_id in trial_ids:
                    storage.record_heartbeat(trial_id)
            except Exception as e:  # e.g. a locked SQLite file: keep beating rather than die silently
                log.warning("heartbeat not recorded: %s", e)
            if stop.wait(storage.heartbeat_interval):
                return

    thread = threading.Thread(target=beat, name="autoft-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _n_counted(study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial] | None = None) -> int:
    """Trials that use up the budget: COMPLETE, PRUNED, and the FAILs this sweeper recorded (they carry
    ``error``). Stale trials failed by the heartbeat carry none: they are retried, not counted; nor are the
    trials that bad input aborted (they carry ``aborted``)."""
    budget = (TrialState.COMPLETE, TrialState.PRUNED)
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    return sum(t.state in budget or (t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs) for t in trials)


def _objective_values(result: Any, n_objectives: int) -> tuple[list[float] | None, str | None]:
    """The job's return value as floats, or the reason it cannot be told as COMPLETE."""
    try:
        values = [float(result)] if n_objectives == 1 else [float(v) for v in result]
    except (TypeError, ValueError):
        wanted = "a number" if n_objectives == 1 else f"a list of {n_objectives} numbers"
        return None, f"the job returned {result!r}, expected {wanted}"
    if len(values) != n_objectives:
        return None, f"the job returned {len(values)} values for {n_objectives} objectives"
    if not all(math.isfinite(v) for v in values):
        return None, f"the job returned a non-finite value {values}"
    return values, None


class SweepError(Exception):
    """Bad input or a search that cannot go on: the command ends with this one line and exit code 2."""


def _safe_url(url: str) -> str:
    """The storage URL without its password, for logs and error lines."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _space_json(space: dict[str, BaseDistribution]) -> dict[str, str]:
    return {name: optuna.distributions.distribution_to_json(d) for name, d in sorted(space.items())}


def _space_text(distribution: BaseDistribution) -> str:
    """A distribution in a few characters, for one-line errors."""
    if isinstance(distribution, CategoricalDistribution):
        return f"choice{tuple(distribution.choices)}"
    text = f"[{distribution.low}, {distribution.high}]"
    if distribution.log:
        text += " log"
    if distribution.step is not None and (isinstance(distribution, FloatDistribution) or distribution.step != 1):
        text += f" step {distribution.step}"
    return ("int" if isinstance(distribution, IntDistribution) else "float") + text


def _space_diff(stored: dict[str, str], configured: dict[str, str]) -> str:
    load = optuna.distributions.json_to_distribution
    parts = [f"{n} {_space_text(load(stored[n]))} now {_space_text(load(configured[n]))}"
             for n in sorted(stored.keys() & configured.keys()) if stored[n] != configured[n]]
    parts += [f"{n} no longer searched" for n in sorted(stored.keys() - configured.keys())]
    parts += [f"{n} not searched before" for n in sorted(configured.keys() - stored.keys())]
    return "; ".join(parts)


class _StudyLock:
    """A lock shared by every sweeper process of one study: creating the study and "count, then ask" must not
    interleave, or concurrent workers would each ask the last trial and overshoot ``n_trials``.

    PostgreSQL: a session advisory lock on a connection of its own; SQLite: ``flock`` on ``<db>.lock``. Both are
    released by the OS or the server when the process dies, so kill -9 never leaves the study locked. Other
    backends get no lock (a warning): concurrent workers may then finish up to one trial each beyond n_trials.
    """

    def __init__(self, url: str, study_name: str):
        self.url, self.study_name = url, study_name
        self._engine: sqlalchemy.Engine | None = None
        self._conn: sqlalchemy.Connection | None = None
        self._file: Any = None
        self._key = int.from_bytes(hashlib.sha256(f"autoft:{study_name}".encode()).digest()[:8], "big", signed=True)
        parsed = sqlalchemy.engine.make_url(url)
        self.backend = parsed.get_backend_name()
        file_db = self.backend == "sqlite" and parsed.database not in (None, "", ":memory:")
        self.path = Path(parsed.database) if file_db else None
        if self.backend not in ("postgresql", "sqlite"):
            log.warning("no cross-process lock for %s storage: concurrent workers may overshoot n_trials", self.backend)

    def __enter__(self) -> _StudyLock:
        if self.backend == "postgresql":
            if self._conn is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
                self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        elif self.path is not None:
            import fcntl

            if self._file is None:
                self._file = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
        elif self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._engine.dispose()
            self._conn = self._engine = None
        if self._file is not None:
            self._file.close()
            self._file = None



def _release(returns: Sequence[JobReturn]) -> None:
    """Drop what failed jobs still hold: an exception's traceback keeps the job's frames, so its model and
    (after an out-of-memory error) its GPU memory alive while the next trial runs in the same process."""
    failed = False
    for ret in returns:
        exc = ret._return_value if ret.status == JobStatus.FAILED else None
        while isinstance(exc, BaseException):
            failed = True
            exc.__traceback__ = None
            exc = exc.__cause__ or exc.__context__
    torch = sys.modules.get("torch")
    if failed and torch is not None:
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


class AutoftOptunaSweeper(Sweeper):
    """Ask/tell loop: Optuna proposes, Hydra's launcher runs the jobs, outcomes go to one persistent study."""

    def __init__(
        self,
        sampler: DictConfig,
        direction: Any,
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        params: DictConfig,
        enqueue: Any,
        warm_start: DictConfig,
        pass_trial: bool,
        pruner: DictConfig,
        heartbeat_interval: int,
        grace_period: int | None,
        max_failure_rate: float,
        failure_rate_min_trials: int,
    ) -> None:
        def plain(node: Any) -> Any:
            return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

        self.sampler = SamplerConf(**plain(sampler))
        self.directions: list[str] = [direction] if isinstance(direction, str) else list(plain(direction))
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.params: dict[str, Any] = plain(params) or {}
        self.enqueue: list[dict[str, Any]] = plain(enqueue) or []
        self.warm_start = WarmStartConf(**plain(warm_start))
        self.pass_trial = pass_trial
        self.pruner = PrunerConf(**plain(pruner))
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_failure_rate = max_failure_rate
        self.failure_rate_min_trials = failure_rate_min_trials
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._lock: _StudyLock | None = None
        self._wrote_multirun = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        # Optuna's own messages through Hydra's logging (stdout and the log file), not straight to stderr: stderr
        # holds the one error line of a failed command.
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        self.storage_url = self.storage or f"sqlite:///{self.sweep_dir / 'optuna.db'}"
        # Job dirs are named after trial numbers (unique in the study, whichever worker runs them) unless the
        # user set a subdir pattern of their own.
        subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
        self.subdir_is_trial = subdir == "${hydra.job.num}"

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except SweepError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        finally:
            if self._lock is not None:
                self._lock.close()

    def _sweep(self, arguments: list[str]) -> None:
        try:
            space = parse_search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
            pruner = self._check_config()
            first = self._checked_enqueue(space) + self._warm_start_params(space)
        except ValueError as e:
            raise SweepError(str(e)) from None
        # Compose one job config from in-space values now, so a key missing from the config fails before any write.
        dists = space.distributions
        probe = {n: d.choices[0] if isinstance(d, CategoricalDistribution) else d.low for n, d in dists.items()}
        self.validate_batch_is_legal([self._job_overrides(space, probe, trial_id=0, number=0)])

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        study = self._open_study(pruner, space, first)
        counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
        log.info(
            "study '%s' in %s: %d/%d trials done (%s); sampler %s (seed %s), pruner %s, %d params, %d fixed",
            self.study_name,
            _safe_url(self.storage_url),
            _n_counted(study),
            self.n_trials,
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "new",
            self.sampler.name,
            self.sampler.seed,
            self.pruner.name,
            len(space.distributions),
            len(space.fixed),
        )
        self._run_trials(study, space)
        self._finish(study)

    def _check_config(self) -> optuna.pruners.BasePruner:
        """Fail on a bad sweeper config before any file is written."""
        if not self.directions or any(d not in ("maximize", "minimize") for d in self.directions):
            raise ValueError(f"hydra.sweeper.direction: expected maximize, minimize or a list, got {self.directions}")
        if self.n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs must be at least 1, got {self.n_jobs}")
        if not 0 <= self.max_failure_rate <= 1:
            raise ValueError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {self.max_failure_rate}")
        if self.failure_rate_min_trials < 1:
            raise ValueError(f"hydra.sweeper.failure_rate_min_trials must be at least 1, got "
                             f"{self.failure_rate_min_trials}")
        self._sampler(offset=0)
        return _build("pruner", PRUNERS, self.pruner.name, self.pruner.kwargs)

    def _sampler(self, offset: int) -> optuna.samplers.BaseSampler:
        """Seed + offset: a resumed sweep (offset = trials already in the study) must not replay the random
        startup draws of the first run, nor may workers that join a study replay each other's; a fresh sweep
        (offset 0) is exactly reproducible. QMC keeps its seed: its scrambling must be the same in every process."""
        seed = self.sampler.seed
        if seed is not None and self.sampler.name != "qmc":
            seed += offset
        return _build("sampler", SAMPLERS, self.sampler.name, self.sampler.kwargs, seed=seed)

    def _checked_enqueue(self, space: SearchSpace) -> list[dict[str, Any]]:
        for params in self.enqueue:
            for name, value in params.items():
                if name not in space.distributions or not _contains(space.distributions[name], value):
                    raise ValueError(f"hydra.sweeper.enqueue: {name}={value!r} is not in the search space")
        return self.enqueue

    def _warm_start_params(self, space: SearchSpace) -> list[dict[str, Any]]:
        """Best params of another study, restricted to this space (read-only: nothing is written here)."""
        ws = self.warm_start
        if ws.storage is None:
            return []
        if ws.storage.startswith("sqlite:///") and not Path(ws.storage.removeprefix("sqlite:///")).is_file():
            raise ValueError(f"hydra.sweeper.warm_start.storage: no database at {ws.storage}")
        try:
            source = optuna.load_study(study_name=ws.study_name, storage=ws.storage)
        except KeyError:
            where = _safe_url(ws.storage)
            raise ValueError(f"hydra.sweeper.warm_start: no study '{ws.study_name}' in {where}") from None
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
            raise ValueError(f"hydra.sweeper.warm_start.storage: cannot open {_safe_url(ws.storage)}: "
                             f"{_first_line(e)}") from None
        if len(source.directions) > 1:
            best = source.best_trials
        else:
            complete = source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            maximize = source.direction == optuna.study.StudyDirection.MAXIMIZE
            best = sorted(complete, key=lambda t: t.value, reverse=maximize)
        picked = [
            {n: v for n, v in t.params.items() if n in space.distributions and _contains(space.distributions[n], v)}
            for t in best[: ws.top_k]
        ]
        log.info("warm start: %d trials from study '%s' in %s", len(picked), source.study_name, _safe_url(ws.storage))
        return [p for p in picked if p]

    def _job_overrides(self, space: SearchSpace, params: dict[str, Any], trial_id: int, number: int) -> list[str]:
        overrides = space.fixed + [f"{space.keys[n]}={_format_value(params[n])}" for n in space.distributions]
        if self.subdir_is_trial:
            overrides.append(f"hydra.sweep.subdir={number}")
        if self.pass_trial:
            overrides += [
                f"++optuna_trial.storage={_format_value(self.storage_url)}",
                f"++optuna_trial.study_name={_format_value(self.study_name)}",
                f"++optuna_trial.trial_id={trial_id}",
            ]
        return overrides

    def _open_study(
        self, pruner: optuna.pruners.BasePruner, space: SearchSpace, first: list[dict[str, Any]]
    ) -> optuna.Study:
        """Create the study, or load it after checking it is this search's (nothing is written before that);
        under the study lock, so that workers starting together create it once and enqueue its first trials once."""
        self._lock = _StudyLock(self.storage_url, self.study_name)
        try:
            with self._lock, _quiet():
                self._rdb = optuna.storages.RDBStorage(
                    self.storage_url,
                    heartbeat_interval=self.heartbeat_interval,
                    grace_period=self.grace_period,
                    # A stale trial never ran to the end: run its params again, once.
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
                configured = _space_json(space.distributions)
                try:
                    study_id = self._rdb.get_study_id_from_name(self.study_name)
                except KeyError:
                    study = optuna.create_study(
                        storage=self._rdb, study_name=self.study_name, directions=self.directions, pruner=pruner
                    )
                else:
                    self._check_study(study_id, configured)
                    study = optuna.load_study(study_name=self.study_name, storage=self._rdb, pruner=pruner,
                                              sampler=optuna.samplers.RandomSampler())
                if SPACE_ATTR not in study.user_attrs:
                    study.set_user_attr(SPACE_ATTR, configured)
                study.set_user_attr(PRUNER_ATTR, asdict(self.pruner))
                if not study.get_trials(deepcopy=False):  # a restart or another worker must not enqueue them again
                    for params in first:
                        study.enqueue_trial(params)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, OSError) as e:
            hint = " (pip install 'autoft[postgres]')" if isinstance(e, ImportError) else ""
            raise SweepError(f"hydra.sweeper.storage: cannot open {_safe_url(self.storage_url)}: "
                             f"{_first_line(e)}{hint}") from None
        return study

    def _check_study(self, study_id: int, configured: dict[str, str]) -> None:
        """Refuse a study created for another search (the same name in the same storage): resuming it with another
        space or direction would mix incomparable trials."""
        where = f"study '{self.study_name}' in {_safe_url(self.storage_url)}"
        fix = "use another hydra.sweeper.study_name or hydra.sweep.dir"
        stored_dirs = [d.name.lower() for d in self._rdb.get_study_directions(study_id)]
        if stored_dirs != self.directions:
            raise SweepError(f"{where} was created to {stored_dirs}, not {self.directions}: {fix}")
        stored = self._rdb.get_study_user_attrs(study_id).get(SPACE_ATTR)
        if stored is None:  # made before this attr existed, or by other code: its trials tell its space
            sampled = next((t for t in self._rdb.get_all_trials(study_id, deepcopy=False) if t.distributions), None)
            stored = _space_json(sampled.distributions) if sampled is not None else None
        if stored is not None and stored != configured:
            raise SweepError(f"{where} holds another search space ({_space_diff(stored, configured)}): {fix}")

    def _run_trials(self, study: optuna.Study, space: SearchSpace) -> None:
        """Batches of trials until the study holds n_trials counted ones, with any number of workers on it."""
        ran: list[tuple[bool, str]] = []  # this run's trials: (a fault?, outcome)
        sampler_set = waiting_logged = False
        while True:
            asked: list[optuna.trial.Trial] = []
            with self._lock, _quiet():
                optuna.storages.fail_stale_trials(study)
                self._fail_orphans(study)
                trials = study.get_trials(deepcopy=False)
                done = _n_counted(study, trials)
                if done >= self.n_trials:
                    break
                # trials other workers (or a dead process, until its heartbeat is stale) are running use budget too
                running = sum(t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs for t in trials)
                if not sampler_set:
                    study.sampler = self._sampler(offset=sum(t.state != TrialState.WAITING for t in trials))
                    sampler_set = True
                for _ in range(min(self.n_jobs, self.n_trials - done - running)):
                    trial = study.ask(space.distributions)
                    # beat at once, not when the heartbeat thread gets to it: a RUNNING trial that never had a
                    # heartbeat is never found stale, so a kill in that gap would leave it RUNNING forever
                    self._rdb.record_heartbeat(trial._trial_id)
                    trial.set_user_attr(WORKER_ATTR, self.worker)
                    asked.append(trial)
            if not asked:
                if not waiting_logged:
                    log.info("%d/%d trials done, %d running elsewhere: waiting for them (a dead process's trials are "
                             "re-run once their heartbeat is %s s old)", done, self.n_trials, running, self._grace)
                    waiting_logged = True
                time.sleep(min(5.0, self.heartbeat_interval))
                continue
            waiting_logged = False
            batch = [self._job_overrides(space, t.params, t._trial_id, t.number) for t in asked]
            tic = time.perf_counter()
            with _heartbeat(self._rdb, [t._trial_id for t in asked]):
                returns = self.launcher.launch(batch, initial_job_idx=asked[0].number)
            seconds = (time.perf_counter() - tic) / len(asked)
            abort = None
            for trial, ret in zip(asked, returns, strict=True):
                outcome, fault, stop = self._tell(study, trial, ret)
                ran.append((fault, outcome))
                abort = abort or stop
                log.info(
                    "trial %d/%d (#%d) %s | %s | best %s | %.1f s/trial",
                    _n_counted(study),
                    self.n_trials,
                    trial.number,
                    outcome,
                    trial.params,
                    self._best_text(study),
                    seconds,
                )
            _release(returns)
            del returns
            if abort is not None:
                raise SweepError(abort)  # bad input: reports and multirun.yaml stay as they were
            self._write_multirun()
            faults = [outcome for fault, outcome in ran if fault]
            if len(ran) >= self.failure_rate_min_trials and len(faults) > self.max_failure_rate * len(ran):
                self._finish(study)
                raise SweepError(
                    f"{len(faults)} of the {len(ran)} trials of this run failed, more than "
                    f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; last: {faults[-1]}"
                )

    @property
    def _grace(self) -> int:
        return self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval

    def _fail_orphans(self, study: optuna.Study) -> None:
        """Fail RUNNING trials that no sweeper owns: asked by a process killed before it beat for them (it asks,
        beats and names itself under the lock, so another process sees such a trial only if its asker died).
        Heartbeat staleness never finds them. They never ran: FAIL, not counted, nothing to retry."""
        now = datetime.datetime.now()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started = t.datetime_start or now
            if WORKER_ATTR not in t.user_attrs and (now - started).total_seconds() > self._grace:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    self._rdb.set_trial_user_attr(t._trial_id, "orphaned", "its sweeper died before running it")
                    self._rdb.set_trial_state_values(t._trial_id, TrialState.FAIL)
                    log.warning("trial #%d was left RUNNING by a dead sweeper before it started: failed", t.number)

    def _tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn) -> tuple[str, bool, str | None]:
        """Record one job's outcome: (what happened, a fault?, the error that ends the command or None).

        Job errors never propagate: one bad trial must not end a long sweep. A failed job's trial is FAIL (a diverged
        one PRUNED) with the reason in its ``error`` user attr; bad input (``UserError``: the same for every trial)
        ends the command, its trial FAIL with the reason in ``aborted`` and not counted towards n_trials."""
        if self._rdb.get_trial(trial._trial_id).state.is_finished():
            return "finished by the job", False, None
        state, values, attr, error = TrialState.FAIL, None, ERROR_ATTR, None
        if ret.status == JobStatus.COMPLETED:
            values, error = _objective_values(ret.return_value, len(self.directions))
            if error is None:
                state = TrialState.COMPLETE
        else:
            exc = ret._return_value  # hydra 1.3 keeps the job's exception here; .return_value would re-raise it
            error = f"{type(exc).__name__}: {exc}"[:2000]
            if isinstance(exc, optuna.TrialPruned):
                state, error = TrialState.PRUNED, None
            elif isinstance(exc, DIVERGED):
                state, error = TrialState.PRUNED, f"diverged: {error}"
            elif isinstance(exc, UserError):
                attr = ABORT_ATTR
        try:
            if error is not None:
                trial.set_user_attr(attr, error)
            study.tell(trial, values, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale by another worker meanwhile
            return "finished elsewhere (stale)", False, None
        if state == TrialState.COMPLETE:
            return f"value {values[0] if len(values) == 1 else values}", False, None
        if error is None:
            return "pruned", False, None
        log.warning("trial #%d %s: %s", trial.number, "pruned" if state == TrialState.PRUNED else "failed", error)
        if attr == ABORT_ATTR:
            return f"aborted: {error}", False, f"trial #{trial.number}: {_first_line(ret._return_value)}"
        return f"{'pruned' if state == TrialState.PRUNED else 'failed'}: {_first_line(error)}", True, None

    def _best_text(self, study: optuna.Study) -> str:
        if len(self.directions) > 1:
            return f"Pareto front of {len(study.best_trials)}"
        try:
            return f"{study.best_value:.6g} (#{study.best_trial.number})"
        except ValueError:
            return "none yet"

    def _best_summary(self, study: optuna.Study) -> dict[str, Any] | None:
        if len(self.directions) > 1:
            front = [{"trial": t.number, "values": t.values, "params": t.params} for t in study.best_trials]
            if not front:
                return None
            return {"study_name": self.study_name, "directions": self.directions, "pareto_front": front}
        try:
            best = study.best_trial
        except ValueError:
            return None
        return {
            "study_name": self.study_name,
            "direction": self.directions[0],
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params,
        }

    def _write_multirun(self) -> None:
        """The command's config, as Hydra's own sweepers write it; only once a batch ran (bad input writes nothing)."""
        if not self._wrote_multirun:
            atomic_write(self.sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))
            self._wrote_multirun = True

    def _finish(self, study: optuna.Study) -> None:
        """Write best_params.yaml and trials.csv into the sweep dir (write, then rename), and log the study summary."""
        self._write_multirun()
        atomic_write(self.sweep_dir / "trials.csv", study.trials_dataframe().to_csv(index=False))
        summary = self._best_summary(study)
        if summary is None:
            log.warning("no COMPLETE trial: best_params.yaml not written")
        else:
            atomic_write(self.sweep_dir / "best_params.yaml", yaml.safe_dump(summary, sort_keys=False))
        counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
        log.info(
            "study '%s': %d trials (%s); best %s; results in %s",
            self.study_name,
            sum(counts.values()),
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
            self._best_text(study),
            self.sweep_dir,
        )
