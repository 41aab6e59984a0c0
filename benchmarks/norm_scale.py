"""Where do the norm terms' searched weights start to matter? The figures behind conf/objective/base.yaml's norm_scale.

Under our convention a norm term t with weight w pulls each trainable element with a force of w * norm_scale[t]
(L1: w s sign(.); L2: 2 w s times the element's distance to theta0 or to zero). It competes with the cross-entropy
gradient, so the weight at which that pull equals the mean |CE gradient| per element at theta0 marks where the
term starts to hold the weights: far below it the term does nothing, far above it the weights stay pinned (to
theta0) or are wrecked (toward zero). A searched range [1e-4, 10] means something when that crossover lies inside
it, away from both ends. This script measures the CE gradient at theta0 on training batches and writes, per
term, the crossover weight at the configured scale:

    python benchmarks/norm_scale.py --out benchmarks/results/2026-11-30-embedded/norm_scale.json [overrides ...]

The L2-init crossover needs a typical fine-tuning displacement per element: ``--moved-rel`` times the rms of
theta0, where ``moved-rel`` is FT's ||theta - theta0|| / ||theta0|| (default 0.032: world_calibration's FT
job for world seed 10, ``benchmarks/results/2026-11-30-embedded/calibration/v3k-noground-heavy/jobs/10-ft.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from autoft import atomic_write
from autoft.finetune import CONF_DIR, build
from autoft.tensorprep import model_input


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--moved-rel", type=float, default=0.032)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset.world.seed=10")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=["~logger", *args.overrides])
    torch.manual_seed(cfg.seed)
    model, data = build(cfg)
    data.setup("fit")
    params = dict(model.trainable())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    loader = iter(data.train_dataloader())
    for _ in range(args.batches):  # the mean gradient over a few batches: what a step sees, less its noise
        x, y, _ = next(loader)
        if x.dtype == torch.uint8:  # the preprocessing cache's batches: prepared as a training step would
            x = model_input(x, data.train_prep, train=True)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in params.items():
            grads[n] += p.grad / args.batches
    flat_g = torch.cat([g.flatten() for g in grads.values()])
    flat_t = torch.cat([p.detach().flatten() for p in params.values()])
    g_abs, theta_rms = flat_g.abs().mean().item(), flat_t.square().mean().sqrt().item()
    moved = args.moved_rel * theta_rms
    scale = {t: float(cfg.objective.norm_scale[t]) for t in ("l1init", "l2init", "l1zero", "l2zero")}
    # weight at which the per-element pull equals the mean |CE gradient|
    cross = {"l1init": g_abs / scale["l1init"], "l1zero": g_abs / scale["l1zero"],
             "l2init": g_abs / (2 * scale["l2init"] * moved), "l2zero": g_abs / (2 * scale["l2zero"] * theta_rms)}
    result = {
        "overrides": args.overrides, "trainable_elements": flat_g.numel(), "batches": args.batches,
        "ce_grad_mean_abs": g_abs, "ce_grad_rms": flat_g.square().mean().sqrt().item(), "theta0_rms": theta_rms,
        "moved_rel": args.moved_rel, "norm_scale": scale, "crossover_weight": cross,
        "crossover_log10_position_in_1e-4_10": {t: (math.log10(w) + 4) / 5 for t, w in cross.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
