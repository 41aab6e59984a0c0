"""What a job's outcome means for its trial, and the errors that end the whole command.

A job that raises fails its trial (FAIL, the reason in the ``error`` user attr); one that raises
``optuna.TrialPruned`` is PRUNED; one whose run diverged (``FloatingPointError``) is PRUNED with the reason, so that
TPE ranks it among the bad trials (it ignores FAILs and would sample the divergent region again).

A job's exception ends the whole command instead, with one ``error:`` line and exit code 2, when its class (or a base
class) has a true ``ends_sweep`` attribute: bad input that every trial would meet (the app's data root is missing,
...), where going on would fail every trial. The plugin reads the attribute by name so that it imports nothing from
the app; ``autoft.UserError`` sets it. Its trial is FAIL with the reason in ``aborted``, not counted towards n_trials.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

# Trial user attr with the reason a job failed or diverged; it also marks the FAILs that count towards n_trials.
ERROR_ATTR = "error"
# Trial user attr with the bad-input error that ended the command (FAIL, not counted: a fixed re-run runs it again).
ABORT_ATTR = "aborted"
# The class attribute that makes a job's exception end the command (see the module docstring).
ENDS_SWEEP = "ends_sweep"
DIVERGED: tuple[type[BaseException], ...] = (FloatingPointError,)


class SweepError(Exception):
    """Bad input or a search that cannot go on: the command ends with this one line and exit code 2."""


def objective_values(result: Any, n_objectives: int) -> tuple[list[float] | None, str | None]:
    """The job's return value as the study's values, or why it cannot be (not a number, wrong count, not finite)."""
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


def judge(ret: JobReturn, n_objectives: int) -> tuple[TrialState, list[float] | None, str, str | None]:
    """(state, values, user attr for the reason, reason or None) of one job's trial."""
    if ret.status == JobStatus.COMPLETED:
        values, error = objective_values(ret.return_value, n_objectives)
        return (TrialState.COMPLETE if error is None else TrialState.FAIL), values, ERROR_ATTR, error
    exc = ret._return_value  # hydra 1.3 keeps the job's exception here; .return_value would re-raise it
    error = f"{type(exc).__name__}: {exc}"[:2000]
    if isinstance(exc, optuna.TrialPruned):
        return TrialState.PRUNED, None, ERROR_ATTR, None
    if isinstance(exc, DIVERGED):
        return TrialState.PRUNED, None, ERROR_ATTR, f"diverged: {error}"
    return TrialState.FAIL, None, ABORT_ATTR if getattr(exc, ENDS_SWEEP, False) is True else ERROR_ATTR, error


def failure_rate_error(batch: list[tuple[bool, str]], ran: list[tuple[bool, str]], max_rate: float,
                       min_trials: int | None) -> str | None:
    """Why the search must end, or None: more than ``max_rate`` of the judged trials failed (a fault, with its
    outcome, per trial). Released: each batch judged alone; with ``min_trials``, all of this run's trials, once
    that many ran."""
    window = batch if min_trials is None else ran if len(ran) >= min_trials else []
    faults = [outcome for fault, outcome in window if fault]
    if not faults or len(faults) <= max_rate * len(window):
        return None
    return (f"{len(faults)} of the {len(window)} trials of this {'batch' if min_trials is None else 'run'} failed, "
            f"more than hydra.sweeper.max_failure_rate={max_rate}; last: {faults[-1]}")
