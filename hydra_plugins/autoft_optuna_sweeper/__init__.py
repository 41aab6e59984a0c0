"""Hydra sweeper on current Optuna, selected with ``hydra/sweeper=autoft_optuna`` (see optuna_sweeper.py)."""

from hydra_plugins.autoft_optuna_sweeper._study import trial_from_config

__all__ = ["trial_from_config"]
