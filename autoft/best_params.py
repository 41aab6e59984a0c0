"""What a finished search chose: its best trial's params, from the sweeper's ``best_params.yaml`` or the study.

Its own module, light on imports, because ``python -m autoft.final`` reads it first, before importing the
training stack (:mod:`autoft.preflight`): a wrong path is one line in a second, not after 12 s of imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autoft import UserError


def load_best_params(best: str | None = None, storage: str | None = None, name: str | None = None,
                     pick: int | None = None) -> dict[str, Any]:
    """The params of a finished search: from a ``best_params.yaml`` or from the study itself.

    Multi-objective studies have a Pareto front, not a best trial: ``pick`` chooses a trial number
    on it; by default the one best on the last objective (OOD validation).
    """
    if best:
        path = Path(best)
        if not path.is_file():
            raise UserError(f"best-params file not found: {path}")
        summary = yaml.safe_load(path.read_text())
        if not isinstance(summary, dict) or not ({"best_params", "pareto_front"} & set(summary)):
            raise UserError(f"{path}: not a best_params.yaml written by the autoft_optuna sweeper")
        if "best_params" in summary:
            return dict(summary["best_params"])
        front = {t["trial"]: t for t in summary["pareto_front"]}
    elif storage and name:
        try:
            import optuna  # only here: a yaml file needs none of it

            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise UserError(f"no study '{name}' in {storage}") from None
        if len(study.directions) == 1:
            try:
                return dict(study.best_params)
            except ValueError:
                raise UserError(f"study '{name}' has no finished trial yet") from None
        front = {t.number: {"params": t.params, "values": t.values} for t in study.best_trials}
    else:
        raise UserError("give best=<best_params.yaml> or study.storage=<url> study.name=<name>")
    if not front:
        raise UserError("the Pareto front is empty: no finished trial")
    if pick is None:
        pick = max(front, key=lambda n: front[n]["values"][-1])
    if pick not in front:
        raise UserError(f"trial {pick} is not on the Pareto front {sorted(front)}")
    return dict(front[pick]["params"])
