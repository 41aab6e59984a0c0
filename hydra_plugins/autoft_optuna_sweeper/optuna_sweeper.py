"""The sweep loop: Optuna asks, Hydra's launcher runs each batch of jobs, their outcomes go to one persistent study.

A drop-in for the released hydra-optuna-sweeper (pinned to optuna<3) on Optuna >= 4, with what a long search needs:
a persistent study that a re-run finishes instead of restarting, recovery of trials left RUNNING by a dead process,
several sweeper processes on one study, warm starts, and pruning from inside jobs. Each part lives in the module
named for it: config.py (keys, defaults, the sampler and pruner groups), _search_space.py, _study.py, _lock.py
(workers and heartbeats), _outcome.py (a job's result, and the errors that end the command), _results.py (the
files written at the end) and _compose.py (trials' job configs, derived from one Hydra composed). The leading
underscore keeps Hydra's plugin scan from executing a module a second time, which would make a second copy of
its classes (SweepError among them).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from hydra_plugins.autoft_optuna_sweeper._compose import DerivedSweepConfigs
from hydra_plugins.autoft_optuna_sweeper._lock import StudyLock, heartbeat
from hydra_plugins.autoft_optuna_sweeper._outcome import ABORT_ATTR, SweepError, failure_rate_error, judge
from hydra_plugins.autoft_optuna_sweeper._results import best_text, write_atomic, write_results
from hydra_plugins.autoft_optuna_sweeper._search_space import (
    SearchSpace,
    contains,
    first_line,
    format_value,
    grid_space,
    parse_search_space,
)
from hydra_plugins.autoft_optuna_sweeper._study import (
    WORKER_ATTR,
    fail_orphans,
    n_counted,
    open_study,
    quiet,
    running_here,
    safe_url,
    warm_start_params,
)
from hydra_plugins.autoft_optuna_sweeper.config import WarmStartConf, build, spec

log = logging.getLogger(__name__)


class AutoftOptunaSweeper(Sweeper):
    """Ask/tell loop over batches of ``n_jobs`` trials until the study holds ``n_trials`` counted ones."""

    def __init__(self, sampler: DictConfig, direction: Any, storage: str | None, study_name: str | None,
                 n_trials: int, n_jobs: int, max_failure_rate: float, params: DictConfig | None,
                 custom_search_space: str | None, failure_rate_min_trials: int | None, pruner: DictConfig,
                 pass_trial: bool, enqueue: Any, warm_start: DictConfig, heartbeat_interval: int,
                 grace_period: int | None) -> None:
        def plain(node: Any) -> Any:
            return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

        self.sampler, self.pruner = sampler, pruner
        self.directions: list[str] = [direction] if isinstance(direction, str) else list(plain(direction))
        self.storage, self.study_name = storage, study_name
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.max_failure_rate, self.failure_rate_min_trials = max_failure_rate, failure_rate_min_trials
        self.params: dict[str, Any] = plain(params) or {}
        self.custom_search_space = custom_search_space
        self.pass_trial = pass_trial
        self.enqueue: list[dict[str, Any]] = plain(enqueue) or []
        self.warm_start = WarmStartConf(**plain(warm_start))
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.custom: Any = None  # custom_search_space's function, once imported
        self._lock: StudyLock | None = None
        self._wrote_multirun = self._exhausted = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        # the launcher (and the batch check) compose jobs through a loader that derives a trial's config from the
        # last composed one where only param values differ: _compose.py
        hydra_context = HydraContext(config_loader=DerivedSweepConfigs(hydra_context.config_loader),
                                     callbacks=hydra_context.callbacks)
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
            self._check_config(space)
            first = self._checked_enqueue(space) + warm_start_params(self.warm_start, space)
            self.custom = get_method(self.custom_search_space) if self.custom_search_space else None
        except (ValueError, ImportError) as e:
            raise SweepError(first_line(e)) from None
        # Compose one job config from in-space values now, so a key missing from the config fails before any write.
        dists = space.distributions
        probe = {n: d.choices[0] if isinstance(d, CategoricalDistribution) else d.low for n, d in dists.items()}
        self.validate_batch_is_legal([self._job_overrides(space, probe, trial_id=0, number=0)])

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self._lock = StudyLock(self.storage_url, self.study_name or "")
        study, self._rdb = open_study(self._lock, self.study_name, self.directions, space, spec(self.pruner), first,
                                      self.heartbeat_interval, self.grace_period)
        self.study_name = study.study_name
        counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
        log.info("study '%s' in %s: %d/%d trials done (%s); sampler %s (seed %s), pruner %s, %d params, %d fixed",
                 self.study_name, safe_url(self.storage_url), n_counted(study.get_trials(deepcopy=False)),
                 self.n_trials, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "new",
                 self.sampler._target_.rsplit(".", 1)[-1], self.sampler.get("seed"),
                 self.pruner._target_.rsplit(".", 1)[-1], len(dists), len(space.fixed))
        self._run_trials(study, space)
        self._finish(study)

    def _check_config(self, space: SearchSpace) -> None:
        """Fail on a bad sweeper config before any file is written."""
        if not self.directions or any(d not in ("maximize", "minimize") for d in self.directions):
            raise ValueError(f"hydra.sweeper.direction: expected minimize, maximize or a list, got {self.directions}")
        if self.n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs must be at least 1, got {self.n_jobs}")
        if not 0 <= self.max_failure_rate <= 1:
            raise ValueError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {self.max_failure_rate}")
        if self.failure_rate_min_trials is not None and self.failure_rate_min_trials < 1:
            raise ValueError(f"hydra.sweeper.failure_rate_min_trials must be at least 1 (or null), got "
                             f"{self.failure_rate_min_trials}")
        self._sampler(space, offset=0)
        build(self.pruner, "hydra.sweeper.pruner")
        if self.sampler.get("_partial_"):  # the grid: n_trials is at most its size, as in the released plugin
            size = 1
            for values in grid_space(space).values():
                size *= len(values)
            if size < self.n_trials:
                log.info("grid of %d points: n_trials %d -> %d", size, self.n_trials, size)
                self.n_trials = size

    def _sampler(self, space: SearchSpace, offset: int) -> optuna.samplers.BaseSampler:
        """Seed + offset: a resumed sweep (offset = trials already in the study) must not replay the random
        startup draws of the first run, nor may workers that join a study replay each other's; a fresh sweep
        (offset 0) is exactly reproducible. QMC keeps its seed: its scrambling must be the same in every process."""
        node = OmegaConf.to_container(self.sampler, resolve=True)
        if node.get("seed") is not None and not node["_target_"].endswith("QMCSampler"):
            node["seed"] += offset
        args = (grid_space(space),) if node.get("_partial_") else ()
        return build(OmegaConf.create(node), "hydra.sweeper.sampler", *args)

    def _checked_enqueue(self, space: SearchSpace) -> list[dict[str, Any]]:
        for params in self.enqueue:
            for name, value in params.items():
                if name not in space.distributions or not contains(space.distributions[name], value):
                    raise ValueError(f"hydra.sweeper.enqueue: {name}={value!r} is not in the search space")
        return self.enqueue

    def _job_overrides(self, space: SearchSpace, params: dict[str, Any], trial_id: int, number: int) -> list[str]:
        overrides = space.fixed + [f"{name}={format_value(value)}" for name, value in params.items()]
        if self.subdir_is_trial:
            overrides.append(f"hydra.sweep.subdir={number}")
        if self.pass_trial:
            overrides += [
                f"++optuna_trial.storage={format_value(self.storage_url)}",
                f"++optuna_trial.study_name={format_value(self.study_name)}",
                f"++optuna_trial.trial_id={trial_id}",
            ]
        return overrides

    def _ask(self, study: optuna.Study, space: SearchSpace, n: int) -> list[optuna.trial.Trial]:
        """Ask n trials (under the study lock), each with the config's params, then custom_search_space's."""
        asked: list[optuna.trial.Trial] = []
        for _ in range(n):
            trial = study.ask(space.distributions)
            # beat at once, not when the heartbeat thread gets to it: a RUNNING trial that never had a
            # heartbeat is never found stale, so a kill in that gap would leave it RUNNING forever
            self._rdb.record_heartbeat(trial._trial_id)
            trial.set_user_attr(WORKER_ATTR, self.worker)
            asked.append(trial)
            if self.custom is None:
                continue
            fixed = {line.split("=", 1)[0].lstrip("+~") for line in space.fixed}
            try:
                self.custom(self.config, trial)
                clash = sorted(n for n in trial.params if n.lstrip("+~") in fixed)
                if clash:
                    raise ValueError(f"it suggested {clash}, fixed by an override")
            except Exception as e:
                for t in asked:
                    t.set_user_attr(ABORT_ATTR, f"custom_search_space: {first_line(e)}")
                    study.tell(t, state=TrialState.FAIL)
                raise SweepError(f"hydra.sweeper.custom_search_space {self.custom_search_space}: "
                                 f"{type(e).__name__}: {first_line(e)}") from None
        return asked

    def _run_trials(self, study: optuna.Study, space: SearchSpace) -> None:
        """Batches of trials until the study holds n_trials counted ones, with any number of workers on it."""
        ran: list[tuple[bool, str]] = []  # this run's trials: (a fault?, outcome)
        sampler_set = waiting_logged = False
        while not self._exhausted:
            with self._lock, quiet():
                optuna.storages.fail_stale_trials(study)
                # at once where the lock excludes the others: else a resumed search that finishes within the grace
                # period would end with its dead predecessor's unnamed trial RUNNING for ever
                fail_orphans(study, self._rdb, 0 if self._lock.exclusive else self._grace)
                trials = study.get_trials(deepcopy=False)
                done = n_counted(trials)
                if done >= self.n_trials:
                    break
                # trials other workers (or a dead process, until its heartbeat is stale) are running use budget too
                running = sum(t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs for t in trials)
                if not sampler_set:
                    study.sampler = self._sampler(space, offset=sum(t.state != TrialState.WAITING for t in trials))
                    sampler_set = True
                asked = self._ask(study, space, min(self.n_jobs, self.n_trials - done - running))
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
            with heartbeat(self._rdb, [t._trial_id for t in asked]), running_here(self.storage_url, self.study_name,
                                                                                   asked):
                returns = self.launcher.launch(batch, initial_job_idx=asked[0].number)
            seconds = (time.perf_counter() - tic) / len(asked)
            told = [self._tell(study, trial, ret) for trial, ret in zip(asked, returns, strict=True)]
            for trial, (outcome, _, _) in zip(asked, told, strict=True):
                log.info("trial %d/%d (#%d) %s | %s | best %s | %.1f s/trial", n_counted(study.get_trials(
                    deepcopy=False)), self.n_trials, trial.number, outcome, trial.params, best_text(study), seconds)
            del returns
            abort = next((stop for _, _, stop in told if stop is not None), None)
            if abort is not None:
                raise SweepError(abort)  # bad input: reports and multirun.yaml stay as they were
            self._write_multirun()
            batch_faults = [(fault, outcome) for outcome, fault, _ in told]
            ran += batch_faults
            too_many = failure_rate_error(batch_faults, ran, self.max_failure_rate, self.failure_rate_min_trials)
            if too_many is not None:
                self._finish(study)
                raise SweepError(too_many)

    @property
    def _grace(self) -> int:
        return self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval

    def _tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn) -> tuple[str, bool, str | None]:
        """Record one job's outcome (see _outcome.py): (what happened, a fault?, the error that ends the command).
        Job errors never propagate: one bad trial must not end a long sweep."""
        if self._rdb.get_trial(trial._trial_id).state.is_finished():
            return "finished by the job", False, None
        state, values, attr, error = judge(ret, len(self.directions))
        try:
            if error is not None:
                trial.set_user_attr(attr, error)
            study.tell(trial, values, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale by another worker meanwhile
            return "finished elsewhere (stale)", False, None
        except RuntimeError as e:  # told; the grid or brute-force sampler has no more points and calls study.stop()
            if "Study.stop" not in str(e):
                raise
            log.info("the sampler's search space is exhausted: the search stops")
            self._exhausted = True
        if state == TrialState.COMPLETE:
            return f"value {values[0] if len(values) == 1 else values}", False, None
        if error is None:
            return "pruned", False, None
        log.warning("trial #%d %s: %s", trial.number, "pruned" if state == TrialState.PRUNED else "failed", error)
        if attr == ABORT_ATTR:
            return f"aborted: {error}", False, f"trial #{trial.number}: {first_line(ret._return_value)}"
        return f"{'pruned' if state == TrialState.PRUNED else 'failed'}: {first_line(error)}", True, None

    def _write_multirun(self) -> None:
        """The command's config, as Hydra's own sweepers write it; only once a batch ran (bad input writes nothing)."""
        if not self._wrote_multirun:
            write_atomic(self.sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))
            self._wrote_multirun = True

    def _finish(self, study: optuna.Study) -> None:
        """Write the result files into the sweep dir, and log the study summary."""
        self._write_multirun()
        if not write_results(study, self.sweep_dir):
            log.warning("no COMPLETE trial: optimization_results.yaml and best_params.yaml not written")
        counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
        log.info("study '%s': %d trials (%s); best %s; results in %s", self.study_name, sum(counts.values()),
                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), best_text(study), self.sweep_dir)
