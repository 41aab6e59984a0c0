"""What a job's outcome does to its trial and to the search: states, the reason recorded, the ``ends_sweep`` marker
(how a job's bad input ends the command without the plugin importing the app), and max_failure_rate's two modes."""

from __future__ import annotations

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from hydra_plugins.autoft_optuna_sweeper._outcome import ABORT_ATTR, ERROR_ATTR, failure_rate_error, judge


class BadInput(Exception):
    ends_sweep = True  # what autoft.UserError says; any app's exception class may


class SubclassOfBadInput(BadInput):
    pass


class NotMarked(Exception):
    ends_sweep = "yes"  # only True itself marks


def failed(exc: BaseException) -> JobReturn:
    ret = JobReturn(status=JobStatus.FAILED)
    ret._return_value = exc
    return ret


@pytest.mark.parametrize(
    ("ret", "state", "attr", "reason"),
    [
        (JobReturn(status=JobStatus.COMPLETED, _return_value=0.5), TrialState.COMPLETE, ERROR_ATTR, None),
        (JobReturn(status=JobStatus.COMPLETED, _return_value="x"), TrialState.FAIL, ERROR_ATTR,
         "the job returned 'x', expected a number"),
        (failed(RuntimeError("boom")), TrialState.FAIL, ERROR_ATTR, "RuntimeError: boom"),
        (failed(optuna.TrialPruned("at step 3")), TrialState.PRUNED, ERROR_ATTR, None),
        (failed(FloatingPointError("nan")), TrialState.PRUNED, ERROR_ATTR, "diverged: FloatingPointError: nan"),
        (failed(BadInput("no data")), TrialState.FAIL, ABORT_ATTR, "BadInput: no data"),
        (failed(SubclassOfBadInput("no data")), TrialState.FAIL, ABORT_ATTR, "SubclassOfBadInput: no data"),
        (failed(NotMarked("no")), TrialState.FAIL, ERROR_ATTR, "NotMarked: no"),
    ],
)
def test_each_outcome_gives_its_state_and_reason(ret, state, attr, reason):
    got_state, values, got_attr, got_reason = judge(ret, 1)
    assert (got_state, got_attr, got_reason) == (state, attr, reason)
    assert (values == [0.5]) == (state == TrialState.COMPLETE)


def test_autoft_user_error_carries_the_marker():
    from autoft import UserError

    assert judge(failed(UserError("bad root")), 1)[2] == ABORT_ATTR


FAULT, OK = (True, "failed: RuntimeError: boom"), (False, "value 1.0")


@pytest.mark.parametrize(
    ("batch", "ran", "max_rate", "min_trials", "ends"),
    [
        ([FAULT], [OK, OK, FAULT], 0.0, None, True),  # released default: the first failing batch ends it
        ([OK, OK], [FAULT, OK, OK], 0.0, None, False),  # earlier batches do not count
        ([FAULT, OK], [FAULT, OK], 0.5, None, False),  # half is not more than half
        ([FAULT, FAULT], [FAULT, FAULT], 0.5, None, True),
        ([FAULT, FAULT], [FAULT, FAULT], 1.0, None, False),  # 1.0 never ends it
        ([FAULT], [FAULT] * 4, 0.5, 5, False),  # ours: judged over the run, from 5 trials on
        ([OK], [FAULT] * 3 + [OK, OK], 0.5, 5, True),
        ([FAULT], [FAULT, FAULT] + [OK] * 3, 0.5, 5, False),
    ],
)
def test_failure_rate_over_a_batch_or_the_run(batch, ran, max_rate, min_trials, ends):
    error = failure_rate_error(batch, ran, max_rate, min_trials)
    assert (error is not None) == ends
    if ends:
        assert error.endswith(f"more than hydra.sweeper.max_failure_rate={max_rate}; last: failed: RuntimeError: boom")
        assert ("of this batch" in error) == (min_trials is None)
