"""A four-dimensional sphere whose space is partly written in Python: ``configure`` suggests z within
``max_z_difference_from_x`` of the sampled x, and a new key w (hence ``+w``) in [0, 1]."""

import hydra
from omegaconf import DictConfig
from optuna.trial import Trial


@hydra.main(version_base=None, config_path="custom-search-space", config_name="config")
def sphere_4d(cfg: DictConfig) -> float:
    return sum(float(cfg[k]) ** 2 for k in ("w", "x", "y", "z"))


def configure(cfg: DictConfig, trial: Trial) -> None:
    """hydra.sweeper.custom_search_space: called with the sweep's config and each trial, after the config's params."""
    x, margin = trial.params["x"], cfg.max_z_difference_from_x
    trial.suggest_float("z", x - margin, x + margin)
    trial.suggest_float("+w", 0.0, 1.0)  # w is not in the config: the job gets +w=...


if __name__ == "__main__":
    sphere_4d()
