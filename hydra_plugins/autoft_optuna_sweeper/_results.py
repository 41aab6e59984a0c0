"""Result files in the sweep dir: ``optimization_results.yaml`` in the released plugin's shape, and our richer
``best_params.yaml`` and ``trials.csv``; each written to a temporary file, then renamed over the old one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import optuna
import yaml
from omegaconf import OmegaConf


def write_atomic(path: Path, text: str) -> None:
    """A kill leaves at worst a ``.<name>.<pid>.<hex>.tmp`` beside the intact old file, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def optimization_results(study: optuna.Study) -> dict[str, Any] | None:
    """What the released plugin writes: the best trial's params and value, or the Pareto front's ``solutions``;
    None before any trial completed."""
    if len(study.directions) > 1:
        return {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials]}
    try:
        best = study.best_trial
    except ValueError:
        return None
    return {"name": "optuna", "best_params": best.params, "best_value": best.value}


def best_params(study: optuna.Study) -> dict[str, Any] | None:
    """Ours: the same, with the study's name, directions and trial numbers (``autoft.final`` reads it)."""
    directions = [d.name.lower() for d in study.directions]
    if len(directions) > 1:
        front = [{"trial": t.number, "values": t.values, "params": t.params} for t in study.best_trials]
        return {"study_name": study.study_name, "directions": directions, "pareto_front": front} if front else None
    try:
        best = study.best_trial
    except ValueError:
        return None
    return {"study_name": study.study_name, "direction": directions[0], "best_trial": best.number,
            "best_value": best.value, "best_params": best.params}


def write_results(study: optuna.Study, sweep_dir: Path) -> bool:
    """Write trials.csv, and optimization_results.yaml and best_params.yaml once a trial completed (returns whether)."""
    write_atomic(sweep_dir / "trials.csv", study.trials_dataframe().to_csv(index=False))
    released, ours = optimization_results(study), best_params(study)
    if ours is None:
        return False
    write_atomic(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(released)))
    write_atomic(sweep_dir / "best_params.yaml", yaml.safe_dump(ours, sort_keys=False))
    return True


def best_text(study: optuna.Study) -> str:
    """The best so far, for log lines."""
    if len(study.directions) > 1:
        return f"Pareto front of {len(study.best_trials)}"
    try:
        return f"{study.best_value:.6g} (#{study.best_trial.number})"
    except ValueError:
        return "none yet"
