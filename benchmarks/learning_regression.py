"""The embedded world's learning claims on a world small enough for a test: measured over seeds.

tests/test_learning.py asserts, on one seed of this small world, the direction and a loose size of the effects
the project's results rely on: fine-tuning (FT) above zero-shot on ID; the camera shortcut costing FT on OOD (its
OOD gain below its ID gain); WiSE-FT's midpoint above FT on OOD. Its tolerances come from the seed spread this
script measures (each seed: its own world, pretrained tiny CLIP and fine-tuning order):

    python benchmarks/learning_regression.py --seeds 0 1 2 \\
        --out benchmarks/results/2026-11-30-cpu/learning_regression.json

Everything runs in this process, in the test's own configuration (:data:`OVERRIDES`); figures are macro-F1 on
the test splits. Worlds and checkpoints go to $AUTOFT_CACHE (set it to a scratch folder for a fresh measure).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from autoft import atomic_write

# The small world: 1/4 of the embedded world's train split, smaller test splits, and a pretraining of
# 40 s instead of minutes (1/10 the web set, 1/4 the steps, half the batch). The final-training recipe is
# conf/method/ft's (lr0, weight decay 0.1, cosine after warmup), for 4 epochs.
WORLD = {"n_train": 600, "n_id_val": 100, "n_id_test": 400, "n_ood_val": 100, "n_ood_test": 800}
PRETRAIN = {"n_web": 2000, "steps": 40, "batch_size": 64, "warmup": 5}
OVERRIDES = [
    *(f"dataset.world.{k}={v}" for k, v in WORLD.items()),
    *(f"model.pretrain.{k}={v}" for k, v in PRETRAIN.items()),
    "objective=ce", "optim.lr=${model.lr0}", "optim.weight_decay=0.1", "optim.warmup_steps=10",
    "trainer.max_epochs=4", "trainer.enable_checkpointing=false", "+trainer.enable_progress_bar=false",
    "dataset.batch_size=64", "test=false", "~logger",
]
SPLITS = ("test_id", "test_ood")


def measure(seed: int, out: Path) -> dict:
    """Zero-shot, FT and WiSE-FT (alpha 0.5) of one seed's world; each split's metric and the seconds taken."""
    from hydra import compose, initialize_config_dir

    from autoft.finetune import CONF_DIR, build, evaluate, finetune
    from autoft.model import interpolate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("final", overrides=[*OVERRIDES, f"dataset.world.seed={seed}", f"seed={seed}",
                                          f"output_dir={out}"])
    metric = cfg.dataset.metric
    t0 = time.perf_counter()
    model, data = build(cfg)  # generates the world and pretrains its CLIP on first use
    built = time.perf_counter()

    def scores() -> dict[str, float]:
        res = evaluate(cfg, model, data)
        return {s: res[f"{s}/{metric}"] for s in SPLITS}

    zero_shot_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    zero_shot = scores()
    finetune(cfg, model, data)
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = scores()
    model.load_state_dict(interpolate(zero_shot_weights, tuned, 0.5))
    wise = scores()
    return {"seed": seed, "zero_shot": zero_shot, "ft": ft, "wise_0.5": wise,
            "seconds_build": round(built - t0, 1), "seconds_rest": round(time.perf_counter() - built, 1)}


def from_method_record(record: dict) -> dict:
    """A methods job's ``method.json`` (a trained method's WiSE-FT curve, alpha 0 being the zero-shot model) as a
    :func:`measure` row: the effects of the embedded world's own runs (paper.py wilds) in the same terms."""
    wise = {w["alpha"]: {"test_id": w["id"], "test_ood": w["ood"]} for w in record["wise"]}
    return {"seed": record["seed"], "zero_shot": wise[0.0], "ft": wise[1.0], "wise_0.5": wise[0.5]}


def effects(row: dict) -> dict[str, float]:
    """The three claims as differences (positive: the claim holds)."""
    zs, ft, wise = row["zero_shot"], row["ft"], row["wise_0.5"]
    return {
        "ft_minus_zs_id": ft["test_id"] - zs["test_id"],
        # the shortcut: FT gains less OOD than ID
        "id_gain_minus_ood_gain": (ft["test_id"] - zs["test_id"]) - (ft["test_ood"] - zs["test_ood"]),
        "wise_minus_ft_ood": wise["test_ood"] - ft["test_ood"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/learning_regression.json"))
    parser.add_argument("overrides", nargs="*", help="more config overrides (to try other sizes)")
    args = parser.parse_args(argv)
    OVERRIDES.extend(args.overrides)
    rows = []
    for seed in args.seeds:
        row = measure(seed, args.out.parent / f"learning-seed{seed}")
        row["effects"] = effects(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for name in rows[0]["effects"]:
        values = [r["effects"][name] for r in rows]
        summary[name] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    result = {"world": WORLD, "pretrain": PRETRAIN, "overrides": OVERRIDES, "metric": "F1-macro_all",
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "per_seed": rows,
              "effects": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    for name, s in summary.items():
        print(f"{name}: mean {s['mean']:+.4f} std {s['std']:.4f} min {s['min']:+.4f} max {s['max']:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
