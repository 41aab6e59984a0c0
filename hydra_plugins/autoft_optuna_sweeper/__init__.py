"""Hydra sweeper on current Optuna, selected with ``hydra/sweeper=autoft_optuna``."""

from hydra_plugins.autoft_optuna_sweeper.optuna_sweeper import trial_from_config

__all__ = ["trial_from_config"]
